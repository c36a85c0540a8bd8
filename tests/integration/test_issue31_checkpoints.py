"""Issue 31 item 4: no checkpoint is unpickled beyond the allowlist, whoever hands it over.

A ``.pt`` whose pickle runs a command (``__reduce__`` -> ``os.system("touch MARKER")``) goes
through ``train.init`` and through ``damage evaluate``/``export``/``explain``/``sweep``. Each must
refuse it naming the file, and the marker must not exist afterwards: nothing in the file ran.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_checkpoint(path: Path, marker: Path) -> Path:
    """An Ultralytics-shaped checkpoint whose ``model`` entry runs ``touch marker`` when unpickled."""
    import torch

    torch.save({"epoch": -1, "model": _Payload(marker), "ema": None, "train_args": {"task": "segment"}}, path)
    return path


@pytest.fixture
def evil(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "PAYLOAD_RAN"
    return evil_checkpoint(tmp_path / "best.pt", marker), marker


def test_item4_payload_is_real(tmp_path):
    """The fixture is a real attack: a full unpickle does run it (so the tests below can fail)."""
    import torch

    marker = tmp_path / "RAN"
    pt = evil_checkpoint(tmp_path / "x.pt", marker)
    torch.load(pt, weights_only=False)
    assert marker.exists()


def test_item4_train_init_path_refuses_payload(evil):
    from damage.tasks.core.config import CLASSES, TrainConfig
    from damage.tasks.training.checkpoint import UnsafeCheckpoint
    from damage.tasks.training.init import decide_local

    pt, marker = evil
    with pytest.raises(UnsafeCheckpoint, match=str(pt)):
        decide_local(TrainConfig(init=str(pt)), CLASSES)
    assert not marker.exists()


def test_item4_train_init_from_registry_refuses_payload(evil, tmp_path):
    """train.init=auto with production's artifact.pt replaced: an error, never "does not fit: scratch"."""
    from damage.tasks.core.config import CLASSES
    from damage.tasks.training.checkpoint import UnsafeCheckpoint
    from damage.tasks.training.init import checkpoint_mismatch

    pt, marker = evil
    with pytest.raises(UnsafeCheckpoint, match="refused"):
        checkpoint_mismatch(pt, "n", CLASSES)
    assert not marker.exists()


def test_item4_all_loaders_refuse_payload(evil):
    """The five loaders of issue 30 and the trainer's resume check, called directly."""
    from damage.tasks.core.errors import DamageError
    from damage.tasks.evaluation.evaluate import open_model
    from damage.tasks.evaluation.explain import load_model as explain_load
    from damage.tasks.export.onnx import export_onnx
    from damage.tasks.training.prune import load_model as prune_load

    pt, marker = evil
    for call in (lambda: prune_load(pt), lambda: explain_load(pt), lambda: open_model(pt, pt.with_name("d.yaml")),
                 lambda: export_onnx(pt, pt.with_suffix(".onnx"), 64)):
        with pytest.raises(DamageError, match=str(pt)):
            call()
        assert not marker.exists()


@pytest.mark.parametrize("cmd", ["evaluate", "export", "explain", "sweep"])
def test_item4_cli_refuses_payload(cmd, evil, tmp_path):
    from damage.tasks.data.synth import generate_dataset

    pt, marker = evil
    data = generate_dataset(tmp_path / "ds", images=4, seed=0, imgsz=64)
    args = {"evaluate": ["evaluate", str(pt), "--data", str(data)],
            "export": ["export", str(pt)],
            "explain": ["explain", str(next((data.parent / "images").rglob("*.png"))), "--model", str(pt), "--out", str(tmp_path / "x")],
            "sweep": ["sweep", str(pt), "--data", str(data)]}[cmd]
    env = {**os.environ, "DAMAGE_STATE_DIR": str(tmp_path / "s"), "COLUMNS": "400",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    p = subprocess.run([sys.executable, "-m", "damage.flows.cli", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode != 0, p.stdout + p.stderr
    assert not marker.exists(), f"the payload ran under `damage {cmd}`"
    assert str(pt) in p.stderr and "refused" in p.stderr, p.stderr[-2000:]
    if cmd in ("evaluate", "sweep"):  # refused before a run is opened for it: no store, no empty run
        assert not (tmp_path / "m.db").exists()
