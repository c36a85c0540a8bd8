"""``train.init``: nightly training starts from production's weights when they fit (issue 12, item 5).

Random-weight YOLOv8-seg checkpoints (no training) and a local SQLite registry: production is a
registered version whose ``model.pt`` is fetched back through MLflow.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest

import damage.model_registry as mr
from damage.model_registry.init import resolve_init
from damage.tasks.core.config import CLASSES, TrainConfig
from damage.tasks.training.init import InitError, apply, checkpoint_mismatch
from tests.helpers import sqlite_client

LINEAGE = {"dataset_fingerprint": "d", "config_hash": "h", "code_version": "c"}


def _checkpoint(path: Path, names: list[str], size: str = "n") -> Path:
    """An Ultralytics-style checkpoint of a random-weight YOLOv8-seg with these class names."""
    import torch
    from ultralytics.nn.tasks import SegmentationModel

    net = SegmentationModel(f"yolov8{size}-seg.yaml", nc=len(names), verbose=False)
    net.names = dict(enumerate(names))
    torch.save({"model": net, "epoch": -1, "train_args": {}}, path)
    return path


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    return sqlite_client(tmp_path_factory.mktemp("init-reg"))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("init-ckpts")
    return {"same": _checkpoint(d / "same.pt", list(CLASSES)),
            "fewer": _checkpoint(d / "fewer.pt", list(CLASSES[:3])),
            "renamed": _checkpoint(d / "renamed.pt", [*CLASSES[:-1], "wheel_flat"]),
            "small": _checkpoint(d / "small.pt", list(CLASSES), size="s")}


def _production(client, pt: Path, tmp_path: Path) -> tuple[str, str]:
    """A registered model whose production alias points at a version carrying ``pt``."""
    name = f"init-{uuid.uuid4().hex[:8]}"
    exp = client.get_experiment_by_name("init") or client.get_experiment(client.create_experiment("init"))
    run_id = client.create_run(exp.experiment_id).info.run_id
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx")
    v = mr.register_candidate(client, name, run_id, onnx, pt, {}, {}, LINEAGE)
    client.set_registered_model_alias(name, mr.PRODUCTION, v.version)
    # ... and its approval record (issue 31: train.init reads production's approved, hash-verified copy)
    from damage.model_registry.frozen import approved_name, freeze_version

    client.set_registered_model_alias(approved_name(name), mr.PRODUCTION,
                                      freeze_version(client, name, v.version, "test", "fixture"))
    return name, v.version


def test_auto_picks_production_weights_when_classes_match(client, ckpts, tmp_path):
    name, version = _production(client, ckpts["same"], tmp_path)
    cfg = TrainConfig(init="auto", lr0=0.01, finetune_lr_scale=0.1, warmup_epochs=3)
    d = resolve_init(client, name, cfg, list(CLASSES), tmp_path / "work")
    assert (d.source, d.parent_version) == ("production", version)
    assert f"fine-tuning from production version {version}" in d.reason
    # fetched through MLflow into the work dir, not the file that was registered
    assert d.weights.is_file() and tmp_path / "work" in d.weights.parents and d.weights != ckpts["same"]
    assert d.weights.read_bytes() == ckpts["same"].read_bytes()
    run_cfg = apply(cfg, d)
    assert (run_cfg.weights, run_cfg.finetune, run_cfg.warmup_epochs) == (str(d.weights), True, 0.0)
    assert resolve_init(client, name, cfg.model_copy(update={"init": "production"}), list(CLASSES),
                        tmp_path / "w2").parent_version == version


@pytest.mark.parametrize(("ckpt", "why"), [
    ("fewer", "its classes ['vehicle', 'dent', 'scratch'] differ from the dataset's"),
    ("renamed", "'wheel_flat'] differ from the dataset's"),
    ("small", "its network differs from train.model 'n'"),
])
def test_auto_falls_back_to_scratch_when_production_does_not_fit(client, ckpts, tmp_path, ckpt, why):
    name, version = _production(client, ckpts[ckpt], tmp_path)
    d = resolve_init(client, name, TrainConfig(init="auto"), list(CLASSES), tmp_path / "work")
    assert (d.source, d.weights, d.parent_version) == ("scratch", None, None)
    assert d.reason.startswith(f"production version {version} does not fit: ") and why in d.reason
    assert d.reason.endswith("training from scratch")
    with pytest.raises(InitError, match="train.init=production: production version .* does not fit"):
        resolve_init(client, name, TrainConfig(init="production"), list(CLASSES), tmp_path / "work")


def test_no_production_auto_scratch_production_error(client, tmp_path):
    name = f"none-{uuid.uuid4().hex[:8]}"
    d = resolve_init(client, name, TrainConfig(init="auto"), list(CLASSES), tmp_path)
    assert d.source == "scratch" and d.reason == f"no 'production' version of '{name}' yet: training from scratch"
    with pytest.raises(InitError, match=f"train.init=production: no 'production' version of '{name}' yet"):
        resolve_init(client, name, TrainConfig(init="production"), list(CLASSES), tmp_path)


def test_scratch_path_and_explicit_weights(client, ckpts, tmp_path):
    name, _ = _production(client, ckpts["same"], tmp_path)
    assert resolve_init(client, name, TrainConfig(init="scratch"), list(CLASSES), tmp_path).source == "scratch"
    d = resolve_init(client, name, TrainConfig(init=str(ckpts["same"])), list(CLASSES), tmp_path)
    assert (d.source, d.weights) == ("path", ckpts["same"].resolve())
    with pytest.raises(InitError, match="cannot start from it: its classes"):
        resolve_init(client, name, TrainConfig(init=str(ckpts["fewer"])), list(CLASSES), tmp_path)
    with pytest.raises(InitError, match="nope.pt': checkpoint not found"):
        resolve_init(client, name, TrainConfig(init=str(tmp_path / "nope.pt")), list(CLASSES), tmp_path)
    own = TrainConfig(init="auto", weights=str(ckpts["small"]), finetune=False, warmup_epochs=2)
    d = resolve_init(client, name, own, list(CLASSES), tmp_path)
    assert d.source == "path" and "train.weights is set" in d.reason
    assert apply(own, d) == own  # the user's own weights keep the user's settings
    assert checkpoint_mismatch(ckpts["same"], "n", list(CLASSES)) is None


def test_config_rejects_unknown_init():
    from damage.tasks.core.config import ConfigError
    from damage.tasks.core.config_load import load_config

    assert load_config().train.init == "auto"
    with pytest.raises(ConfigError, match="train.init.*auto, scratch, production or a path to a .pt"):
        load_config(overrides=["train.init=prod"])


def test_init_step_logs_and_tags_the_reason(client, ckpts, tmp_path, caplog):
    """The nightly step: a log line with the reason, ``train.init_reason`` on the pipeline run,
    and ``lineage.parent_version`` on the version registered afterwards."""
    from damage.model_registry.steps import init_step
    from damage.tasks.core.config_load import load_config
    from damage.tasks.nightly.pipeline import PipelineRun

    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text("path: .\ntrain: images/train\nval: images/val\nnames: [vehicle, dent, scratch]\n")
    name, version = _production(client, ckpts["same"], tmp_path)  # 7 classes: the 3-class dataset does not fit
    run_id = client.create_run(client.get_experiment_by_name("init").experiment_id).info.run_id
    run = PipelineRun(run_id, "0", client.tracking_uri, tmp_path / "root", "h", "c")
    cfg = load_config(overrides=[f"registry.model_name={name}"])
    with caplog.at_level(logging.INFO, logger="damage.model_registry.steps"):
        train_cfg, d = init_step(cfg, run, data_yaml)
    assert d.source == "scratch" and train_cfg.weights is None
    assert any("train.init=auto: production version" in r.getMessage() and "differ from the dataset's" in
               r.getMessage() for r in caplog.records)
    tags = client.get_run(run_id).data.tags
    assert tags["train.init"] == "scratch" and tags["train.init_reason"] == d.reason
    assert tags["lineage.parent_version"] == "none"


def test_version_lineage_records_the_parent_version(tmp_path):
    from damage.model_registry.steps import version_lineage
    from damage.tasks.nightly.pipeline import PipelineRun
    from damage.tasks.training.init import InitDecision

    run = PipelineRun("r1", "0", "sqlite://", tmp_path, "h", "c")
    d = InitDecision("auto", "production", tmp_path / "model.pt", "fine-tuning from production version 4", "4")
    lin = version_lineage(run, "fp", {"kind": "trained"}, d)
    assert (lin["lineage.parent_version"], lin["lineage.init"], lin["dataset_fingerprint"]) == ("4", "production", "fp")
    scratch = InitDecision("auto", "scratch", None, "no production")
    assert version_lineage(run, "fp", {}, scratch)["lineage.parent_version"] == "none"


def test_offline_decision_for_damage_train(ckpts):
    from damage.tasks.training.init import offline_decision

    d = offline_decision(TrainConfig(init="auto"), list(CLASSES))
    assert d.source == "scratch" and "without the registry" in d.reason
    assert offline_decision(TrainConfig(init=str(ckpts["same"])), list(CLASSES)).source == "path"
    with pytest.raises(InitError, match="train.init=production needs the model registry"):
        offline_decision(TrainConfig(init="production"), list(CLASSES))


def test_auto_falls_back_when_production_checkpoint_is_unreadable(client, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    name, version = _production(client, bad, tmp_path)
    d = resolve_init(client, name, TrainConfig(init="auto"), list(CLASSES), tmp_path / "work")
    assert d.source == "scratch" and f"production version {version} does not fit" in d.reason
    assert "cannot read the checkpoint" in d.reason
