"""Training is reproducible while another thread draws from the global random generators (issue 30).

Ultralytics' augmentations draw from Python's ``random`` and NumPy's ``np.random``; with ``workers: 0``
they did so in the training thread, from the generators every thread shares, so a busy neighbour
thread changed the weights of a seeded training (``damage.tasks.training.rng``)."""

from __future__ import annotations

import hashlib
import random
import threading

import numpy as np

from damage.tasks.core.config import TrainConfig
from damage.tasks.training.checkpoint import load_ultralytics_checkpoint
from damage.tasks.training.rng import AUGMENTING_MODULES
from damage.tasks.training.train import train_model


def _weights_hash(path) -> str:
    model, _ = load_ultralytics_checkpoint(path)
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _train(data, out, name: str) -> str:
    # the default augmentation (mosaic, perspective, HSV, flips): every draw Ultralytics makes
    cfg = TrainConfig(plots=False, model="n", epochs=2, imgsz=64, batch=4, nbs=4, val=False, patience=0,
                      workers=0, warmup_epochs=0)
    return _weights_hash(train_model(data, cfg, out, seed=3, name=name, extra_args={"plots": False}).last)


def test_a_thread_drawing_from_the_global_generators_does_not_change_the_weights(easy_dataset, tmp_path):
    quiet = _train(easy_dataset, tmp_path, "quiet")

    stop = threading.Event()
    draws = [0]

    def neighbour() -> None:  # what a library's background thread may do at any time
        while not stop.is_set():
            random.random()
            np.random.random()
            draws[0] += 1
            stop.wait(0.001)

    thread = threading.Thread(target=neighbour, daemon=True)
    thread.start()
    try:
        busy = _train(easy_dataset, tmp_path, "busy")
    finally:
        stop.set()
        thread.join()
    assert draws[0] > 100  # the neighbour really drew while the second training ran
    assert busy == quiet
    # and the global generators are the modules' own again
    import importlib

    for name in AUGMENTING_MODULES:
        module = importlib.import_module(name)
        assert getattr(module, "random", random) is random and getattr(module, "np", np) is np
