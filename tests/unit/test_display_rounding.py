"""Displayed metric values: 3 decimals (1 for milliseconds) everywhere people read them, through one
helper (``damage.tasks.core.display``); stored values keep full precision."""

from __future__ import annotations

import re

import numpy as np

from damage.tasks.core.display import fmt_metric, round_metric

V = 0.123456  # shows as 0.123; a surface with its own rounding shows 0.1235, 0.12 or 0.123456
MS = 12.3456  # latency: shows as 12.3


def _numbers(text: str) -> set[str]:
    return set(re.findall(r"\d+\.\d+", text))


def test_helper_rule():
    assert fmt_metric(V) == "0.123" and fmt_metric(np.float32(V)) == "0.123" and fmt_metric(np.float64(V)) == "0.123"
    assert fmt_metric(MS, "latency_ms") == "12.3" and fmt_metric(MS, "speed/inference_ms") == "12.3"
    assert fmt_metric(None) == "–" and fmt_metric(float("nan"), missing="-") == "-"
    assert fmt_metric(7, "images") == "7" and fmt_metric(np.int64(7)) == "7" and fmt_metric(True) == "True"
    assert fmt_metric("n/a") == "n/a"
    assert round_metric(V, "mask/mAP50") == 0.123 and round_metric(MS, "latency_ms") == 12.3
    assert round_metric(float("nan")) is None and round_metric(3) == 3 and round_metric(False) is False


def test_markdown_artifact_model_card_gate_and_notification_use_the_same_rounding():
    from damage.model_registry.card import model_card
    from damage.model_registry.gate import compare
    from damage.tasks.core.notify import approval_message
    from damage.tasks.nightly.reporting import summary_markdown

    metrics = {"mask/mAP50": V, "mask/mAP50-95": V, "box/mAP50-95": V, "box/mAP50": V, "latency_ms": MS}
    per_class = [{"class": "dent", "images": 3, "instances": 4, "mask/AP50": V, "box/AP50": V}]
    summary = {"metrics": metrics, "per_class": per_class, "promotion": {"passed": True, "reasons": []}}
    card = model_card("m", 1, metrics, per_class, {"conf": 0.25, "iou": 0.5, "objective": "mask_f1", "value": V},
                      machine_desc="test box")
    ok, reasons = compare({**metrics, "mask_ap50/dent": V}, {**metrics, "mask_ap50/dent": V}, tolerance=0.01,
                          latency_budget_ms=100, floor_mask_map=0.0, min_class_ap50={"dent": 0.05})
    _, note = approval_message("m", 1, metrics, None, reasons)
    for text in (summary_markdown(summary), card, "; ".join(reasons), note):
        shown = _numbers(text)
        assert "0.123" in shown, text
        assert not shown & {"0.1235", "0.12346", "0.123456", "12.35", "12.346"}, text
    assert "12.3" in _numbers(summary_markdown(summary)) and "12.3" in _numbers(card)


def test_table_artifacts_round_numbers_but_keep_them_numbers():
    from damage.tasks.export.compress import table_markdown
    from damage.tasks.export.variant import Variant

    rows = table_markdown([Variant("fp32", "float", "a.onnx", gflops=V, metrics={"mask/mAP50": V, "latency_ms": MS,
                                                                                 "size_mb": float("nan")})])
    assert rows[0]["mask/mAP50"] == 0.123 and rows[0]["latency_ms"] == 12.3 and rows[0]["gflops"] == 0.123
    assert rows[0]["size_mb"] is None and rows[0]["candidate"] is False and "onnx" not in rows[0]
