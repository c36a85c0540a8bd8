"""``damage evaluate / sweep / validate --json``: stdout is one JSON document; the evaluate run in
MLflow carries the dataset input (digest = fingerprint), system metrics, and the curves + confusion
matrix under ``plots/``."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner


def _invoke(args):
    from damage.flows.cli import app

    r = CliRunner().invoke(app, args, env={"COLUMNS": "80"})
    return r


def test_evaluate_json_and_its_mlflow_run(tiny_model, tiny_dataset):
    from mlflow.tracking import MlflowClient

    from damage.tasks.data.fingerprint import dataset_fingerprint
    from damage.tasks.evaluation.plots import CM_FILES

    r = _invoke(["evaluate", str(tiny_model), "--data", str(tiny_dataset), "--json",
                 "--set", "mlflow.system_metrics_interval_s=0.5"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert 0.0 <= doc["metrics"]["mask/mAP50"] <= 1.0 and doc["per_class"] and doc["model_format"] == "pt"
    assert doc["mlflow_run_url"].endswith("?workflowType=machine_learning")
    c = MlflowClient(doc["tracking_uri"])
    child = c.search_runs([c.get_run(doc["mlflow_run_id"]).info.experiment_id],
                          filter_string=f"tags.mlflow.parentRunId = '{doc['mlflow_run_id']}'")[0]
    run = c.get_run(child.info.run_id)
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.digest == dataset_fingerprint(Path(tiny_dataset).parent)
    assert json.loads(inp.dataset.profile)["splits"] == {"train": 18, "val": 6}
    assert any(k.startswith("system/cpu") for k in run.data.metrics)
    plots = {Path(a.path).name for a in c.list_artifacts(run.info.run_id, "plots")}
    assert {"box_PR_curve.png", "mask_PR_curve.png", "box_F1_curve.png", "mask_F1_curve.png", *CM_FILES} <= plots
    assert sorted(doc["plots"]) == sorted(f"plots/{p}" for p in plots)


def test_sweep_json(tiny_model, tiny_dataset, tmp_path):
    r = _invoke(["sweep", str(tiny_model), "--data", str(tiny_dataset), "--json", "--no-mlflow",
                 "--conf", "0.3", "--conf", "0.5", "--iou", "0.5", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert len(doc["rows"]) == 2 and set(doc["thresholds"]) >= {"conf", "iou", "objective", "value"}
    assert "flat" in doc["best"]


def test_validate_json(tiny_dataset):
    r = _invoke(["validate", str(tiny_dataset), "--json"])
    assert r.exit_code == 0, r.output  # the synthetic set passes the gate (tests/data/test_validate_cli.py)
    doc = json.loads(r.stdout)
    assert doc["passed"] is True and doc["summary"]["images"] == 24
    assert not [f for f in doc["findings"] if f["severity"] == "error"]
