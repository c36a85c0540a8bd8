"""Every model family through the pipeline: train -> export (parity gate) -> predict -> register,
the predictor against Ultralytics' own ONNX predict (tests/parity.py, on a model per family that detects:
the easy set's ``detecting_model``), YOLO26's end-to-end export, INT8 with the
head decode kept float, structured pruning, distillation across families, and explanations.

One 1-epoch model per family on a 16-image 64 px dataset (session scope), shared by every test.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tests.parity import (
    RAW_ATOL,
    assert_matches_ultralytics,
    assert_same_decoding,
    assert_same_raw_outputs,
    candidate_scores,
    conf_in_widest_gap,
    with_odd_aspect_ratios,
)

FAMILIES = ["yolov8n-seg", "yolo11n-seg", "yolo26n-seg"]
IMGSZ = 64


@pytest.fixture(scope="session")
def fam_dataset(state_paths, tmp_path_factory) -> Path:
    from damage.tasks.data.synth import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("fam_synth") / "ds", images=16, seed=3, imgsz=IMGSZ,
                            val_fraction=0.25)


@pytest.fixture(scope="session")
def fam_models(fam_dataset, tmp_path_factory) -> dict[str, Path]:
    """One best.pt per family, 1 epoch from scratch at 64 px (trained on first use)."""
    return {}


def _trained(name: str, fam_models: dict[str, Path], data: Path, tmp_path_factory) -> Path:
    from damage.tasks.core.config import TrainConfig
    from damage.tasks.training.train import train_model

    if name not in fam_models:
        cfg = TrainConfig(plots=False, model=name, epochs=1, imgsz=IMGSZ, batch=8, patience=0, augment="light")
        out = tmp_path_factory.mktemp(f"train_{name}")
        fam_models[name] = train_model(data, cfg, out, seed=0, extra_args={"plots": False}).best
    return fam_models[name]


@pytest.fixture(scope="session", params=FAMILIES)
def family(request, fam_models, fam_dataset, tmp_path_factory) -> tuple[str, Path]:
    return request.param, _trained(request.param, fam_models, fam_dataset, tmp_path_factory)


@pytest.fixture(scope="session")
def exported(family, state_paths) -> dict:
    """``export_step`` of each family's model (export + parity gate + nested MLflow run)."""
    return {}


def _export(family, cache: dict):
    from damage.tasks.core import tracking
    from damage.tasks.core.config import ExportConfig
    from damage.tasks.export.onnx import export_step

    name, best = family
    if name not in cache:
        c = tracking.client()
        parent = tracking.start_run(c, tracking.ensure_experiment(c, "families-test"), f"parent-{name}")
        res = export_step(best, ExportConfig(parity_images=3), IMGSZ, {"conf": 0.3, "iou": 0.6},
                          {"dataset_fingerprint": "fp", "source_run_id": parent}, [], parent)
        tracking.end_run(c, parent)
        cache[name] = (res, parent)
    return cache[name]


@pytest.fixture(scope="session")
def images(fam_dataset, tmp_path_factory) -> list[Path]:
    """Val images plus resized copies with other aspect ratios."""
    val = sorted((fam_dataset.parent / "images" / "val").glob("*.png"))
    return with_odd_aspect_ratios(val, tmp_path_factory.mktemp("fam_odd"), [(100, 64), (57, 90)])


# ----------------------------------------------------------------------------- names


def test_family_is_read_from_the_trained_checkpoint(family):
    from ultralytics import YOLO

    from damage.tasks.core.families import family_name

    name, best = family
    assert family_name(YOLO(str(best)).model) == name.split("n-seg")[0]


# ----------------------------------------------------------------------------- export, parity, predictor


def test_export_parity_per_family(family, exported):
    from damage.tasks.export.onnx import parity_check, read_onnx_metadata

    res, _ = _export(family, exported)
    assert res.parity.passed
    assert res.parity.figures["det_max_abs"] <= 1e-3 and res.parity.figures["proto_max_abs"] <= 1e-3
    assert read_onnx_metadata(res.onnx_path)["imgsz"] == [IMGSZ, IMGSZ]
    again = parity_check(family[1], res.onnx_path, 2, IMGSZ, atol=1e-3)  # the gate, on other images
    assert again.passed and again.images == 2


