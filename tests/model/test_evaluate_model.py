"""Evaluator and sweep on the tiny trained model: .pt vs ONNX, MLflow runs, Prefect artifact, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from damage.tasks.core.errors import DamageError
from damage.tasks.evaluation.evaluate import collect, evaluate_model
from damage.tasks.evaluation.metrics import METRIC_KEYS

IMGSZ = 96


@pytest.fixture(scope="module")
def tiny_onnx(tiny_model, tmp_path_factory) -> Path:
    """Static 96 px, opset 13 ONNX of the tiny model, made by the project's exporter (what the pipeline ships)."""
    from damage.tasks.export.onnx import export_onnx

    return export_onnx(tiny_model, tmp_path_factory.mktemp("tiny_onnx") / "tiny.onnx", IMGSZ, opset=13,
                       dynamic=False)


def _label_count(data_yaml: Path, split: str = "val") -> int:
    labels = Path(data_yaml).parent / "labels" / split
    return sum(len([ln for ln in p.read_text().splitlines() if ln.strip()]) for p in labels.glob("*.txt"))


def test_evaluate_pt(tiny_model, tiny_dataset):
    res = evaluate_model(tiny_model, tiny_dataset, imgsz=IMGSZ)
    m = res.metrics
    assert set(METRIC_KEYS) <= set(m)
    for k in METRIC_KEYS:
        assert math.isfinite(m[k]), k
        if not k.startswith(("speed/", "latency")) and k != "fitness":
            assert 0.0 <= m[k] <= 1.0, k
    assert m["latency_ms"] == pytest.approx(m["speed/preprocess_ms"] + m["speed/inference_ms"]
                                            + m["speed/postprocess_ms"])
    assert m["speed/inference_ms"] > 0
    assert m["instances"] == _label_count(tiny_dataset) > 0
    names = [r["class"] for r in res.per_class]
    assert names[0] == "vehicle" and len(names) == 7
    assert sum(r["instances"] for r in res.per_class) == m["instances"]
    assert res.to_dict()["metrics"]["box/mAP50"] == m["box/mAP50"]
    assert res.model_format == "pt" and res.imgsz == IMGSZ and res.conf == 0.001
    # per-class AP as flat metrics (MLflow keys), one per labelled class and kind, equal to the table
    labelled = [r for r in res.per_class if r["instances"]]
    per_class_keys = {k for k in m if k.split("/")[0] in ("box_ap50", "box_ap50-95", "mask_ap50", "mask_ap50-95")}
    assert len(per_class_keys) == 4 * len(labelled) > 0
    for r in labelled:
        assert m[f"mask_ap50/{r['class']}"] == r["mask/AP50"] and m[f"box_ap50-95/{r['class']}"] == r["box/AP50-95"]


def test_onnx_evaluates_like_pt(tiny_model, tiny_onnx, tiny_dataset):
    pt = evaluate_model(tiny_model, tiny_dataset, imgsz=IMGSZ)
    ox = evaluate_model(tiny_onnx, tiny_dataset, imgsz=IMGSZ)
    assert ox.model_format == "onnx"
    for k in ("box/mAP50", "box/mAP50-95", "mask/mAP50", "mask/mAP50-95"):
        assert abs(pt.metrics[k] - ox.metrics[k]) <= 0.005, (k, pt.metrics[k], ox.metrics[k])
    assert {k for k in ox.metrics if k.startswith("mask_ap50/")} == {k for k in pt.metrics if k.startswith("mask_ap50/")}
    # A 1-epoch model scores ~0 mAP, so also compare what both produced: the top detections.
    a = collect(tiny_model, tiny_dataset, imgsz=IMGSZ).map_scores[0.7]
    b = collect(tiny_onnx, tiny_dataset, imgsz=IMGSZ).map_scores[0.7]
    assert len(a) == len(b) > 0
    assert sum(len(s.conf) for s in a) > 0
    for sa, sb in zip(a, b, strict=True):
        k = min(len(sa.conf), len(sb.conf), 20)
        np.testing.assert_allclose(sa.conf[:k], sb.conf[:k], atol=2e-3)


