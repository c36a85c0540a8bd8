"""Explanations on an untrained YOLOv8n-seg (built from YAML, no training): mechanics and maths.

At ``conf=0`` an untrained model still "detects" (every anchor passes), which is enough to
check the per-instance plumbing: anchors, layers per stride, heatmap shapes, overlays, CLI.
The trained-model sanity check lives in ``test_explain_trained.py``.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from damage.tasks.core.config import CLASSES, ExplainConfig
from damage.tasks.core.errors import DamageError
from damage.tasks.evaluation.cam_methods import eigencam_map, gradcam_map
from damage.tasks.evaluation.explain import (
    box_mass_share,
    explain_image,
    explain_to_dir,
    head_layers,
    load_model,
    make_grid,
    pick_explain_samples,
    resolve_layer,
)

IMGSZ = 64


@pytest.fixture(scope="module")
def raw_model(state_paths, tmp_path_factory):
    """Untrained yolov8n-seg saved as an Ultralytics-style checkpoint (model + train_args)."""
    from ultralytics.nn.tasks import SegmentationModel

    torch.manual_seed(0)
    net = SegmentationModel("yolov8n-seg.yaml", nc=len(CLASSES), verbose=False)
    net.names = dict(enumerate(CLASSES))
    net.args = {"imgsz": IMGSZ}
    path = tmp_path_factory.mktemp("explain_raw") / "raw.pt"
    torch.save({"model": net, "train_args": {"imgsz": IMGSZ}}, path)
    return path


@pytest.fixture(scope="module")
def image():
    """A 80x100 (non-square: exercises the letterbox undo) image with a bright blob."""
    rng = np.random.default_rng(0)
    img = rng.integers(60, 120, (80, 100, 3), dtype=np.uint8)
    cv2.rectangle(img, (20, 30), (60, 60), (40, 200, 230), -1)
    return img


def test_gradcam_map_is_weighted_activation_relu():
    act = torch.zeros(2, 3, 3)
    act[0, 0, 0] = 1.0  # channel 0 fires top-left
    act[1, 2, 2] = 1.0  # channel 1 fires bottom-right
    grad = torch.zeros(2, 3, 3)
    grad[0] = 1.0  # class score grows with channel 0
    grad[1] = -1.0  # ... and shrinks with channel 1
    cam = gradcam_map(act, grad)
    assert cam[0, 0] > 0
    assert cam[2, 2] == 0  # negative evidence is cut by the ReLU
    assert cam.shape == (3, 3)


def test_eigencam_sign_follows_activation():
    h = w = 6
    blob = torch.zeros(h, w)
    blob[1:3, 1:3] = 1.0
    act = torch.stack([blob * s for s in (1.0, 2.0, 0.5, 3.0)]) + 0.01 * torch.randn(4, h, w)
    cam = eigencam_map(act)
    assert cam[1:3, 1:3].mean() > 5 * cam[4:, 4:].mean()  # the map is high where activations are


def test_box_mass_share():
    heat = np.zeros((100, 100), np.float32)
    heat[10:20, 10:20] = 1.0
    share, area = box_mass_share(heat, [10, 10, 20, 20], dilate=0.0)
    assert share == pytest.approx(1.0) and area == pytest.approx(0.01)
    share, area = box_mass_share(heat, [50, 50, 90, 90], dilate=0.0)
    assert share == 0.0 and area == pytest.approx(0.16)
    assert box_mass_share(np.zeros((10, 10), np.float32), [0, 0, 5, 5])[0] == 0.0


def test_layers_and_errors(raw_model, image):
    net = load_model(raw_model)
    assert head_layers(net) == ["model.15", "model.18", "model.21"]  # YOLOv8-seg neck outputs, strides 8/16/32
    assert resolve_layer(net, "21") == resolve_layer(net, "model.21") == "model.21"
    with pytest.raises(DamageError, match="not found"):
        resolve_layer(net, "model.99")
    with pytest.raises(DamageError, match="unknown explain method"):
        explain_image(net, image, method="lime")
    with pytest.raises(DamageError, match="model file not found"):
        load_model(raw_model.parent / "missing.pt")
    with pytest.raises(DamageError, match="not a readable image"):
        bad = raw_model.parent / "bad.png"
        bad.write_bytes(b"not a png")
        explain_image(net, bad)
    with pytest.raises(DamageError, match="not a B x C x H x W"):
        explain_image(net, image, layer="model.22", conf=0.0)  # the head outputs tuples


def test_gradcam_per_instance(raw_model, image):
    exps = explain_image(raw_model, image, method="gradcam", conf=0.0, iou=0.5, max_instances=6)
    assert 2 <= len(exps) <= 6
    for e in exps:
        assert e.heatmap.shape == image.shape[:2] and e.heatmap.dtype == np.float32
        assert e.mask.shape == image.shape[:2] and e.mask.dtype == bool
        assert 0.0 <= e.heatmap.min() and e.heatmap.max() <= 1.0
        assert e.layer == {8: "model.15", 16: "model.18", 32: "model.21"}[e.stride]
    assert [e.score for e in exps] == sorted((e.score for e in exps), reverse=True)
    # different anchors -> different backpropagated scores -> different heatmaps
    assert len({e.anchor for e in exps}) == len(exps)
    nonzero = [e for e in exps if e.heatmap.max() > 0]
    assert len(nonzero) >= 2
    assert any(not np.allclose(a.heatmap, b.heatmap, atol=1e-3) for a in nonzero for b in nonzero if a is not b)


def test_layer_override_and_eigencam(raw_model, image):
    grad = explain_image(raw_model, image, method="gradcam", layer="18", conf=0.0, max_instances=3)
    assert {e.layer for e in grad} == {"model.18"}
    eig = explain_image(raw_model, image, method="eigencam", layer="18", conf=0.0, max_instances=3)
    assert {e.layer for e in eig} == {"model.18"} and {e.method for e in eig} == {"eigencam"}
    assert eig[0].heatmap.max() == pytest.approx(1.0)
    # EigenCAM depends on the layer only: every instance shares the map
    assert all(np.array_equal(eig[0].heatmap, e.heatmap) for e in eig)
    assert not np.allclose(eig[0].heatmap, grad[0].heatmap, atol=1e-3)


def test_explain_to_dir_writes_overlays(raw_model, image, tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    cv2.imwrite(str(src / "car_a.png"), image)
    cv2.imwrite(str(src / "car_b.jpg"), image[:, ::-1])
    files = explain_to_dir(raw_model, sorted(src.iterdir()), tmp_path / "out", conf=0.0, max_instances=2)
    for stem in ("car_a", "car_b"):
        d = tmp_path / "out" / stem
        info = json.loads((d / "explanations.json").read_text())
        grid = cv2.imread(str(d / "grid.png"))
        tile = cv2.imread(str(d / f"00_{info['instances'][0]['class']}.png"))
        assert tile is not None and min(tile.shape[:2]) >= 320  # small images are upscaled for legibility
        assert grid.shape[0] >= tile.shape[0] and grid.shape[1] >= 2 * tile.shape[1]  # summary + 2 overlays
        assert len(info["instances"]) == 2 and info["method"] == "gradcam"
    assert all(f.exists() for f in files)
    assert not list((tmp_path / "out").rglob("*.tmp"))  # atomic writes leave no temp files
    # a rerun into the same folder with fewer instances leaves no stale overlays behind
    explain_to_dir(raw_model, [src / "car_a.png"], tmp_path / "out", conf=0.0, max_instances=1)
    assert len(list((tmp_path / "out" / "car_a").glob("[0-9][0-9]_*.png"))) == 1


def test_make_grid_layout():
    tiles = [np.full((10, 20, 3), i * 40, np.uint8) for i in range(5)]
    g = make_grid(tiles, gap=2)
    assert g.shape == (2 * 10 + 2, 3 * 20 + 2 * 2, 3)  # 5 tiles -> 3 columns, 2 rows
    assert (g[:10, 22:42] == 40).all()


def test_pick_explain_samples_is_fixed(tiny_dataset):
    a = pick_explain_samples(tiny_dataset, 4, seed=0)
    assert a == pick_explain_samples(tiny_dataset, 4, seed=0)
    assert len(a) == 4 and all(p.exists() and "val" in p.parts for p in a)
    assert pick_explain_samples(tiny_dataset, 2, seed=0) == a[:2]  # smaller n is a prefix
    assert pick_explain_samples(tiny_dataset, 4, seed=1) != a
    assert len(pick_explain_samples(tiny_dataset, 1000, seed=0)) == 6  # 24 images * 0.25 val
    with pytest.raises(Exception, match="data.yaml not found"):
        pick_explain_samples(tiny_dataset.parent / "nope.yaml", 2)


def test_explain_step_logs_to_mlflow(raw_model, image, tmp_path, state_paths):
    from damage.tasks.core import tracking
    from damage.tasks.evaluation.explain import explain_step

    src = tmp_path / "val_0001.png"
    cv2.imwrite(str(src), image)
    c = tracking.client()
    exp = tracking.ensure_experiment(c, "explain-test")
    parent = tracking.start_run(c, exp, "nightly-test")
    cfg = ExplainConfig(conf=0.0, max_instances=2)
    files = explain_step(raw_model, [src], cfg, IMGSZ, parent, out_dir=tmp_path / "out")
    tracking.end_run(c, parent)
    children = c.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert [r.info.run_name for r in children] == ["explain"]
    child = children[0]
    assert child.data.metrics["instances/val_0001"] == 2
    logged = {a.path for a in c.list_artifacts(child.info.run_id, "val_0001")}
    assert "val_0001/grid.png" in logged and "val_0001/explanations.json" in logged
    assert len(files) == 4  # 2 overlays + grid + json


def test_cli_writes_pngs(raw_model, image, tmp_path, state_paths):
    from typer.testing import CliRunner

    from damage.flows.cli import app

    src = tmp_path / "one.png"
    cv2.imwrite(str(src), image)
    out = tmp_path / "cli_out"
    res = CliRunner().invoke(app, ["explain", str(src), "--model", str(raw_model), "--out", str(out),
                                   "--conf", "0", "--max-instances", "2", "--method", "eigencam",
                                   "--state-dir", str(state_paths.root)])
    assert res.exit_code == 0, res.output
    assert len(list((out / "one").glob("*.png"))) == 3  # 2 instances + grid
    assert "eigencam" in res.output
    bad = CliRunner().invoke(app, ["explain", str(src), "--model", str(raw_model), "--out", str(out),
                                   "--layer", "model.99", "--state-dir", str(state_paths.root)])
    assert bad.exit_code == 2 and "model.99" in bad.output