@pytest.fixture(scope="session")
def easy_images(easy_dataset, tmp_path_factory) -> list[Path]:
    """The easy set's val images (64 px) plus resized copies with other aspect ratios."""
    val = sorted((easy_dataset.parent / "images" / "val").glob("*.png"))
    return with_odd_aspect_ratios(val, tmp_path_factory.mktemp("fam_easy_odd"), [(100, 64), (57, 90)])


@pytest.fixture(scope="session")
def detecting_onnx(detecting_model, easy_imgsz, tmp_path_factory):
    """Factory ``detecting_onnx(family, end2end=False)``: the family's model that detects, exported once."""
    from damage.tasks.export.onnx import export_onnx

    cache: dict[tuple[str, bool], Path] = {}

    def get(name: str, end2end: bool = False) -> Path:
        if (name, end2end) not in cache:
            out = tmp_path_factory.mktemp("fam_detecting") / f"{name}{'-e2e' if end2end else ''}.onnx"
            cache[name, end2end] = export_onnx(detecting_model(name), out, easy_imgsz, end2end=end2end)
        return cache[name, end2end]

    return get


def _assert_predictor_is_ultralytics(onnx: Path, images: list[Path]) -> None:
    """The three checks of tests/parity.py on a model that detects: raw tensors, decoding of one raw output,
    end to end at the middle of the widest score gap; every image keeps an instance."""
    from damage.tasks.serving.predictor import Predictor

    assert assert_same_raw_outputs(onnx, images) <= RAW_ATOL
    conf = conf_in_widest_gap(candidate_scores(Predictor(onnx), images))
    assert assert_same_decoding(onnx, images, conf) >= len(images)
    assert assert_matches_ultralytics(onnx, images, conf) >= len(images)


def test_two_sessions_give_the_same_raw_outputs_per_family(family, exported, images):
    """Our ORT session vs Ultralytics' on each family's 1-epoch model: nothing is thresholded."""
    res, _ = _export(family, exported)
    assert assert_same_raw_outputs(res.onnx_path, images) <= RAW_ATOL


