"""Issue 28: the approver sees the candidate's shadow report beside its offline metrics
(``damage registry approve`` and the Prefect approval form both print ``evidence_lines``)."""

from __future__ import annotations


def test_shadow_report_reaches_the_version_and_the_evidence(tmp_path):
    from damage.model_registry.serving import SHADOW_TAG, evidence_lines, log_window, shadow_report
    from tests.helpers import sqlite_client

    c = sqlite_client(tmp_path)
    uri = c.tracking_uri
    c.create_registered_model("m")
    src = tmp_path / "model"
    src.mkdir()
    v = c.create_model_version("m", str(src)).version
    c.set_model_version_tag("m", v, "metric.mask/mAP50", "0.61")
    assert shadow_report("m", v, uri) is None
    assert "no shadow report" in "\n".join(evidence_lines("m", v, uri))
    window = {"candidate": v, "primary": "1", "images": 12, "counts_primary": {"dent": 12},
              "counts_candidate": {"dent": 10}, "matched": 10, "mask_iou_mean": 0.8, "mask_iou_p10": 0.7,
              "unmatched_primary": 2, "unmatched_candidate": 0, "damage_diff_mean": -1.5,
              "damage_diff_abs_mean": 2.0, "damage_diff_abs_max": 4.0, "vehicles_compared": 12,
              "latency_ms_p50": 20.0, "latency_ms_p95": 30.0, "primary_latency_ms_p50": 18.0,
              "primary_latency_ms_p95": 25.0, "errors": 1, "dropped": 0, "window": 1}
    log_window("m", "serving-evidence", uri, "shadow", v, 1, {**window, "total": {**window, "windows": 1}})
    rep = shadow_report("m", v, uri)
    assert rep["images"] == 12 and rep["windows"] == 1 and rep["run_id"]
    run = c.get_run(rep["run_id"])
    assert run.data.metrics["shadow/mask_iou_mean"] == 0.8 and run.data.metrics["shadow/errors"] == 1
    assert SHADOW_TAG in c.get_model_version("m", v).tags
    text = "\n".join(evidence_lines("m", v, uri))
    assert "mask/mAP50 0.61" in text and "dent 12->10" in text and "mask IoU mean 0.8" in text
    assert "1 errors" in text
    # a second window of the same service replaces the summary (its "total" already sums both)
    log_window("m", "serving-evidence", uri, "shadow", v, 2, {**window, "window": 2,
                                                               "total": {**window, "images": 24, "windows": 2}})
    assert shadow_report("m", v, uri)["images"] == 24
    assert shadow_report("m", v, uri)["run_id"] == rep["run_id"]  # one run per version


def test_resolve_refuses_bad_uris(tmp_path):
    import pytest

    from damage.model_registry.errors import RegistryError
    from damage.model_registry.serving import parse_model_uri, resolve

    assert parse_model_uri("models:/damage-seg@production") == ("damage-seg", "production", None)
    assert parse_model_uri("models:/damage-seg/7") == ("damage-seg", None, "7")
    for bad in ("runs:/abc/pyfunc", "models:/x", "models:/x@", "/tmp/model"):
        with pytest.raises(RegistryError, match="expected models:/<name>@<alias>"):
            parse_model_uri(bad)
    with pytest.raises(RegistryError, match="would leave the model cache"):
        resolve("models:/../7", tmp_path / "cache", f"sqlite:///{tmp_path / 'x.db'}")
