"""Shared fixtures. Everything a test writes goes under a per-session temp state dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Must happen before prefect/mlflow/ultralytics are imported by any test module.
_STATE = Path(os.environ.get("DAMAGE_TEST_STATE") or (Path(__file__).parent.parent / ".state" / "test")).resolve()
os.environ["DAMAGE_STATE_DIR"] = str(_STATE)
os.environ["PREFECT_HOME"] = str(_STATE / "prefect")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_STATE / 'mlflow.db'}"
os.environ.pop("PREFECT_API_URL", None)

from tasks.core.runtime import activate, configure_ultralytics  # noqa: E402

PATHS = activate(_STATE)


@pytest.fixture(scope="session")
def state_paths():
    """The activated test state directory (Ultralytics configured to use it)."""
    configure_ultralytics(PATHS)
    return PATHS


@pytest.fixture(scope="session")
def prefect_harness(state_paths):
    """Session-scoped Prefect test harness (temporary SQLite API database)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_dataset(state_paths, tmp_path_factory) -> Path:
    """24-image synthetic YOLO-seg dataset at 96 px; returns the data.yaml path."""
    from tasks.data.synth import generate_dataset

    out = tmp_path_factory.mktemp("tiny_synth")
    return generate_dataset(out / "ds", images=24, seed=0, imgsz=96, val_fraction=0.25)


@pytest.fixture(scope="session")
def tiny_model(state_paths, tiny_dataset, tmp_path_factory) -> Path:
    """A yolov8n-seg trained 1 epoch on the tiny dataset (from scratch); returns best.pt."""
    from tasks.core.config import TrainConfig
    from tasks.training.train import train_model

    out = tmp_path_factory.mktemp("tiny_train")
    cfg = TrainConfig(model="n", epochs=1, imgsz=96, batch=8, patience=0)
    return train_model(tiny_dataset, cfg, out, seed=0).best
