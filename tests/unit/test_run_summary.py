"""``damage run``'s printed summary: per-class mask AP50, damage-percentage error, start, failing classes."""

from __future__ import annotations


def test_summary_prints_per_class_table_damage_error_and_failing_classes(monkeypatch):
    from damage.flows.commands.pipeline import _print_summary
    from damage.flows.common import console

    monkeypatch.setattr(console, "width", 200)  # one line per row: no wrapping inside the cells

    summary = {
        "metrics": {"mask/mAP50": 0.41}, "operating_point": {"conf": 0.4, "iou": 0.5, "objective": "mask_f1"},
        "damage_pct_mae": {"mae": 3.25, "by_class": {"dent": 4.5}, "vehicles": 40},
        "init": {"source": "production", "reason": "fine-tuning from production version 3 of 'damage-seg'"},
        "promotion": {"passed": False, "reasons": ["class dent: mask AP50 0.0200 < floor 0.1000"],
                      "failed_classes": ["dent"]},
        "per_class": [{"class": "vehicle", "images": 9, "instances": 11, "mask/AP50": 0.91},
                      {"class": "dent", "images": 4, "instances": 5, "mask/AP50": 0.02}],
    }
    with console.capture() as cap:
        _print_summary(summary, 60.0)
    out = cap.get()
    assert "3.250 pp over 40 labelled vehicles" in out  # 3 decimals, as in the per-class table
    assert "fine-tuning from production version 3" in out
    assert "failing classes" in out and "class dent: mask AP50 0.0200 < floor 0.1000" in out
    dent = next(line for line in out.splitlines() if line.startswith("│ dent "))
    assert "0.020" in dent and "4.500" in dent  # mask AP50 and damage % MAE on the class's row
    vehicle = next(line for line in out.splitlines() if line.startswith("│ vehicle "))
    assert "0.910" in vehicle and " - " in vehicle  # no damage error for the vehicle class
