"""A flat sweep objective is reported, and the point comes from the documented tie-break."""

from __future__ import annotations


def _row(conf, iou, f1, precision):
    return {"conf": conf, "iou": iou, "mask/f1": f1, "mask/precision": precision, "mask/recall": 0.5,
            "fitness": 0.3, "damage_mae": 1.0}


def test_flat_objective_flagged_and_tie_broken_by_precision_then_conf():
    from damage.tasks.evaluation.sweep import choose_operating_point, objective_is_flat

    rows = [_row(c, i, 0.535 + 1e-4 * k, 0.6) for k, (c, i) in
            enumerate((c, i) for i in (0.45, 0.5) for c in (0.3, 0.4, 0.5))]
    rows[1]["mask/precision"] = 0.7  # conf 0.4, iou 0.45: the precision tie-break wins
    assert objective_is_flat(rows, "mask_f1")
    best = choose_operating_point(rows, "mask_f1")
    assert best["flat"] is True
    # differences within the tolerance are noise: the tie-break (precision) decides, not F1 + 5e-4
    assert (best["conf"], best["iou"]) == (0.4, 0.45)
    same = [_row(c, i, 0.535, 0.6) for i in (0.45, 0.5) for c in (0.3, 0.4, 0.5)]
    same[1]["mask/precision"] = 0.7
    b = choose_operating_point(same, "mask_f1")
    assert b["flat"] and (b["conf"], b["iou"]) == (0.4, 0.45)
    same[1]["mask/precision"] = 0.6
    b = choose_operating_point(same, "mask_f1")
    assert (b["conf"], b["iou"]) == (0.5, 0.45)  # then higher conf, then lower NMS IoU


def test_objective_with_spread_is_not_flat():
    from damage.tasks.evaluation.sweep import choose_operating_point, objective_is_flat

    rows = [_row(0.3, 0.5, 0.40, 0.6), _row(0.4, 0.5, 0.55, 0.6)]
    assert not objective_is_flat(rows, "mask_f1")
    assert choose_operating_point(rows, "mask_f1")["flat"] is False
    assert not objective_is_flat(rows[:1], "mask_f1")  # one point is a choice, not a tie
