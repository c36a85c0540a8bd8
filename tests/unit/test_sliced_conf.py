"""The confidence of sliced photos (issue 34): chosen on an extra set's tuning images by the lowest
per-vehicle damage-% MAE, written into the ONNX as ``damage.sliced_conf``, used by the predictor on every
image it slices (and only there), and named on the model card."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from damage.tasks.core.config import ConfigError
from damage.tasks.core.config_load import load_config
from damage.tasks.core.errors import DamageError
from tests.unit.test_predictor_backends import _two_output_model


def _model(tmp_path, **meta) -> str:
    base = {"damage.names": '["vehicle", "dent"]', "imgsz": "[96, 96]", "damage.slices": '"auto"'}
    return str(_two_output_model(tmp_path / "m.onnx", meta={**base, **{f"damage.{k}": v for k, v in meta.items()}}))


def test_predictor_uses_the_sliced_conf_only_on_sliced_images(tmp_path):
    from damage.tasks.serving.predictor import Predictor

    p = Predictor(_model(tmp_path, conf="0.2", sliced_conf="0.7"))
    assert (p.conf, p.sliced_conf) == (0.2, 0.7)
    assert p.conf_for(640, 640) == 0.7  # auto slices a side over 1.5 x 96
    assert p.conf_for(96, 96) == 0.2 and p.conf_for(140, 96) == 0.2
    assert Predictor(_model(tmp_path, conf="0.2", sliced_conf="0.7"), conf=0.05).conf_for(640, 640) == 0.05  # explicit
    assert Predictor(_model(tmp_path, conf="0.2", sliced_conf="0.7"), slices="off").conf_for(640, 640) == 0.2
    assert Predictor(_model(tmp_path, conf="0.2")).conf_for(640, 640) == 0.2  # none chosen: the sweep's
    with pytest.raises(DamageError, match="damage.sliced_conf"):
        Predictor(_model(tmp_path, sliced_conf="1.5"))


def test_sliced_images_are_predicted_at_the_sliced_conf(tmp_path, monkeypatch):
    from damage.tasks.serving import slicing
    from damage.tasks.serving.predictor import Predictor

    p = Predictor(_model(tmp_path, conf="0.2", sliced_conf="0.7"))
    seen = []
    monkeypatch.setattr(slicing, "predict_sliced", lambda pred, im, spec, conf, iou, mb: seen.append(conf) or "S")
    monkeypatch.setattr(p, "predict_arrays", lambda ims, bs, conf, iou: seen.append(("plain", conf)) or ["P"] * len(ims))
    out = slicing.predict_images(p, [np.zeros((640, 640, 3), np.uint8), np.zeros((96, 96, 3), np.uint8)], p.slices)
    assert out == ["S", "P"] and seen == [("plain", None), 0.7]  # the plain image: the predictor's own conf
    seen.clear()
    slicing.predict_images(p, [np.zeros((640, 640, 3), np.uint8)], p.slices, conf=0.4)
    assert seen == [0.4]  # a caller's conf wins


def test_config_allows_one_tuning_set_and_names_its_split():
    cfg = load_config(overrides=["evaluate.extra_sets=[{name: whole, tune_images: 8}, {name: other}]"])
    whole, other = cfg.evaluate.extra_sets
    assert (whole.tuning_split, other.tuning_split) == ("train", None)
    folder = load_config(overrides=["evaluate.extra_sets=[{name: f, source: /data/x, tune_split: tune}]"])
    assert folder.evaluate.extra_sets[0].tuning_split == "tune"
    with pytest.raises(ConfigError, match="at most one extra set"):
        load_config(overrides=["evaluate.extra_sets=[{name: a, tune_images: 4}, {name: b, tune_split: t}]"])


class _Inst(SimpleNamespace):
    pass


def _fake_world(monkeypatch, images: list[tuple[list, list]]):
    """Replace the predictor and the reader of ``extra_sets``: each image is (truth masks+names,
    predictions (mask, name, score))."""
    from damage.tasks.evaluation import extra_sets
    from damage.tasks.serving import predictor as predictor_mod

    class FakePredictor:
        names, stride = ["vehicle", "dent"], 32

        def __init__(self, onnx, conf, **kw):
            self.conf, self.k = conf, -1
            FakePredictor.made = self

        def predict(self, im):
            self.k += 1
            _, preds = images[self.k]
            inst = [_Inst(mask=m, name=n, score=s) for m, n, s in preds if s > self.conf]
            return [SimpleNamespace(instances=inst)]

    monkeypatch.setattr(predictor_mod, "Predictor", FakePredictor)
    monkeypatch.setattr(extra_sets, "load_split", lambda data, split, imgsz, stride: (list(range(len(images))), None))
    monkeypatch.setattr(extra_sets, "_truth", lambda k, names: (None, SimpleNamespace(masks=np.stack(images[k][0][0])),
                                                                 images[k][0][1]))
    return FakePredictor


def _box(y0, y1, x0, x1, shape=(40, 40)):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def test_the_grid_conf_with_the_lowest_damage_mae_wins_ties_to_the_lower(monkeypatch):
    from damage.tasks.evaluation.extra_sets import choose_sliced_conf

    car, dent, junk = _box(0, 40, 0, 40), _box(0, 10, 0, 10), _box(20, 40, 20, 40)
    # one car with one dent (6.25 %); the model finds the dent at 0.9 and a false dent at 0.25
    world = [((([car, dent]), ["vehicle", "dent"]), [(car, "vehicle", 0.95), (dent, "dent", 0.9), (junk, "dent", 0.25)])]
    fake = _fake_world(monkeypatch, world)
    conf, maes = choose_sliced_conf("m.onnx", "d.yaml", "train", 640, "auto", [0.5, 0.1, 0.3])
    assert fake.made.conf == 0.1  # one pass at the grid's lowest confidence
    assert maes[0.1] == pytest.approx(25.0) and maes[0.3] == maes[0.5] == pytest.approx(0.0)
    assert conf == 0.3  # 0.3 and 0.5 tie at 0: the lower keeps more recall
    with pytest.raises(DamageError, match="empty"):
        choose_sliced_conf("m.onnx", "d.yaml", "train", 640, "auto", [])


def test_a_tuning_split_equal_to_the_scored_split_is_refused(tmp_path):
    from damage.tasks.evaluation.extra_sets import extra_sets_metrics

    cfg = load_config(overrides=[f"evaluate.extra_sets=[{{name: f, source: {tmp_path}, tune_split: val}}]"])
    (tmp_path / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: {0: vehicle}\n")
    with pytest.raises(DamageError, match="tune_split 'val' is the scored split"):
        extra_sets_metrics("m.onnx", cfg.evaluate.extra_sets, tmp_path, conf_grid=[0.1])


def test_the_step_writes_the_chosen_conf_into_the_candidates_onnx_and_the_card_names_it(state_paths, tmp_path,
                                                                                          monkeypatch):
    from damage.model_registry.card import model_card
    from damage.tasks.core import tracking
    from damage.tasks.evaluation import extra_sets
    from damage.tasks.export.onnx import read_onnx_metadata

    onnx = _model(tmp_path, conf="0.1")
    grids = []

    def fake(onnx, sets, root, conf, iou, threads, conf_grid=()):
        grids.append(list(conf_grid))
        return {"whole/mask/mAP50": 0.5, "whole/sliced_conf": 0.3, "whole/tune/damage_pct_mae": 2.5}

    monkeypatch.setattr(extra_sets, "extra_sets_metrics", fake)
    cfg = load_config(overrides=["evaluate.extra_sets=[{name: whole, tune_images: 4}]"])
    c = tracking.client()
    parent = tracking.start_run(c, tracking.ensure_experiment(c, "sliced-conf-test"), "parent")
    out = extra_sets.extra_sets_step({"onnx": onnx, "metrics": {}}, cfg.evaluate.extra_sets, state_paths.datasets,
                                     parent, conf_grid=[0.1, 0.3])
    tracking.end_run(c, parent)
    assert grids == [[0.1, 0.3]]
    meta = read_onnx_metadata(onnx)
    assert meta["sliced_conf"] == 0.3 and meta["conf"] == 0.1  # the sweep's conf stays for unsliced images
    md = model_card("damage-seg", 1, out["metrics"], [], {"conf": 0.1, "iou": 0.6, "objective": "damage_mae"})
    assert "Sliced photos: conf **0.3**" in md and "extra set `whole`" in md and "MAE (2.500 pp there)" in md
