"""Private random generators for Ultralytics' augmentations while one training runs.

Why: Ultralytics' data pipeline (mosaic, random perspective, HSV, flips, copy-paste, multi-scale)
draws from Python's global ``random`` and NumPy's global ``np.random``. With ``train.workers: 0``
(the project's default on CPU) those draws happen in the training thread, from the same generators
every other thread of the process uses. Any other thread that draws while a training runs (a
library's background thread in a long-lived Prefect worker, a test session, a serving process)
shifts the augmentation stream by an amount that depends on timing, so the same seed gives
different weights from run to run. A fresh process with nothing else drawing is bit-reproducible;
a shared one is not.

What: for the duration of ``model.train`` the modules that augment get their own
``random.Random`` and a NumPy stand-in whose ``random`` is a private ``RandomState``, both seeded as
Ultralytics seeds the global ones (``seed + 1``); everything else of NumPy is NumPy's. They are
restored afterwards, also on error.

Not done:
- with DataLoader worker processes (``workers > 0``) nothing is swapped: Ultralytics seeds each
  worker's global generators itself (``seed_worker``), and a private generator copied into forked
  workers would give every worker the same stream;
- two trainings running at the same time in one process: the second sees the first's generators
  already in place and leaves them alone (the first restores the global ones when it ends), so only
  the first is isolated. The pipeline trains one model per process at a time.
"""

from __future__ import annotations

import importlib
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import numpy as np

# Ultralytics modules that draw augmentation randomness from the global generators (8.4: data.augment
# 24 Python + 18 NumPy draws, data.base the buffer choice, detect.train multi-scale).
AUGMENTING_MODULES = (
    "ultralytics.data.augment",
    "ultralytics.data.base",
    "ultralytics.models.yolo.detect.train",
)

_LOCK = threading.Lock()


class _NumpyWithPrivateRandom:
    """NumPy, except that ``.random`` is a private ``RandomState`` (same methods as ``np.random``'s)."""

    def __init__(self, state: np.random.RandomState) -> None:
        self.random = state

    def __getattr__(self, name: str) -> Any:
        value = getattr(np, name)
        setattr(self, name, value)  # looked up once: later accesses are plain attribute reads
        return value


@contextmanager
def private_augmentation_rngs(seed: int, workers: int) -> Iterator[None]:
    """Give Ultralytics' augmenting modules private generators seeded from ``seed`` inside the block.

    Args:
        seed: the training seed (Ultralytics seeds its global generators with ``seed + 1``; so do these).
        workers: DataLoader worker processes; with any, nothing is swapped (see the module docstring).

    Example:
        >>> with private_augmentation_rngs(0, workers=0):
        ...     model.train(**kwargs)  # doctest: +SKIP
    """
    if workers > 0:
        yield
        return
    py_rng = random.Random(seed + 1)
    np_view = _NumpyWithPrivateRandom(np.random.RandomState(seed + 1))
    swapped: list[tuple[ModuleType, str, object]] = []
    with _LOCK:
        for name in AUGMENTING_MODULES:
            module = importlib.import_module(name)
            if getattr(module, "random", None) is random:
                swapped.append((module, "random", random))
                module.random = py_rng  # type: ignore[attr-defined]
            if getattr(module, "np", None) is np:
                swapped.append((module, "np", np))
                module.np = np_view  # type: ignore[attr-defined]
    try:
        yield
    finally:
        with _LOCK:
            for module, attr, original in swapped:
                setattr(module, attr, original)