# YOLOv8's model that detects is the session's `trained_model` (no extra training). YOLO11's export has YOLOv8's
# output layout (the same decoding path) and YOLO26's 20-epoch model trains ~70 s on 2 cores: both only run with
# the slow tests (the default run checks YOLO26's raw outputs and decoding on its 1-epoch model).
DETECTING = ["yolov8n-seg", pytest.param("yolo11n-seg", marks=pytest.mark.slow),
             pytest.param("yolo26n-seg", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", DETECTING)
def test_predictor_matches_ultralytics_onnx_predict_per_family(name, detecting_onnx, easy_images):
    _assert_predictor_is_ultralytics(detecting_onnx(name), easy_images)


def test_train_export_predict_register_per_family(family, exported, images, tmp_path):
    """The end-to-end chain per family: the registered ONNX, downloaded, predicts what was exported."""
    from ultralytics import YOLO

    import damage.model_registry as mr
    from damage.model_registry.steps import version_lineage
    from damage.tasks.core import tracking
    from damage.tasks.core.families import family_name
    from damage.tasks.export.onnx import read_onnx_metadata
    from damage.tasks.serving.predictor import Predictor

    name, best = family
    res, parent = _export(family, exported)
    ours = Predictor(res.onnx_path, conf=0.0001).predict(images[:2])
    c = tracking.client()

    class _Run:  # what version_lineage reads of the pipeline run
        run_id = parent

        @staticmethod
        def lineage(fp):
            return {"dataset_fingerprint": fp, "config_hash": "h", "code_version": "c"}

    # the exported file names its family; the nightly's lineage tags copy it onto the version
    assert read_onnx_metadata(res.onnx_path)["family"] == family_name(YOLO(str(best)).model)
    lineage = version_lineage(_Run, "fp", {"onnx": res.onnx_path, "kind": "trained"})
    v = mr.register_candidate(c, f"fam-{name}", parent, res.onnx_path, best, {"mask/mAP50": 0.0},
                              {"conf": 0.3, "iou": 0.6}, lineage)
    assert v.tags["model.family"] == name.split("n-seg")[0] and v.approval == "pending"
    local = mr.download_onnx(c, f"fam-{name}", v.version, tmp_path)
    theirs = Predictor(local, conf=0.0001).predict(images[:2])
    assert [len(p.instances) for p in theirs] == [len(p.instances) for p in ours]
    assert all(p.damage is not None for p in theirs)
    for a, b in zip(ours, theirs, strict=True):
        for x, y in zip(a.instances, b.instances, strict=True):
            assert (x.cls, x.area_px) == (y.cls, y.area_px) and np.array_equal(x.mask, y.mask)


# ----------------------------------------------------------------------------- YOLO26 end-to-end


@pytest.fixture(scope="session")
def yolo26_end2end(fam_models, fam_dataset, tmp_path_factory) -> tuple[Path, Path]:
    from damage.tasks.export.onnx import export_onnx

    best = _trained("yolo26n-seg", fam_models, fam_dataset, tmp_path_factory)
    out = tmp_path_factory.mktemp("e2e") / "yolo26-e2e.onnx"
    return best, export_onnx(best, out, IMGSZ, metadata={"conf": 0.3}, end2end=True)


def test_yolo26_end2end_export_parity_and_predictor(yolo26_end2end, images):
    from damage.tasks.export.onnx import parity_check
    from damage.tasks.serving.predictor import Predictor

    best, onnx = yolo26_end2end
    pred = Predictor(onnx)
    assert pred.end2end and not pred.rect
    det, proto = pred.infer(pred.preprocess([cv2.imread(str(images[0]))]))
    assert det.ndim == 3 and det.shape[2] == 6 + proto.shape[1]  # rows: box, score, class, coefficients
    res = parity_check(best, onnx, 3, IMGSZ, atol=1e-3)
    assert res.passed and res.figures["det_max_abs"] <= 1e-3
    assert assert_same_raw_outputs(onnx, images) <= RAW_ATOL


@pytest.mark.slow  # YOLO26's model that detects trains ~70 s on 2 cores (the suite's 15-minute budget)
def test_yolo26_end2end_predictor_matches_ultralytics_on_a_detecting_model(detecting_onnx, easy_images):
    from damage.tasks.serving.predictor import Predictor

    detecting = detecting_onnx("yolo26n-seg", end2end=True)
    assert Predictor(detecting).end2end
    _assert_predictor_is_ultralytics(detecting, easy_images)


def test_end2end_parity_matching_catches_changes_and_ignores_order():
    from damage.tasks.export.onnx import _end2end_figures

    rng = np.random.default_rng(0)
    t = rng.random((1, 10, 6 + 4), dtype=np.float32)
    t[..., 4] = np.linspace(0.9, 0.1, 10)
    t[..., 5] = rng.integers(0, 3, 10)
    assert _end2end_figures(t, t[:, ::-1].copy(), 64, 1e-3)["det_max_abs"] == 0  # order is not a difference
    bad = t.copy()
    bad[0, 2, 7] += 0.01  # one mask coefficient of one row
    f = _end2end_figures(t, bad, 64, 1e-3)
    assert f["coef_max_abs"] == pytest.approx(0.01, rel=1e-3) and f["det_max_abs"] > 1e-3
    wrong_cls = t.copy()
    wrong_cls[0, 0, 5] = 7  # the top row changes class: it matches no row of its own
    assert _end2end_figures(t, wrong_cls, 64, 1e-3)["det_max_abs"] > 0.1
    top = t[:, :1].copy()  # every ONNX row a copy of the top row: the second PyTorch row has no partner
    assert _end2end_figures(t[:, :3], np.concatenate([top] * 3, 1), 64, 1e-3)["det_max_abs"] > 1e-3


def test_end2end_export_refused_for_families_without_the_head(fam_models, fam_dataset, tmp_path_factory, tmp_path):
    from damage.tasks.core.errors import DamageError
    from damage.tasks.export.onnx import export_onnx

    for name in ("yolov8n-seg", "yolo11n-seg"):
        best = _trained(name, fam_models, fam_dataset, tmp_path_factory)
        with pytest.raises(DamageError, match=rf"{name.split('n-seg')[0]} model has no NMS-free.*export step"):
            export_onnx(best, tmp_path / "x.onnx", IMGSZ, end2end=True)
        assert not (tmp_path / "x.onnx").exists()


# ----------------------------------------------------------------------------- INT8 static


def test_int8_static_keeps_head_decode_float_per_family(family, exported, fam_dataset, tmp_path):
    """The graph walk finds each family's decode (ends at convs), and INT8 scores stay close to FP32."""
    import onnx as onnx_lib
    import onnxruntime as ort

    from damage.tasks.export.calibration import calibration_images
    from damage.tasks.export.onnx_graph import head_postprocess_nodes
    from damage.tasks.export.quantize import quantize_onnx
    from damage.tasks.serving.predictor import Predictor

    res, _ = _export(family, exported)
    graph = onnx_lib.load(str(res.onnx_path))
    head = set(head_postprocess_nodes(graph))
    ops = {n.op_type for n in graph.graph.node if n.name in head}
    assert head and "Sigmoid" in ops and "Concat" in ops
    convs = [n for n in graph.graph.node if n.name in head and n.op_type == "Conv"]
    assert len(convs) <= 1  # at most the DFL expectation conv (YOLOv8/11; YOLO26 has reg_max=1)
    q = quantize_onnx(res.onnx_path, tmp_path / "q.onnx", "int8-static",
                      calib_images=calibration_images(fam_dataset, 4), imgsz=IMGSZ)
    qg = onnx_lib.load(str(q))
    assert any(n.op_type == "QuantizeLinear" for n in qg.graph.node)
    x = Predictor(res.onnx_path).preprocess([cv2.imread(str(calibration_images(fam_dataset, 1)[0]))])
    outs = {}
    for tag, f in (("fp32", res.onnx_path), ("int8", q)):
        s = ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
        outs[tag] = s.run(None, {s.get_inputs()[0].name: x})[0]
    nc = 7
    fs, qs = outs["fp32"][0, 4:4 + nc], outs["int8"][0, 4:4 + nc]
    assert qs.max() > 0  # one uint8 scale shared with pixel boxes would round every score to 0
    assert np.abs(fs - qs).max() < 0.1 * max(float(fs.max()), 1e-3) + 0.02
    assert np.abs(outs["fp32"][0, :4] - outs["int8"][0, :4]).max() < IMGSZ * 0.25  # boxes still in pixels


# ----------------------------------------------------------------------------- pruning


def _random_bn(m: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    for mod in m.modules():  # non-trivial BN statistics so equivalence is a real check
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.copy_(torch.rand(mod.num_features, generator=g) - 0.5)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    return m


@pytest.mark.parametrize("name", FAMILIES)
def test_split_free_twins_are_identical_per_family(state_paths, name):
    import copy

    from ultralytics.nn.modules.block import C2PSA, C2f, C3k2
    from ultralytics.nn.tasks import SegmentationModel

    from damage.tasks.training.prune import replace_c2f

    m = _random_bn(SegmentationModel(f"{name}.yaml", nc=7, verbose=False)).eval()
    twin = copy.deepcopy(m)
    n = replace_c2f(twin)
    assert n == sum(type(x) in (C2f, C3k2, C2PSA) for x in m.modules()) > 0
    assert not any(type(x) in (C2f, C3k2, C2PSA) for x in twin.modules())
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        (y0, p0), _ = m(x)
        (y1, p1), _ = twin(x)
    assert torch.allclose(y0, y1, atol=1e-5, rtol=1e-5) and torch.allclose(p0, p1, atol=1e-6)


def test_structured_pruning_per_family_trains_and_exports(family, fam_dataset, tmp_path):
    """Pruned: fewer params, same head outputs, an ONNX export; YOLO26 also a 1-epoch fine-tune (its loss
    runs the one-to-one head and Proto26's semantic branch, which the inference path never touches)."""
    import onnxruntime as ort

    from damage.tasks.core.config import TrainConfig
    from damage.tasks.export.onnx import export_onnx
    from damage.tasks.training.prune import count_params, finetune_pruned, load_model, prune_structured

    name, best = family
    path, rep = prune_structured(best, tmp_path / "pruned.pt", 0.3, imgsz=IMGSZ)
    assert rep.params_after < 0.9 * rep.params_before
    model, full = load_model(path), load_model(best)
    assert count_params(model) == rep.params_after
    x = torch.rand(2, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        (y, proto), _ = model(x)
        (y_full, proto_full), _ = full(x)
    assert y.shape == y_full.shape and proto.shape == proto_full.shape
    if name.startswith("yolo26"):
        # Only YOLO26 trains through layers its inference path never reaches (one-to-one head,
        # Proto26.semseg); YOLOv8's fine-tune is tests/model/test_prune.py's, YOLO11 has no such layer.
        ft = finetune_pruned(path, fam_dataset, TrainConfig(plots=False, epochs=1, imgsz=IMGSZ, batch=8, patience=0,
                                                            augment="light"), tmp_path / "ft")
        assert count_params(load_model(ft.best)) == rep.params_after  # fine-tuned, not rebuilt from the YAML
    onnx = export_onnx(path, tmp_path / "pruned.onnx", IMGSZ)
    sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: np.random.rand(1, 3, IMGSZ, IMGSZ).astype(np.float32)})
    assert [o.shape for o in outs] == [tuple(y[:1].shape), tuple(proto[:1].shape)]


# ----------------------------------------------------------------------------- distillation, explain


def test_distillation_across_families(fam_models, fam_dataset, tmp_path_factory, tmp_path):
    """A YOLO26 teacher (one-to-one head) distils into a YOLO11 student; the student is a YOLO11."""
    from ultralytics import YOLO

    from damage.tasks.core.config import DistillConfig, TrainConfig
    from damage.tasks.core.families import family_name
    from damage.tasks.training.distill import distill

    teacher = _trained("yolo26n-seg", fam_models, fam_dataset, tmp_path_factory)
    seen: list[dict] = []
    res = distill(teacher, fam_dataset, TrainConfig(plots=False, imgsz=IMGSZ, batch=8, patience=0, augment="light"),
                  DistillConfig(student="yolo11n-seg", epochs=1), tmp_path, on_epoch=lambda e, m: seen.append(m))
    assert family_name(YOLO(str(res.best)).model) == "yolo11"
    assert seen and "train/dis_loss" in seen[0] and seen[0]["train/dis_loss"] > 0 and "train/kd_loss" in seen[0]


def test_explain_per_family(family, images):
    from damage.tasks.evaluation.explain import explain_image, head_layers, load_model

    name, best = family
    exps = explain_image(best, images[0], method="gradcam", conf=0.0, imgsz=IMGSZ, max_instances=3)
    assert exps and all(e.layer in head_layers(load_model(best)) for e in exps)
    assert all(e.heatmap.shape == cv2.imread(str(images[0])).shape[:2] for e in exps)
    eig = explain_image(best, images[0], method="eigencam", conf=0.0, imgsz=IMGSZ, max_instances=3)
    assert eig and float(max(e.heatmap.max() for e in eig)) > 0


# ----------------------------------------------------------------------------- evaluation and sweep


def test_evaluate_and_sweep_per_family(family, fam_dataset, tmp_path):
    from damage.tasks.evaluation.evaluate import evaluate_model
    from damage.tasks.evaluation.sweep import sweep_thresholds

    name, best = family
    res = evaluate_model(best, fam_dataset, imgsz=IMGSZ)
    assert {"box/mAP50", "mask/mAP50", "mask/mAP50-95"} <= set(res.metrics)
    assert all(0 <= res.metrics[k] <= 1 for k in ("box/mAP50", "mask/mAP50"))
    sw = sweep_thresholds(best, fam_dataset, imgsz=IMGSZ, conf_grid=[0.001, 0.01], iou_grid=[0.5, 0.7],
                          out_dir=tmp_path)
    assert len(sw.rows) == 4 and sw.best["conf"] in (0.001, 0.01)


def test_evaluate_yolo26_end2end_onnx_matches_its_pt_head(yolo26_end2end, fam_dataset):
    """The evaluator reads an end-to-end export's rows (no NMS) instead of misreading them as anchors."""
    from damage.tasks.evaluation.evaluate import collect

    best, onnx = yolo26_end2end
    col = collect(onnx, fam_dataset, imgsz=IMGSZ, ious=(0.7,), conf_floor=0.0)
    n_dets = [len(s.conf) for s in col.map_scores[0.7]]
    assert col.model_format == "onnx" and len(n_dets) == 4
    # every one of the graph's k = 84 rows (all anchors at 64 px) is a detection; read as NMS input
    # (38 "anchors" of 84 channels) the count would be at most 38
    assert n_dets == [84] * 4
