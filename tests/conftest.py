"""Shared fixtures. Everything a test writes goes under a per-session temp state dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Must happen before prefect/mlflow/ultralytics are imported by any test module.
_STATE = Path(os.environ.get("DAMAGE_TEST_STATE") or (Path(__file__).parent.parent / ".state" / "test")).resolve()
# pytest-xdist (`make test` runs two workers): each worker has a state dir of its own (MLflow DB, Prefect home, Ray,
# runs), and one thread for every library that the project pins (THREAD_ENV: OpenMP, BLAS, torch, ONNX Runtime, as
# a Ray worker does), so that two workers never run more busy threads than a 2-core machine has cores (OpenMP threads
# that outnumber the cores wait on each other: tasks/core/runtime.py measured 21 s against 0.8 s per training batch).
# A variable the caller set is kept.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _WORKER:
    from damage.tasks.core.machine import THREAD_ENV

    _STATE = _STATE / _WORKER
    for _var in THREAD_ENV:
        os.environ.setdefault(_var, "1")
os.environ["DAMAGE_STATE_DIR"] = str(_STATE)
os.environ["PREFECT_HOME"] = str(_STATE / "prefect")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_STATE / 'mlflow.db'}"
os.environ.pop("PREFECT_API_URL", None)

from damage.tasks.core.runtime import activate, configure_ultralytics  # noqa: E402
from tests.helpers import S3_BUCKET  # noqa: E402

PATHS = activate(_STATE)

# Imported here, once, with the session's own streams and environment, before any test can be the first to import
# them inside typer's CliRunner (which swaps sys.stderr for a buffer it closes afterwards, and sets COLUMNS): Prefect
# binds its console log handlers to the sys.stderr of the import of `prefect.main` (a bare `import prefect` sets up
# no logging), and rich fixes a console's width when COLUMNS is set at its creation. Imported first inside a
# CliRunner, every later Prefect log would go to a closed stream (a RecursionError in the next flow run) and every
# table would keep that test's width, whichever tests ran after it. tests/unit/test_test_harness.py checks both.
os.environ.pop("COLUMNS", None)
import prefect.main  # noqa: E402, F401

import damage.flows.common  # noqa: E402, F401

# pytest-xdist, --dist loadgroup: the tests that share an expensive session fixture run on one worker, so that it is
# built once (the first matching fixture names the group); the other tests are grouped by their file, so that a
# module's own fixtures are built once too.
_SHARED_GROUPS = (("ray_local", "ray"), ("tiny_night", "night"),
                  ("prefect_server", "stack"), ("mlflow_s3_server", "stack"), ("moto_s3", "stack"),
                  ("trained_model", "easy"), ("detecting_model", "easy"), ("tiny_model", "tiny"))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks
def pytest_collection_modifyitems(config, items):
    if not hasattr(config, "workerinput"):
        return  # no xdist worker: nothing to group
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        group = next((g for fixture, g in _SHARED_GROUPS if fixture in names), item.nodeid.split("::")[0])
        item.add_marker(pytest.mark.xdist_group(group))


# What a test, or a CLI command it runs in-process, may pin in os.environ: the MLflow identity (a tracking URI with
# user:password@ is moved into these), the worker's config, and what `activate()` of a CLI's --state-dir writes.
_IDENTITY_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
_PINNED_ENV = (*_IDENTITY_ENV, "DAMAGE_WORKER_CONFIG", "DAMAGE_REGISTRY_CONFIG", "DAMAGE_CONFIG", "DAMAGE_STATE_DIR",
               "MLFLOW_TRACKING_URI", "YOLO_CONFIG_DIR")
_SESSION_IDENTITY = {k: os.environ.get(k) for k in _IDENTITY_ENV}  # as the session started
_last_test: list[str] = ["(session setup)"]


def _put_env(values: dict[str, str | None]) -> list[str]:
    """Set ``values`` in os.environ (None = unset); returns the names that differed."""
    changed = []
    for k, v in values.items():
        if os.environ.get(k) != v:
            changed.append(k)
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return changed


@pytest.fixture(autouse=True)
def _restore_pinned_env(request):
    """After every test the pinned variables are back to what they were when it started (a module fixture's
    settings stay for its module). Assigned directly, not through monkeypatch, so a test's own
    ``monkeypatch.undo()`` cannot bring back an earlier value.

    The MLflow identity is more: no fixture above a test's own sets it for longer than a ``with`` block, so every
    test starts as the session started. An account that outlived its test (a thread, an interleaved
    ``mlflow_user`` block) is reset and named in a warning with the test that ran before."""
    drifted = _put_env(_SESSION_IDENTITY)
    if drifted:
        import warnings

        warnings.warn(f"{', '.join(drifted)} outlived a test, after {_last_test[0]}; reset", stacklevel=1)
    start = {k: os.environ.get(k) for k in _PINNED_ENV}
    yield
    _put_env(start)
    _last_test[0] = request.node.nodeid


@pytest.fixture(scope="session")
def state_paths():
    """The activated test state directory (Ultralytics configured to use it)."""
    configure_ultralytics(PATHS)
    return PATHS


@pytest.fixture(scope="session")
def prefect_harness(state_paths):
    """Session-scoped Prefect test harness (temporary SQLite API database)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):
        yield


