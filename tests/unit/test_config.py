"""The one config: defaults load, overrides apply, unknown keys name the closest valid key."""

from __future__ import annotations

import pytest

from damage.tasks.core.config import DEFAULT_CONFIG, Config, ConfigError
from damage.tasks.core.config_load import config_from_dict, load_config


def test_default_yaml_matches_model_defaults():
    """Every key of the YAML is a field (and vice versa): the YAML documents the model exactly."""
    cfg = load_config()
    assert cfg.to_dict() == Config().to_dict() | {"state_dir": cfg.state_dir}


def test_every_yaml_key_is_commented():
    lines = DEFAULT_CONFIG.read_text().splitlines()
    for i, line in enumerate(lines):
        s = line.strip()
        if not s or s.startswith("#") or s.endswith(":"):
            continue  # comments and section headers
        assert lines[i - 1].strip().startswith("#"), f"key without a comment above it: {s!r}"


def test_overrides_are_typed():
    cfg = load_config(overrides=["train.epochs=5", "sweep.conf=[0.2, 0.3]", "train.weights=null",
                                 "validate.on_error=clean"])
    assert cfg.train.epochs == 5
    assert cfg.sweep.conf == [0.2, 0.3]
    assert cfg.train.weights is None
    assert cfg.validation.on_error == "clean"


@pytest.mark.parametrize("key,suggestion", [("trian.epochs", "train.epochs"), ("train.epoch", "train.epochs"),
                                            ("sweep.objectiv", "sweep.objective")])
def test_unknown_key_names_closest(key, suggestion):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[f"{key}=3"])
    msg = str(e.value)
    assert f"unknown config key '{key}'" in msg
    assert f"did you mean '{suggestion}'" in msg
    assert "\n" not in msg


def test_bad_value_is_one_line_error():
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(overrides=["train.epochs=-1"])
    with pytest.raises(ConfigError, match="augment"):
        load_config(overrides=["train.augment=heavy"])


def test_round_trip_and_hash_is_stable():
    cfg = load_config(overrides=["train.epochs=7"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg and again.hash() == cfg.hash()
    assert load_config().hash() != cfg.hash()


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_demo_config_only_changes_what_it_lists():
    demo = load_config(DEFAULT_CONFIG.parent / "demo.yaml").to_dict()
    base = load_config().to_dict()
    changed = {k for k in base if base[k] != demo[k]}
    assert changed == {"data", "train", "compress", "sweep", "evaluate", "explain"}  # data.source is synth in both
    assert {k for k in base["explain"] if base["explain"][k] != demo["explain"][k]} == {"samples"}
    assert {k for k in base["evaluate"] if base["evaluate"][k] != demo["evaluate"][k]} == {"extra_sets"}
    assert {k for k in base["data"] if base["data"][k] != demo["data"][k]} == {"synth"}
    assert {k for k in base["data"]["synth"] if base["data"]["synth"][k] != demo["data"]["synth"][k]} == {
        "images", "closeup_fraction"}
    assert {k for k in base["train"] if base["train"][k] != demo["train"][k]} == {
        "batch", "nbs", "optimizer", "lr0", "lrf", "cls", "val", "cache", "augment", "epochs", "time_min",
        "channels_last"}
    assert demo["train"]["time_min"] > 0  # the demo trains for a wall-time budget (its 15-minute target)
    assert {k for k in base["compress"] if base["compress"][k] != demo["compress"][k]} == {"enabled", "steps"}
    assert demo["compress"]["steps"] == ["int8-static"]
    assert {k for k in base["sweep"] if base["sweep"][k] != demo["sweep"][k]} == {"conf", "iou", "objective"}
