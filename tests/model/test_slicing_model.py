"""Sliced and unsliced inference of a real (tiny) ONNX model on a 640-px synthetic whole-vehicle scene.

Slicing off must be today's predictor (which matches Ultralytics' predict exactly); sliced, every tile and
the whole image run batched, and the merged instances keep the merge invariants (full-resolution masks in
the frame, no duplicate across tiles, the whole pass's large objects kept, damage on the merged masks).
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.helpers import conf_with_instances
from tests.parity import assert_same_decoding

IMGSZ = 96
SCENE = 640


@pytest.fixture(scope="module")
def tiny_onnx(tiny_model, tmp_path_factory) -> Path:
    from damage.tasks.export.onnx import export_onnx

    return export_onnx(tiny_model, tmp_path_factory.mktemp("slice") / "tiny.onnx", IMGSZ)


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    """One 640-px whole scene of the generator (vehicles whole in view, exact labels)."""
    from damage.tasks.data.synth import render_sample

    s = render_sample(np.random.default_rng(34), SCENE, "scene", "scratch")
    p = tmp_path_factory.mktemp("scene") / "scene.png"
    cv2.imwrite(str(p), s.image)
    return p


def _iou(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    u = (a | b).sum()
    return float((a & b).sum() / u) if u else 0.0


def test_slices_off_is_todays_predictor(tiny_onnx, scene):
    from damage.tasks.serving.predictor import Predictor

    assert Predictor(tiny_onnx).slices.mode == "off"  # no damage.slices in the metadata: off
    # off decodes exactly as Ultralytics does (one raw output through both post-processings; tests/parity.py)
    assert assert_same_decoding(tiny_onnx, [scene], conf_with_instances(Predictor(tiny_onnx), [scene], k=10)) > 0
    off = Predictor(tiny_onnx, slices="off")
    off.conf = 0.01
    plain = off.predict_arrays([cv2.imread(str(scene))])[0]
    got = off.predict(scene)[0]
    assert [(i.cls, i.score, i.box, i.area_px) for i in got.instances] == \
        [(i.cls, i.score, i.box, i.area_px) for i in plain.instances]


def test_sliced_inference_on_a_whole_scene_keeps_the_merge_invariants(tiny_onnx, scene):
    from damage.tasks.serving.damage_percent import damage_report
    from damage.tasks.serving.predictor import Predictor
    from damage.tasks.serving.slicing import MAX_BATCH, tile_windows

    whole = Predictor(tiny_onnx, slices="off")
    sliced = Predictor(tiny_onnx, slices="auto")
    whole.conf = sliced.conf = conf_with_instances(whole, [scene], k=10)
    calls = []
    real = sliced.runtime.run
    sliced.runtime.run = lambda b: calls.append(b.shape) or real(b)
    [ref] = whole.predict(scene)
    [res] = sliced.predict(scene)
    n_tiles = len(tile_windows(SCENE, SCENE, (IMGSZ, IMGSZ), 0.2))
    assert sum(c[0] for c in calls) == n_tiles + 1 and len(calls) == math.ceil((n_tiles + 1) / MAX_BATCH)
    assert all(c[1:] == (3, IMGSZ, IMGSZ) for c in calls)
    assert sliced.timings["tiles"] == n_tiles and (res.width, res.height) == (SCENE, SCENE)
    assert res.instances, "the tiles found nothing at a confidence the whole pass passes"
    for inst in res.instances:
        m = inst.mask
        assert m.shape == (SCENE, SCENE) and inst.area_px == m.count() > 0
        x0, y0, x1, y1 = m.extent
        assert inst.box[0] <= x0 + 1 and inst.box[1] <= y0 + 1 and inst.box[2] >= x1 - 1 and inst.box[3] >= y1 - 1
    # no duplicates across tiles: no two instances of one class share (almost) all their pixels
    for a in res.instances:
        for b in res.instances:
            if a.id < b.id and a.cls == b.cls:
                assert _iou(a.mask, b.mask) < 0.9, (a.id, b.id)
    # what no tile can hold whole comes from (or is rebuilt like) the whole-image pass
    for big in (i for i in ref.instances if max(i.box[2] - i.box[0], i.box[3] - i.box[1]) > IMGSZ):
        assert max((_iou(big.mask, i.mask) for i in res.instances if i.cls == big.cls), default=0) >= 0.5, big.id
    # damage is assigned on the merged full-resolution masks
    rep = damage_report([i.mask for i in res.instances], [i.name for i in res.instances], sliced.vehicle_class)
    assert rep.damage_percent == res.damage.damage_percent
    assert [i.vehicle_id for i in res.instances] == [rep.assignment.get(i.id) for i in res.instances]
    assert res.to_dict()["instances"]  # the JSON document still builds (lazy polygons of merged masks)


def test_extra_set_scores_sliced_and_letterboxed(tiny_onnx, tmp_path):
    """``evaluate.extra_sets``: a generated whole-scene set scored through the predictor, both ways."""
    from damage.tasks.core.config import ExtraSetConfig
    from damage.tasks.evaluation.extra_sets import UNSLICED_SUFFIX, extra_set_data, extra_sets_metrics
    from damage.tasks.serving.slicing import tile_windows

    spec = ExtraSetConfig(name="whole", imgsz=320, images=4, seed=7)
    data_yaml = extra_set_data(spec, tmp_path)
    assert extra_set_data(spec, tmp_path) == data_yaml  # generated once per settings
    m = extra_sets_metrics(tiny_onnx, [spec], tmp_path)
    for prefix in ("whole", "whole" + UNSLICED_SUFFIX):
        assert m[f"{prefix}/images"] == 3  # all but one image are in the val split
        assert 0 <= m[f"{prefix}/mask/mAP50"] <= 1 and 0 <= m[f"{prefix}/box/mAP50"] <= 1
        assert any(k.startswith(f"{prefix}/mask_ap50/") for k in m)  # per-class AP under the set's prefix
        assert f"{prefix}/damage_pct_mae" in m and m[f"{prefix}/damage_pct_vehicles"] >= 1
    assert m["whole/tiles_per_image"] == len(tile_windows(320, 320, (IMGSZ, IMGSZ), 0.2))
    assert m["whole" + UNSLICED_SUFFIX + "/tiles_per_image"] == 0


def test_extra_set_chooses_the_sliced_conf_on_its_tuning_images(tiny_onnx, tmp_path):
    """``tune_images``: the tuning scenes (train split) choose the sliced confidence from the grid; the scored
    scenes (val) count the sliced MAE at it, the letterboxed pass at the sweep's; every key is a valid MLflow
    metric name (the register step logs them on the version)."""
    import re

    from damage.tasks.core.config import ExtraSetConfig
    from damage.tasks.evaluation.extra_sets import extra_set_data, extra_sets_metrics

    spec = ExtraSetConfig(name="whole", imgsz=320, images=3, seed=7, tune_images=3)
    data_yaml = extra_set_data(spec, tmp_path)
    assert {p.parent.name for p in (data_yaml.parent / "images").rglob("*.png")} == {"train", "val"}
    grid = [0.05, 0.2, 0.5]
    m = extra_sets_metrics(tiny_onnx, [spec], tmp_path, conf_grid=grid)
    assert m["whole/images"] == 3 and m["whole/sliced_conf"] in grid
    assert m["whole/damage_pct_conf"] == m["whole/sliced_conf"]
    from damage.tasks.serving.predictor import Predictor

    assert m["whole_unsliced/damage_pct_conf"] == Predictor(tiny_onnx).conf  # letterboxed: the sweep's (metadata)
    tune = {k: v for k, v in m.items() if k.startswith("whole/tune/damage_pct_mae_at_conf_")}
    assert len(tune) == len(grid) and m["whole/tune/damage_pct_mae"] == min(tune.values())
    assert all(re.fullmatch(r"[\w./\- :]+", k) for k in m), [k for k in m if not re.fullmatch(r"[\w./\- :]+", k)]