def test_static_onnx_refuses_another_imgsz(tiny_onnx, tiny_dataset):
    with pytest.raises(DamageError, match="fixed to 96x96"):
        evaluate_model(tiny_onnx, tiny_dataset, imgsz=128)


def test_bad_inputs_name_the_file(tiny_model, tiny_dataset, tmp_path):
    from damage.tasks.core.errors import DatasetError

    with pytest.raises(DamageError, match="model file not found"):
        evaluate_model(tmp_path / "nope.pt", tiny_dataset)
    with pytest.raises(DamageError, match="unsupported model format"):
        evaluate_model(tmp_path / "model.engine", tiny_dataset)
    with pytest.raises(DatasetError, match="no split 'test'"):
        evaluate_model(tiny_model, tiny_dataset, split="test", imgsz=IMGSZ)


def test_sweep_step_in_a_flow_logs_runs_files_and_table(prefect_harness, tiny_model, tiny_dataset, tmp_path,
                                                         monkeypatch):
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    from damage.tasks.core import tracking
    from damage.tasks.core.config import SweepConfig
    from damage.tasks.evaluation.sweep import sweep_step

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    c = tracking.client()
    exp = tracking.ensure_experiment(c, "sweep-test", (tmp_path / "artifacts").as_uri())
    parent = tracking.start_run(c, exp, "parent")
    cfg = SweepConfig()

    @flow(name="sweep-test-flow")
    def f():
        return task(sweep_step, name="sweep")(tiny_model, tiny_dataset, cfg, IMGSZ, parent, out_dir=tmp_path / "out")

    res = f()
    assert len(res.rows) == 20 and res.thresholds["objective"] == "mask_f1"
    sweep_runs = c.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")
    assert [r.data.tags["mlflow.runName"] for r in sweep_runs] == ["sweep"]
    sweep_id = sweep_runs[0].info.run_id
    points = c.search_runs([exp], f"tags.mlflow.parentRunId = '{sweep_id}'", max_results=100)
    assert len(points) == 20
    assert {(p.data.params["conf"], p.data.params["iou"]) for p in points} == \
        {(str(r["conf"]), str(r["iou"])) for r in res.rows}
    assert all("mask/f1" in p.data.metrics for p in points)
    files = {a.path for a in c.list_artifacts(sweep_id, "sweep")}
    assert {"sweep/sweep.csv", "sweep/sweep_heatmap.png", "sweep/sweep_pr.png"} <= files
    for run_id in (sweep_id, parent):
        tags = c.get_run(run_id).data.tags
        assert float(tags["operating.conf"]) == res.thresholds["conf"]
        assert float(tags["operating.iou"]) == res.thresholds["iou"]
        assert tags["operating.objective"] == "mask_f1"
    assert res.csv_path.is_file() and res.heatmap_path.is_file() and res.pr_plot_path.is_file()
    with get_client(sync_client=True) as pc:
        # newest first: other tests in the session-scoped harness publish sweeps under the same key
        arts = pc.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["threshold-sweep"])),
                                 sort=ArtifactSort.CREATED_DESC)
    assert arts and arts[0].type == "table"
    table = json.loads(arts[0].data) if isinstance(arts[0].data, str) else arts[0].data
    assert len(table) == 20 and sum(row["chosen"] for row in table) == 1


def test_cli_evaluate_and_sweep(tiny_model, tiny_dataset, tmp_path):
    from typer.testing import CliRunner

    from damage.flows.cli import app

    r = CliRunner().invoke(app, ["evaluate", str(tiny_model), "--data", str(tiny_dataset), "--imgsz", "96",
                                 "--no-mlflow"])
    assert r.exit_code == 0, r.output
    assert "mAP50-95" in r.output and "per class" in r.output and "vehicle" in r.output
    r = CliRunner().invoke(app, ["sweep", str(tiny_model), "--data", str(tiny_dataset), "--imgsz", "96",
                                 "--conf", "0.3", "--conf", "0.4", "--iou", "0.5", "--no-mlflow",
                                 "--out", str(tmp_path / "sw")])
    assert r.exit_code == 0, r.output
    assert "operating point: conf=" in r.output
    assert (tmp_path / "sw" / "sweep.csv").read_text().count("\n") == 3