@pytest.fixture(scope="session")
def tiny_dataset(state_paths, tmp_path_factory) -> Path:
    """24-image synthetic YOLO-seg dataset at 96 px; returns the data.yaml path."""
    from damage.tasks.data.synth import generate_dataset

    out = tmp_path_factory.mktemp("tiny_synth")
    return generate_dataset(out / "ds", images=24, seed=0, imgsz=96, val_fraction=0.25)


@pytest.fixture(scope="session")
def tiny_model(state_paths, tiny_dataset, tmp_path_factory) -> Path:
    """A yolov8n-seg trained 1 epoch on the tiny dataset (from scratch); returns best.pt."""
    from damage.tasks.core.config import TrainConfig
    from damage.tasks.training.train import train_model

    out = tmp_path_factory.mktemp("tiny_train")
    cfg = TrainConfig(plots=False, model="n", epochs=1, imgsz=96, batch=8, patience=0)
    return train_model(tiny_dataset, cfg, out, seed=0, extra_args={"plots": False}).best  # no test reads its plots


@pytest.fixture
def s3(monkeypatch):
    """A moto-mocked S3 (in process) with one bucket, ``S3_BUCKET``; endpoint variables cleared so
    boto3 talks to the mock."""
    import boto3
    import moto

    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with moto.mock_aws():
        c = boto3.client("s3")
        c.create_bucket(Bucket=S3_BUCKET)
        yield c


# --- a tiny model that detects: easy synthetic set, trained once per session --------------------

EASY_IMGSZ = 64
EASY_EPOCHS = 20
EASY_BATCH = 4


