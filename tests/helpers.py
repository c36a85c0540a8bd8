"""Helpers shared by test modules (plain functions and constants; fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

S3_BUCKET = "datasets"  # the bucket the `s3` fixture (tests/conftest.py) creates


def conf_with_instances(pred, paths, k: int = 20) -> float:
    """A confidence leaving about ``k`` candidates per image even for a barely trained model.

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


def assert_matches_ultralytics(onnx, paths, iou: float = 0.7, k: int = 20) -> int:
    """Our predictor vs ``YOLO(onnx).predict`` at the model's image size, at a confidence that leaves
    instances (``conf_with_instances``): same count and classes; each of our instances is paired with the
    reference of its class whose box is nearest (order-free: tied scores may swap ranks), box within
    0.05 px, mask IoU >= 0.98.

    Returns:
        The number of instances matched.
    """
    import numpy as np
    from ultralytics import YOLO

    from damage.tasks.serving.predictor import Predictor

    pred = Predictor(onnx, iou=iou)
    pred.conf = conf_with_instances(pred, paths, k)
    ul = YOLO(str(onnx), task="segment")
    matched = 0
    for p in paths:
        ours = pred.predict(p)[0]
        # end-to-end graphs are fed the full square (their TopK size is fixed), rect=False does the same
        ref = ul.predict(str(p), conf=pred.conf, iou=iou, imgsz=pred.imgsz[0], retina_masks=True, verbose=False,
                         rect=not pred.end2end)[0]
        n_ref = 0 if ref.boxes is None else len(ref.boxes)
        assert len(ours.instances) == n_ref, p.name
        if not n_ref:
            continue
        rb, rc = ref.boxes.xyxy.numpy(), ref.boxes.cls.numpy().astype(int)
        rm = ref.masks.data.numpy().astype(bool)
        assert rm.shape[1:] == (ours.height, ours.width)
        assert sorted(i.cls for i in ours.instances) == sorted(rc.tolist()), p.name
        free = list(range(n_ref))
        for j, inst in enumerate(ours.instances):
            # paired by class and nearest box, not by rank: instances whose scores tie (or differ in the last
            # float bits between two ORT sessions) may come out in either order
            r = min((r for r in free if rc[r] == inst.cls),
                    key=lambda r: float(np.abs(np.asarray(inst.box, dtype=float) - rb[r]).max()))
            free.remove(r)
            np.testing.assert_allclose(inst.box, rb[r], atol=0.05, err_msg=f"{p.name} instance {j}")
            union = (inst.mask | rm[r]).sum()
            mask_iou = (inst.mask & rm[r]).sum() / union if union else 1.0
            assert mask_iou >= 0.98, (p.name, j, mask_iou)
            assert inst.area_px == int(inst.mask.sum())
            matched += 1
    return matched


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
def worker_config(sets: list[str], config: str | None = None) -> Iterator[None]:
    """Run as a worker started with ``--config config --set sets...`` (``damage.tasks.core.run_params``): the
    nightly and promote flows build their config from this, not from run parameters (issue 31)."""
    import json

    from damage.tasks.core.run_params import WORKER_ENV

    old = os.environ.get(WORKER_ENV)
    os.environ[WORKER_ENV] = json.dumps({"config": config, "sets": list(sets)})
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(WORKER_ENV, None)
        else:
            os.environ[WORKER_ENV] = old
