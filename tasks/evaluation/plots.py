"""Curves and a confusion matrix for an evaluated model (``.pt``, ONNX, compressed variants alike).

The figures are Ultralytics' own (``ap_per_class(plot=True)`` and ``ConfusionMatrix.plot``) drawn
from the detections ``damage.tasks.evaluation.evaluate.collect`` matched, so they agree with the logged
mAP. Written under a fixed layout that ``evaluate_step`` logs to the run's ``plots/`` folder:

    box_PR_curve.png   box_F1_curve.png   box_P_curve.png   box_R_curve.png
    mask_PR_curve.png  mask_F1_curve.png  mask_P_curve.png  mask_R_curve.png
    confusion_matrix.png  confusion_matrix_normalized.png
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# Ultralytics val defaults for the confusion matrix: detections above 0.25, matched at box IoU 0.45.
CM_CONF = 0.25
CM_IOU = 0.45
CURVE_FILES = tuple(f"{k}_{c}_curve.png" for k in ("box", "mask") for c in ("PR", "F1", "P", "R"))
CM_FILES = ("confusion_matrix.png", "confusion_matrix_normalized.png")


def new_confusion(names: dict[int, str]):
    """An empty Ultralytics detection confusion matrix for ``names``."""
    from ultralytics.utils.metrics import ConfusionMatrix

    return ConfusionMatrix(names=dict(names), task="detect")


def confusion_update(cm, pred, truth, nms_iou: float, nc: int, max_det: int) -> None:
    """Add one image: deployment NMS (best class per box) at ``CM_CONF``, class-agnostic matching.

    Args:
        cm: from ``new_confusion``.
        pred: (4+nc+nm, A) raw predictions of the image (torch).
        truth: its ``ImageTruth`` (boxes xyxy in the same letterboxed pixels).
    """
    import torch
    from ultralytics.utils import nms

    det = nms.non_max_suppression(pred[None], CM_CONF, nms_iou, nc=nc, multi_label=False, max_det=max_det)[0]
    cm.process_batch({"bboxes": det[:, :4], "conf": det[:, 4], "cls": det[:, 5]},
                     {"bboxes": torch.as_tensor(np.asarray(truth.boxes, np.float32)).reshape(-1, 4),
                      "cls": torch.as_tensor(np.asarray(truth.cls)).reshape(-1)},
                     conf=CM_CONF, iou_thres=CM_IOU)


def write_eval_plots(conf: np.ndarray, cls: np.ndarray, tp_box: np.ndarray, tp_mask: np.ndarray,
                     target: np.ndarray, names: dict[int, str], out_dir: str | Path,
                     confusion: Any = None) -> list[Path]:
    """Box and mask PR / F1 / P / R curves per class, and the confusion matrix, as PNGs.

    Args:
        conf, cls: (k,) scores and classes of every detection of the split (conf floor, one NMS IoU).
        tp_box, tp_mask: (k, 10) true-positive flags at IoU 0.5:0.95 (box and mask matching).
        target: classes of every ground-truth instance.
        names: class id -> name.
        out_dir: created if missing; files use the names in the module docstring.
        confusion: a filled ``new_confusion`` matrix, or None for curves only.

    Returns:
        The files written (a class without labels has no curve; no labels at all: no curves).
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: flows run without a display
    from ultralytics.utils.metrics import ap_per_class

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = np.asarray(target, int)
    if len(target):
        for kind, tp in (("box", tp_box), ("mask", tp_mask)):
            ap_per_class(np.asarray(tp, bool), np.asarray(conf, float), np.asarray(cls, int), target, plot=True,
                         save_dir=out, names=dict(names), prefix=f"{kind}_")
    if confusion is not None:
        for normalize in (False, True):
            confusion.plot(normalize=normalize, save_dir=out)
        _close_figures()
    return sorted(p for p in out.glob("*.png") if p.name in CURVE_FILES + CM_FILES)


def _close_figures() -> None:
    import matplotlib.pyplot as plt

    plt.close("all")
