"""End to end: the nightly flow on a tiny synthetic set, offline, under the Prefect harness (the suite's
shared tiny nightly: tests/integration/tiny_night.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.tiny_night import MODEL


@pytest.fixture(scope="module")
def nightly_summary(tiny_night):
    return tiny_night["summary"]


def test_nightly_runs_offline(tiny_night):
    assert tiny_night["outbound"] == [], f"outbound network attempts: {tiny_night['outbound'][:5]}"


def test_nightly_logs_runs_metrics_and_version(nightly_summary):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(nightly_summary["tracking_uri"])
    parent = c.get_run(nightly_summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.epochs"] == "1"
    children = c.search_runs([parent.info.experiment_id],
                             filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    steps = {r.data.tags.get("damage.step") for r in children}
    assert {"validate", "train", "evaluate", "sweep", "export", "label-issues"} <= steps
    # The accepted dataset's profile travels with the run (the next night's drift reference).
    assert parent.data.tags.get("data_profile") == "accepted"
    assert "data_profile/profile.json" in {a.path for a in c.list_artifacts(parent.info.run_id, "data_profile")}
    issues = next(r for r in children if r.data.tags.get("damage.step") == "label-issues")
    assert {"label_issues/label_issues.csv", "label_issues/label_issues_top.png"} <= {
        a.path for a in c.list_artifacts(issues.info.run_id, "label_issues")}
    assert nightly_summary["label_issues"]["images"] == {"train": 18, "val": 6}
    train = next(r for r in children if r.data.tags.get("damage.step") == "train")
    hist = c.get_metric_history(train.info.run_id, "train/box_loss")
    assert len(hist) == 1 and hist[0].step == 0
    assert "mask/mAP50-95" in train.data.metrics or "final/mask/mAP50-95" in train.data.metrics
    arts = {a.path for a in c.list_artifacts(train.info.run_id)}
    assert {"results", "weights"} <= arts
    # train.plots is on here (the default; the rest of the suite turns it off): Ultralytics' figures are logged
    figures = {Path(a.path).name for a in c.list_artifacts(train.info.run_id, "results")}
    assert {"results.png", "BoxPR_curve.png", "MaskPR_curve.png"} <= figures, sorted(figures)
    # registered candidate carries the ONNX
    name, version = nightly_summary["registered_model"], nightly_summary["registered_version"]
    assert name == MODEL
    mv = c.get_model_version(name, str(version))
    assert mv.run_id
    assert mv.tags["artifact.onnx"].endswith(".onnx")
    files = {a.path for a in c.list_artifacts(mv.run_id, "model")}
    assert {"model/MLmodel", "model/model.pt"} <= files  # the version is a pyfunc with the .pt beside it
    onnx_rel = mv.tags["artifact.onnx"].split("/model/", 1)[1]
    assert any(a.path.endswith(".onnx") for a in c.list_artifacts(mv.run_id, f"model/{Path(onnx_rel).parent}"))
    for k in ("box/mAP50", "box/mAP50-95", "mask/mAP50", "mask/mAP50-95"):
        assert 0.0 <= nightly_summary["metrics"][k] <= 1.0


def test_nightly_per_class_metrics_start_and_damage_error(nightly_summary):
    """Issue 12: per-class AP on the evaluation and per epoch, where training started (and why),
    the version's parent, the gate's failing classes, and the damage-percentage error."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(nightly_summary["tracking_uri"])
    parent = c.get_run(nightly_summary["mlflow_run_id"])
    children = {r.data.tags.get("damage.step"): r for r in c.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    labelled = [r["class"] for r in nightly_summary["per_class"] if r["instances"]]
    assert labelled
    for cls in labelled:
        assert f"mask_ap50/{cls}" in children["evaluate"].data.metrics
        assert f"box_ap50-95/{cls}" in children["evaluate"].data.metrics
        hist = c.get_metric_history(children["train"].info.run_id, f"mask_ap50/{cls}")
        assert [h.step for h in hist] == [0]  # one epoch, validated
    init = nightly_summary["init"]
    assert init["source"] in {"scratch", "production"} and init["reason"]
    assert parent.data.tags["train.init_reason"] == init["reason"]
    mv = c.get_model_version(nightly_summary["registered_model"], str(nightly_summary["registered_version"]))
    assert mv.tags["lineage.parent_version"] == (init["parent_version"] or "none")
    assert mv.tags["gate.failed_classes"] == (",".join(nightly_summary["promotion"]["failed_classes"]) or "none")
    dmg = nightly_summary["damage_pct_mae"]
    assert dmg["vehicles"] > 0 and dmg["mae"] >= 0
    assert parent.data.metrics["damage_pct_mae"] == pytest.approx(dmg["mae"])


def test_gate_passes_and_stages_the_new_version(nightly_summary, tiny_night):
    """The setup implies the outcome: a model name with no production version and floor 0.0, so the gate
    passes on the floor rule and ``staging`` points at tonight's version (production stays unset)."""
    from mlflow.tracking import MlflowClient

    import damage.model_registry as mr

    c = MlflowClient(nightly_summary["tracking_uri"])
    name, version = nightly_summary["registered_model"], str(nightly_summary["registered_version"])
    mv = c.get_model_version(name, version)
    assert mv.tags["validation_status"] == "passed", mv.tags.get("gate.reasons")
    assert mv.tags["gate.decision"] == "passed" and mv.tags["gate.production_version"] == "none"
    assert "floor" in mv.tags["gate.reasons"] and "no production version" in mv.tags["gate.reasons"]
    # the aliases as the night left them (test_nightly_ux approves this version later)
    assert tiny_night["aliases"] == {mr.STAGING: version, mr.PRODUCTION: None}
    parent = c.get_run(nightly_summary["mlflow_run_id"])
    assert parent.data.tags["gate.decision"] == "passed"
