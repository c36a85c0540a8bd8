"""Where the slicing and the extra evaluation sets meet the config, the gate, the sweep's operating point and
the model card (issue 34), without a model."""

from __future__ import annotations

import math

import pytest

from damage.model_registry.card import model_card
from damage.model_registry.gate import compare, extra_floors
from damage.tasks.core.config import ConfigError
from damage.tasks.core.config_load import load_config
from damage.tasks.evaluation.extra_sets import gate_sets
from damage.tasks.evaluation.sweep import SweepResult
from damage.tasks.serving.slicing import parse_slices

BASE = {"mask/mAP50-95": .3, "box/mAP50-95": .35, "latency_ms": 9.0, "mask_ap50/vehicle": .9, "mask_ap50/dent": .5}


def test_predictor_slices_setting():
    assert load_config().predictor.slices == "auto"
    assert load_config(overrides=["predictor.slices=off"]).predictor.slices == "off"  # YAML's bare off
    cfg = load_config(overrides=["predictor.slices={size: 320, overlap: 0.25}"])
    assert cfg.predictor.slices_value == {"size": 320, "overlap": 0.25}
    assert parse_slices(cfg.predictor.slices).size == 320  # the predictor reads the config's value as is
    for bad in ("predictor.slices=on_demand", "predictor.slices={size: 8}", "predictor.slices={size: 320, overlap: 1}"):
        with pytest.raises(ConfigError, match="predictor.slices"):
            load_config(overrides=[bad])


def test_extra_sets_config():
    cfg = load_config(overrides=["evaluate.extra_sets=[{name: whole, imgsz: 640, slices: off}]"])
    [s] = cfg.evaluate.extra_sets
    assert (s.name, s.source, s.imgsz, s.slices, s.compare_unsliced, s.closeup_fraction) == \
        ("whole", "synth", 640, "off", True, 0.0)
    with pytest.raises(ConfigError, match="unique"):
        load_config(overrides=["evaluate.extra_sets=[{name: a}, {name: a}]"])
    with pytest.raises(ConfigError, match="extra_sets"):
        load_config(overrides=["evaluate.extra_sets=[{name: Whole Scenes}]"])
    floors = {"whole": {"dent": 0.4}}
    assert [g.name for g in gate_sets(cfg.evaluate.extra_sets, floors)] == ["whole"]
    assert not gate_sets(cfg.evaluate.extra_sets, floors)[0].compare_unsliced  # the gate scores sliced only
    assert gate_sets(cfg.evaluate.extra_sets, {}) == []


def test_gate_floors_on_an_extra_set():
    floors = extra_floors({"whole": {"dent": 0.4, "vehicle": 0.0}}, ["vehicle", "dent"])
    assert floors == {"whole/mask_ap50/vehicle": 0.0, "whole/mask_ap50/dent": 0.4}
    kw = {"tolerance": .01, "latency_budget_ms": None, "floor_mask_map": .05, "extra_min_class_ap50": floors}
    ok, why = compare({**BASE, "whole/mask_ap50/dent": 0.45, "whole/mask_ap50/vehicle": 0.9}, None, **kw)
    assert ok and any("whole/mask_ap50/dent 0.450 >= floor 0.400" in w for w in why)
    ok, why = compare({**BASE, "whole/mask_ap50/dent": 0.3, "whole/mask_ap50/vehicle": 0.9}, None, **kw)
    assert not ok and "whole/mask_ap50/dent 0.300 < floor 0.400" in why
    ok, why = compare(BASE, None, **kw)  # the set was not scored (not in evaluate.extra_sets): fail closed
    assert not ok and any("cannot be checked" in w for w in why)
    ok, _ = compare({**BASE, "whole/mask_ap50/dent": math.nan}, None, **kw)  # no labelled dent on the set
    assert not ok


def test_operating_point_records_the_slicing_on_the_card():
    res = SweepResult(rows=[], best={"conf": 0.3, "iou": 0.5, "mask_f1": 0.6}, objective="mask_f1", min_precision=0.8)
    assert "slices" not in res.thresholds  # not recorded: as before
    res.slices = "auto"
    assert res.thresholds["slices"] == "auto"
    md = model_card("damage-seg", 1, {"mask/mAP50": 0.5}, [], res.thresholds)
    assert 'Sliced inference: `"auto"`' in md


def test_extra_sets_step_logs_under_the_prefix_and_extends_the_candidate(state_paths, monkeypatch):
    from damage.tasks.core import tracking
    from damage.tasks.evaluation import extra_sets

    cfg = load_config(overrides=["evaluate.extra_sets=[{name: whole}]"])
    seen = []

    def fake(onnx, sets, root, conf, iou, threads, conf_grid=()):
        seen.append((onnx, [s.name for s in sets], root))
        return {"whole/mask/mAP50": 0.5, "whole/mask_ap50/dent": 0.4, "whole_unsliced/mask/mAP50": 0.3,
                "whole/damage_pct_mae": float("nan")}

    monkeypatch.setattr(extra_sets, "extra_sets_metrics", fake)
    c = tracking.client()
    parent = tracking.start_run(c, tracking.ensure_experiment(c, "extra-sets-test"), "parent")
    cand = {"onnx": "m.onnx", "metrics": {"mask/mAP50": 0.6}}
    out = extra_sets.extra_sets_step(cand, cfg.evaluate.extra_sets, state_paths.datasets, parent)
    tracking.end_run(c, parent)
    assert seen == [("m.onnx", ["whole"], state_paths.datasets)]
    assert out["metrics"]["mask/mAP50"] == 0.6 and out["metrics"]["whole/mask_ap50/dent"] == 0.4
    assert cand["metrics"] == {"mask/mAP50": 0.6}  # the input is not changed
    logged = c.get_run(parent).data.metrics
    assert logged["whole/mask_ap50/dent"] == 0.4 and logged["whole_unsliced/mask/mAP50"] == 0.3
    assert "whole/damage_pct_mae" not in logged  # NaN is not logged
    assert extra_sets.extra_sets_step(cand, [], state_paths.datasets, parent) is cand  # no sets: unchanged