def make_easy_dataset(out: Path, n_train: int = 24, n_val: int = 12, imgsz: int = EASY_IMGSZ, seed: int = 0) -> Path:
    """One or two bright ellipses (class 0, ``vehicle``) on a dark noisy background; returns data.yaml.

    Big, high-contrast objects: a yolov8n-seg learns them in a few epochs from scratch, so the tests
    that need a model that actually detects (INT8 vs float accuracy, Grad-CAM concentration) stay
    cheap. The class list is the project's, so every tool reads the set like a real one.
    """
    import cv2
    import numpy as np
    import yaml

    from damage.tasks.core.config import CLASSES

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = np.empty((imgsz, imgsz, 3), np.uint8)
            img[:] = rng.integers(40, 90, 3)
            img = np.clip(img.astype(int) + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)
            two = bool(rng.integers(0, 2))
            centres = [0.3, 0.7] if two else [rng.uniform(0.35, 0.65)]
            lines = []
            for cx in centres:
                cy = rng.uniform(0.35, 0.65)
                ax = rng.uniform(0.10, 0.18) if two else rng.uniform(0.15, 0.30)
                ay = rng.uniform(0.12, 0.25)
                pts = cv2.ellipse2Poly((int(cx * imgsz), int(cy * imgsz)), (int(ax * imgsz), int(ay * imgsz)),
                                       int(rng.uniform(0, 180)), 0, 360, 15)
                cv2.fillPoly(img, [pts], tuple(int(v) for v in rng.integers(180, 255, 3)))
                lines.append("0 " + " ".join(f"{v:.5f}" for v in (pts / imgsz).clip(0, 1).ravel()))
            cv2.imwrite(str(out / "images" / split / f"{split}_{i:03d}.png"), img)
            (out / "labels" / split / f"{split}_{i:03d}.txt").write_text("\n".join(lines) + "\n")
    data = {"path": str(out), "train": "images/train", "val": "images/val", "names": dict(enumerate(CLASSES))}
    (out / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return out / "data.yaml"


@pytest.fixture(scope="session")
def easy_imgsz() -> int:
    """Image size of the easy set and of ``trained_model``."""
    return EASY_IMGSZ


@pytest.fixture(scope="session")
def easy_dataset(state_paths, tmp_path_factory) -> Path:
    """data.yaml of the easy set (24 train / 12 val images at 64 px)."""
    return make_easy_dataset(tmp_path_factory.mktemp("easy") / "ds")


@pytest.fixture(scope="session")
def trained_model(easy_dataset, tmp_path_factory) -> Path:
    """A yolov8n-seg trained from scratch on the easy set until it detects (last.pt); shared by the tests
    that need real detections. Few images, no mosaic, AdamW without warm-up, no per-epoch validation:
    the cheapest way to a model that finds the objects.

    ``DAMAGE_TEST_TRAINED_MODEL`` names a last.pt this fixture made earlier (the easy set is seeded, so
    it was trained on the same images), to iterate on the tests that use it without training again."""
    if os.environ.get("DAMAGE_TEST_TRAINED_MODEL"):
        return Path(os.environ["DAMAGE_TEST_TRAINED_MODEL"]).resolve()
    return train_easy("n", easy_dataset, tmp_path_factory.mktemp("easy_train"))


# Epochs on the easy set until a family's model detects on every image with a clear score gap
# (tests/parity.py::conf_in_widest_gap); YOLO26 learns the set more slowly than YOLOv8 and YOLO11.
EASY_EPOCHS_BY_FAMILY = {"yolo26n-seg": 40}


# What "detects" means for the models of train_easy: every val image of the easy set has a candidate at least
# this confident (the parity tests then find a clear score gap below every image's top score)
EASY_DETECTS = 0.3
EASY_SEED = 3  # see train_easy
EASY_ROUNDS = 3  # at most this many rounds of `epochs` before the set is declared unlearnable


def weakest_top_score(weights: Path, data: Path) -> float:
    """The lowest, over the easy set's val images, of the model's best candidate score (Ultralytics predict)."""
    from ultralytics import YOLO

    from damage.tasks.training.checkpoint import ultralytics_safe_load, vetted_model_path

    with ultralytics_safe_load():
        model = YOLO(vetted_model_path(weights), task="segment")
    val = sorted((Path(data).parent / "images" / "val").glob("*.png"))
    tops = [float(r.boxes.conf.max()) if len(r.boxes) else 0.0
            for r in model.predict([str(p) for p in val], conf=0.001, imgsz=EASY_IMGSZ, verbose=False)]
    return min(tops)


def train_easy(model: str, data: Path, out: Path, epochs: int = EASY_EPOCHS) -> Path:
    """``model`` trained from scratch on the easy set with the cheapest recipe that makes it detect; last.pt.

    Trained in rounds of ``epochs`` until it detects (``EASY_DETECTS`` on every val image); a later round
    starts from the previous round's weights, and a model that still does not detect after ``EASY_ROUNDS``
    is an error. A seeded training is reproducible on one machine (tasks/training/rng.py keeps other threads
    out of Ultralytics' augmentations), but another CPU's floating point gives other weights, and one
    20-epoch round of this recipe is not always enough: on one machine (Xeon, AVX-512) the weakest top
    score after one round was 0.04, 0.28, 0.90, 0.78, 0.74, 0.89, 0.77, 0.39, 0.34, 0.95, 0.14, 0.04 for
    seeds 0-11. ``EASY_SEED`` is one that detects after one round there (0.780, then 0.841 and 0.835 after
    more rounds)."""
    from damage.tasks.core.config import TrainConfig
    from damage.tasks.training.train import train_model

    weights, top = None, 0.0
    for k in range(EASY_ROUNDS):
        cfg = TrainConfig(plots=False,
                          model=model, weights=weights, epochs=epochs, imgsz=EASY_IMGSZ, batch=EASY_BATCH,
                          patience=0, augment="light", optimizer="AdamW", lr0=0.002, warmup_epochs=0,
                          cos_lr=False, lrf=1.0)
        # nbs = batch: one optimizer step per batch. Ultralytics' default nominal batch of 64 accumulates
        # 64/batch batches per step, which on 24 images is one step every few epochs.
        last = train_model(data, cfg, out, seed=EASY_SEED, name=f"train{k}",
                           extra_args={"val": False, "plots": False, "nbs": EASY_BATCH}).last
        top = weakest_top_score(last, data)
        if top >= EASY_DETECTS:
            return last
        weights = str(last)
    raise AssertionError(f"{model} does not detect on the easy set after {EASY_ROUNDS} x {epochs} epochs "
                         f"(weakest val image's top score {top:.3f} < {EASY_DETECTS})")


@pytest.fixture(scope="session")
def detecting_model(easy_dataset, tmp_path_factory, request):
    """Factory ``detecting_model(family) -> last.pt``: a model of that family (``yolo11n-seg``...) trained on
    the easy set until it detects, once per session; YOLOv8 is ``trained_model``."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family in ("n", "yolov8n-seg"):
            return request.getfixturevalue("trained_model")
        if family not in cache:
            cache[family] = train_easy(family, easy_dataset, tmp_path_factory.mktemp(f"easy_{family}"),
                                       EASY_EPOCHS_BY_FAMILY.get(family, EASY_EPOCHS))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def ray_local(state_paths):
    """One local Ray for the whole session (2 CPUs, no dashboard), stopped at the end.

    Ray's temp dir lives in the state dir, never in /tmp or the home dir. Tests that need Ray take this
    fixture; code under test must not call ``ray.shutdown()`` itself.
    """
    ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")
    tmp = Path(state_paths.root) / "ray"
    tmp.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        from damage.tasks.core.runtime import embedded_ray_token

        embedded_ray_token(state_paths)  # Ray's token too: not in ~/.ray
        # workers import what the tests hand them (tests.* helpers included) from this checkout, also where
        # the package is an installed one and the checkout is not on their path
        root = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(tmp),
                 configure_logging=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield ray
    ray.shutdown()
