"""Export + parity gate, and the ONNX Runtime predictor against Ultralytics on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from tasks.core.config import CLASSES

IMGSZ = 96
BACKENDS = ("onnxruntime", "openvino")
SCHEMA_TOP = {"image", "width", "height", "model", "conf", "iou", "instances", "vehicles", "damage_percent", "note"}
SCHEMA_INST = {"id", "class", "score", "box", "area_px", "polygon", "vehicle_id"}
SCHEMA_VEH = {"id", "area_px", "damage_px", "damage_percent", "by_class"}


@pytest.fixture(scope="module")
def exported(tiny_model, state_paths):
    """``export_step`` (export + parity gate + MLflow) on the tiny model; its ONNX is reused below."""
    from tasks.core import tracking
    from tasks.core.config import ExportConfig
    from tasks.export.onnx import export_step

    c = tracking.client()
    parent = tracking.start_run(c, tracking.ensure_experiment(c, "export-test"), "parent")
    res = export_step(tiny_model, ExportConfig(parity_images=2), IMGSZ,
                      {"conf": 0.4, "iou": 0.55, "objective": "mask_f1"},
                      {"dataset_fingerprint": "fp-test", "source_run_id": "run-test"}, [], parent)
    tracking.end_run(c, parent)
    return res, parent


@pytest.fixture(scope="module")
def onnx_model(exported) -> Path:
    return exported[0].onnx_path


def test_export_step_logs_nested_run(exported, tiny_model):
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from tasks.core import tracking
    res, parent = exported
    assert res.onnx_path == tiny_model.with_suffix(".onnx") and res.parity.passed
    c = tracking.client()
    run = c.get_run(res.run_id)
    assert run.data.tags[MLFLOW_PARENT_RUN_ID] == parent and run.info.status == "FINISHED"
    assert run.data.metrics["parity/det_max_abs"] == pytest.approx(res.parity.figures["det_max_abs"])
    assert "parity/proto_max_abs" in run.data.metrics
    arts = {a.path for a in c.list_artifacts(res.run_id, "onnx")}
    assert f"onnx/{res.onnx_path.name}" in arts and "onnx/metadata.json" in arts
    # the runtime choice: both runtimes timed on this machine, the faster one recorded and logged
    lat = {k: run.data.metrics[f"latency/{k}_ms"] for k in BACKENDS}
    assert all(v > 0 for v in lat.values())
    assert res.metadata["backend_latency_ms"] == pytest.approx(lat, abs=1e-3)
    assert res.metadata["preferred_backend"] == min(lat, key=lat.get) == run.data.tags["preferred_backend"]


@pytest.fixture(scope="module")
def images(tiny_dataset, tmp_path_factory) -> list[Path]:
    """Val images plus resized copies with other aspect ratios."""
    val = sorted((tiny_dataset.parent / "images" / "val").glob("*.png"))[:4]
    d = tmp_path_factory.mktemp("odd")
    odd = []
    for i, (w, h) in enumerate([(150, 96), (187, 85), (70, 130)]):
        im = cv2.resize(cv2.imread(str(val[i % len(val)])), (w, h))
        p = d / f"odd{i}.png"
        cv2.imwrite(str(p), im)
        odd.append(p)
    return val + odd


def test_export_metadata_and_no_leftovers(onnx_model, tiny_model):
    from tasks.export.onnx import read_onnx_metadata
    from tasks.serving.predictor import read_metadata

    md = read_onnx_metadata(onnx_model)
    assert md["names"] == CLASSES
    assert md["imgsz"] == [IMGSZ, IMGSZ] and md["stride"] == 32 and md["task"] == "segment"
    assert (md["conf"], md["iou"], md["objective"]) == (0.4, 0.55, "mask_f1")
    assert md["dataset_fingerprint"] == "fp-test" and md["source_run_id"] == "run-test"
    full = read_metadata(onnx_model)  # what the predictor sees, Ultralytics' keys included
    assert full["names"] == CLASSES and full["imgsz"] == [IMGSZ, IMGSZ]
    leftovers = [p.name for p in onnx_model.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_parity_gate_passes_then_fails_on_tampered_model(onnx_model, tiny_model, tmp_path):
    import onnx
    from onnx import numpy_helper

    from tasks.core.errors import GateFailed
    from tasks.export.onnx import parity_check

    res = parity_check(tiny_model, onnx_model, 3, IMGSZ, atol=1e-3)
    assert res.passed and res.images == 3
    assert res.figures["det_max_abs"] <= 1e-3 and res.figures["proto_max_abs"] <= 1e-3
    assert res.figures["det_mean_abs"] <= res.figures["det_max_abs"]

    # a broken export: every raw detection shifted by 0.01 (a barely trained model may ignore
    # weight changes, an output offset it cannot)
    m = onnx.load(str(onnx_model))
    for node in m.graph.node:
        node.output[:] = ["output0_raw" if o == "output0" else o for o in node.output]
        node.input[:] = ["output0_raw" if i == "output0" else i for i in node.input]
    m.graph.initializer.append(numpy_helper.from_array(np.array(0.01, np.float32), "tamper_offset"))
    m.graph.node.append(onnx.helper.make_node("Add", ["output0_raw", "tamper_offset"], ["output0"]))
    bad = tmp_path / "tampered.onnx"
    onnx.save(m, str(bad))
    with pytest.raises(GateFailed, match="max abs"):
        parity_check(tiny_model, bad, 2, IMGSZ, atol=1e-3)


def _conf_with_instances(pred, paths: list[Path], k: int = 40) -> float:
    """A confidence that leaves instances on every image even for a barely trained model."""
    tops = []
    for p in paths:
        det, _ = pred.infer(pred.preprocess([cv2.imread(str(p))]))
        s = det[0, 4:4 + len(pred.names)].max(0)
        tops.append(np.sort(s)[-min(k, len(s))])
    return float(min(tops)) * 0.999


@pytest.mark.parametrize("backend", BACKENDS)
def test_predictor_matches_ultralytics_onnx_predict(onnx_model, images, backend):
    from ultralytics import YOLO

    from tasks.serving.predictor import Predictor

    pred = Predictor(onnx_model, iou=0.7, backend=backend)
    assert pred.backend == backend
    conf = _conf_with_instances(pred, images)
    pred.conf = conf
    ul = YOLO(str(onnx_model), task="segment")
    matched = 0
    for p in images:
        ours = pred.predict(p)[0]
        ref = ul.predict(str(p), conf=conf, iou=0.7, imgsz=IMGSZ, retina_masks=True, verbose=False)[0]
        n_ref = 0 if ref.boxes is None else len(ref.boxes)
        assert len(ours.instances) == n_ref, p.name
        if not n_ref:
            continue
        rb, rc = ref.boxes.xyxy.numpy(), ref.boxes.cls.numpy().astype(int)
        rm = ref.masks.data.numpy().astype(bool)
        assert rm.shape[1:] == (ours.height, ours.width)
        for k, inst in enumerate(ours.instances):
            assert inst.cls == rc[k], (p.name, k)
            np.testing.assert_allclose(inst.box, rb[k], atol=0.05)
            union = (inst.mask | rm[k]).sum()
            iou = (inst.mask & rm[k]).sum() / union if union else 1.0
            assert iou >= 0.98, (p.name, k, iou)
            assert inst.area_px == int(inst.mask.sum())
            matched += 1
    assert matched >= len(images)


def test_batch_is_one_run_and_equals_single(onnx_model, images):
    from tasks.serving.predictor import Predictor

    pred = Predictor(onnx_model)
    assert pred.dynamic_batch
    pred.conf = _conf_with_instances(pred, images[:4])
    same = images[:4]  # the val images share one size
    singles = [pred.predict(p)[0] for p in same]
    calls = []
    real_run = pred.runtime.run
    pred.runtime.run = lambda batch: calls.append(batch.shape) or real_run(batch)
    batch = pred.predict(same)
    assert calls == [(4, 3, IMGSZ, IMGSZ)]
    for a, b in zip(singles, batch, strict=True):
        assert [i.cls for i in a.instances] == [i.cls for i in b.instances]
        for x, y in zip(a.instances, b.instances, strict=True):
            assert abs(x.score - y.score) < 1e-4
            assert (x.mask ^ y.mask).sum() <= 0.01 * max(x.area_px, 1)


def test_no_detection_and_json_schema(onnx_model, images):
    from tasks.serving.predictor import Predictor

    pred = Predictor(onnx_model, conf=0.999999)
    assert (pred.iou, pred.imgsz) == (0.55, (IMGSZ, IMGSZ))  # iou from the metadata
    res = pred.predict(images[0])[0]
    doc = res.to_dict(str(images[0]), str(onnx_model), pred.conf, pred.iou)
    assert set(doc) == SCHEMA_TOP
    assert doc["instances"] == [] and doc["damage_percent"] is None and "no vehicle" in doc["note"]
    json.dumps(doc)

    low = Predictor(onnx_model)
    low.conf = _conf_with_instances(low, images)
    doc = low.predict(images[-1])[0].to_dict("x.png", "m.onnx", low.conf, low.iou)
    assert set(doc) == SCHEMA_TOP and doc["instances"]
    for inst in doc["instances"]:
        assert set(inst) == SCHEMA_INST and len(inst["box"]) == 4 and inst["class"] in CLASSES
    for v in doc["vehicles"]:
        assert set(v) == SCHEMA_VEH
    json.dumps(doc)


def test_cli_predict_folder_with_a_broken_image(onnx_model, images, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    src = tmp_path / "in"
    src.mkdir()
    for p in images[:2]:
        (src / p.name).write_bytes(p.read_bytes())
    (src / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["predict", str(src), "--model", str(onnx_model), "--out", str(out), "--conf", "0.0001"])
    assert r.exit_code == 1, r.output
    for p in images[:2]:
        doc = json.loads((out / f"{p.stem}.json").read_text())
        assert set(doc) == SCHEMA_TOP and doc["conf"] == 0.0001
        overlay = cv2.imread(str(out / f"{p.stem}.png"))
        assert overlay is not None and overlay.shape[:2] == (doc["height"], doc["width"])
    err = json.loads((out / "broken.json").read_text())
    assert "not a readable image" in err["error"]


def test_cli_export_opset12_static_and_parity(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app
    from tasks.serving.predictor import Predictor

    out = tmp_path / "m12.onnx"
    r = CliRunner().invoke(app, ["export", str(tiny_model), "--out", str(out), "--imgsz", "64", "--opset", "12",
                                 "--no-dynamic"])
    assert r.exit_code == 0, r.output
    assert "parity gate passed" in r.output
    import onnx

    m = onnx.load(str(out))
    assert {o.version for o in m.opset_import if o.domain in ("", "ai.onnx")} == {12}
    pred = Predictor(out)
    assert not pred.dynamic_batch and pred.imgsz == (64, 64)
    assert len(pred.predict([np.zeros((50, 90, 3), np.uint8)] * 2)) == 2  # static batch: one run per image


# --- the second runtime: OpenVINO reads the same files -------------------------------------------


def _assert_same_detections(a, b, where: str, box_atol: float = 0.05, min_iou: float = 0.98) -> int:
    """The parity rule between two predictions of one image: same instances in order, same classes,
    boxes within ``box_atol`` px, mask IoU >= ``min_iou``; returns the number of instances."""
    assert len(a.instances) == len(b.instances), where
    for k, (x, y) in enumerate(zip(a.instances, b.instances, strict=True)):
        assert x.cls == y.cls, (where, k)
        np.testing.assert_allclose(x.box, y.box, atol=box_atol, err_msg=f"{where} #{k}")
        union = (x.mask | y.mask).sum()
        iou = (x.mask & y.mask).sum() / union if union else 1.0
        assert iou >= min_iou, (where, k, iou)
    return len(a.instances)


def test_openvino_fp32_gives_the_same_detections_as_onnxruntime(onnx_model, images):
    from tasks.serving.predictor import Predictor

    ort_pred = Predictor(onnx_model, iou=0.7, backend="onnxruntime")
    ov_pred = Predictor(onnx_model, iou=0.7, backend="openvino")
    assert (ort_pred.imgsz, ort_pred.dynamic_batch, ort_pred.names) == (ov_pred.imgsz, ov_pred.dynamic_batch,
                                                                        ov_pred.names)
    ort_pred.conf = ov_pred.conf = _conf_with_instances(ort_pred, images)
    x = ort_pred.preprocess([cv2.imread(str(images[0]))])
    for a, b in zip(ort_pred.infer(x), ov_pred.infer(x), strict=True):
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-3
    n = sum(_assert_same_detections(ort_pred.predict(p)[0], ov_pred.predict(p)[0], p.name) for p in images)
    assert n >= len(images)


@pytest.fixture(scope="module")
def int8_model(onnx_model, tiny_dataset, tmp_path_factory) -> Path:
    """A QDQ INT8 (static, per-channel) copy of the exported model."""
    from tasks.export.quantize import calibration_images, quantize_onnx

    calib = calibration_images(tiny_dataset, 4, seed=0)
    return quantize_onnx(onnx_model, tmp_path_factory.mktemp("int8") / "int8.onnx", "int8-static",
                         calib_images=calib, imgsz=IMGSZ)


def test_openvino_int8_qdq_gives_the_same_detections_as_onnxruntime(int8_model, images):
    from tasks.serving.predictor import Predictor

    ort_pred = Predictor(int8_model, iou=0.7, backend="onnxruntime")
    ov_pred = Predictor(int8_model, iou=0.7, backend="openvino")
    ort_pred.conf = ov_pred.conf = _conf_with_instances(ort_pred, images)
    n = sum(_assert_same_detections(ort_pred.predict(p)[0], ov_pred.predict(p)[0], p.name) for p in images)
    assert n >= len(images)


def test_openvino_missing_falls_back_to_onnxruntime(onnx_model, tmp_path, monkeypatch, caplog):
    """``auto`` on a model whose export preferred OpenVINO, on a machine without it: one line, then ORT."""
    import logging
    import shutil
    import sys

    from tasks.core.errors import DamageError
    from tasks.export.onnx import update_onnx_metadata
    from tasks.serving import backends
    from tasks.serving.predictor import Predictor

    m = tmp_path / "prefers_ov.onnx"
    shutil.copyfile(onnx_model, m)
    update_onnx_metadata(m, {"preferred_backend": "openvino"})
    assert Predictor(m).backend == "openvino"  # installed: auto follows the metadata

    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    backends.openvino_available.cache_clear()
    backends.warn_openvino_missing.cache_clear()
    monkeypatch.setattr(backends, "openvino_available", backends.openvino_available.__wrapped__)
    with caplog.at_level(logging.WARNING, logger=backends.__name__):
        preds = [Predictor(m) for _ in range(2)]
    assert [p.backend for p in preds] == ["onnxruntime"] * 2
    lines = [r.getMessage() for r in caplog.records if r.name == backends.__name__]
    assert lines == [backends.OPENVINO_MISSING], lines  # once, however many predictors
    assert len(preds[0].predict(np.zeros((60, 90, 3), np.uint8))) == 1  # the ORT path runs
    with pytest.raises(DamageError, match="OpenVINO is not installed"):
        Predictor(m, backend="openvino")
    with pytest.raises(DamageError, match="unknown predictor backend"):
        Predictor(m, backend="tensorrt")
    backends.warn_openvino_missing.cache_clear()
