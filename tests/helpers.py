"""Helpers shared by test modules (plain functions and constants; fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

# The suite's nightlies draw no figures that no test reads: Ultralytics' after training (about 6 s each) and the
# evaluator's curves (about 3 s each). test_nightly_e2e keeps the first, test_nightly_ux the second.
NO_FIGURES = ["train.plots=false", "evaluate.plots=false"]

S3_BUCKET = "datasets"  # the bucket the `s3` fixture (tests/conftest.py) creates


def die_once(marker: str, on_call: int = 2):
    """A function to call once per batch in a worker: on its ``on_call``-th call it kills its process
    (``os._exit``, no cleanup, as a lost node would), once in the whole run (``O_EXCL`` on ``marker``:
    the retried worker's calls pass). A nested function, so Ray pickles it by value."""
    calls = []

    def maybe_die() -> None:
        calls.append(1)
        if len(calls) == on_call:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
            os._exit(1)

    return maybe_die


def conf_with_instances(pred, paths, k: int = 20) -> float:
    """A confidence leaving about ``k`` candidates per image even for a barely trained model.

    0.1 % under a real score: fine to get instances out of the very predictor it was measured on, never
    a threshold for comparing two sessions or runtimes (near-tied scores straddle it; use
    ``tests/parity.py::conf_in_widest_gap``).

    Args:
        pred: a ``damage.tasks.serving.predictor.Predictor``.
        paths: image files.
        k: candidates to keep on the image with the weakest scores.
    """
    import cv2
    import numpy as np

    tops = []
    for p in paths:
        det, _ = pred.infer(pred.preprocess([cv2.imread(str(p))]))
        s = det[0][:, 4] if pred.end2end else det[0, 4:4 + len(pred.names)].max(0)
        tops.append(np.sort(s)[-min(k, len(s))])
    return float(min(tops)) * 0.999


@contextlib.contextmanager
def mlflow_credentials(user: tuple[str, str]) -> Iterator[None]:
    """Authenticate this process as ``(username, password)``: MLflow's REST client reads the variables per
    request; the previous values come back on exit."""
    keys = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(dict(zip(keys, user, strict=True)))
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


LINEAGE = {"dataset_fingerprint": "d", "config_hash": "h", "code_version": "c"}  # a registration's lineage tags


def sqlite_client(folder):
    """An ``MlflowClient`` whose tracking and registry store is ``folder/mlflow.db`` (SQLite, no server)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def env_var(name: str, value: str) -> Iterator[None]:
    """``os.environ[name] = value`` inside the block; the old value (or its absence) is back afterwards."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def worker_config(sets: list[str], config: str | None = None) -> contextlib.AbstractContextManager[None]:
    """Run as a worker started with ``--config config --set sets...`` (``damage.tasks.core.run_params``): the
    nightly and promote flows build their config from this, not from run parameters (issue 31)."""
    import json

    from damage.tasks.core.run_params import WORKER_ENV

    return env_var(WORKER_ENV, json.dumps({"config": config, "sets": list(sets)}))
