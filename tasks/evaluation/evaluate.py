"""Evaluation of a segmentation model (``.pt`` or ``.onnx``) with one inference pass per image.

How the figures are made (and why they are honest):

* **mAP is always computed at a confidence floor of 0.001** (``CONF_FLOOR``), whatever the
  operating thresholds: AP integrates the whole precision-recall curve, so dropping the low-score
  detections (e.g. measuring at conf=0.4, as the field notes did) cuts the curve short, inflating
  precision and deflating recall and AP.
* Pre-processing is Ultralytics val's (its dataset class: resize to ``imgsz``, letterbox,
  ``rect=False``), NMS is Ultralytics' ``non_max_suppression`` (multi-label, as ``yolo val``),
  masks are decoded with ``ops.process_mask`` at the prototype resolution and matched there, as
  Ultralytics val does; AP is Ultralytics' ``ap_per_class`` (101-point COCO interpolation). A
  test checks box and mask mAP against pycocotools' COCOeval on the same detections.
* Ground-truth masks are kept one per instance (``overlap_mask=False``): Ultralytics' default
  merges them into one index image where smaller masks cut holes into larger ones, which would
  punch every damage out of its vehicle.
* The network runs once per image. Its raw output (pre-NMS candidates and mask prototypes) is
  re-used for every NMS IoU of a sweep while that image is in memory; what is kept afterwards is
  the matched detections per IoU, so memory does not grow with the prototypes (3.3 MB per image
  at 640 px). Confidence thresholds are then applied by filtering the cached detections: greedy
  NMS and greedy matching both work in descending score order, so filtering after the fact gives
  exactly what a run at that threshold would give.

Example:
    >>> res = evaluate_model("best.pt", "data.yaml", imgsz=160)
    >>> res.metrics["mask/mAP50-95"], res.metrics["latency_ms"]
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from damage.tasks.core.errors import DamageError, DatasetError, load_file
from damage.tasks.core.jsonsafe import json_safe

if TYPE_CHECKING:
    from damage.tasks.core.config import Config
    from damage.tasks.serving.damage_percent import DamageMAE, VehicleError

log = logging.getLogger(__name__)

CONF_FLOOR = 0.001  # confidence floor of every mAP figure (the standard; see the module docstring)
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCO mAP50-95 thresholds
VEHICLE_CLASS = "vehicle"
# Ultralytics 8.4 ``Metric.fitness``: weights of (mAP50, mAP50-95), summed over box and mask.
# (Older Ultralytics used 0.1 / 0.9; a test pins this to the installed version's SegmentMetrics.)
FITNESS_WEIGHTS = {"mAP50": 0.0, "mAP50-95": 1.0}
METRIC_KEYS = (
    "box/precision", "box/recall", "box/mAP50", "box/mAP50-95",
    "mask/precision", "mask/recall", "mask/mAP50", "mask/mAP50-95",
    "fitness", "latency_ms", "speed/preprocess_ms", "speed/inference_ms", "speed/postprocess_ms",
)
MODEL_SUFFIXES = (".pt", ".onnx")


# ----------------------------------------------------------------------------- data holders


@dataclass
class ImageTruth:
    """Ground truth of one image, in letterboxed pixels.

    Attributes:
        name: image file name.
        boxes: (n, 4) float xyxy.
        cls: (n,) int class ids.
        masks: (n, h, w) bool masks at the resolution predictions are matched at.
        damage_percent: image-level damage percentage from the labels (``damage.tasks.serving.damage_percent``),
            None when the image has no vehicle.
    """

    name: str
    boxes: np.ndarray
    cls: np.ndarray
    masks: np.ndarray
    damage_percent: float | None = None


@dataclass
class ImageDets:
    """Detections of one image (any order), in the same pixel frame as its ``ImageTruth``."""

    boxes: np.ndarray
    scores: np.ndarray
    cls: np.ndarray
    masks: np.ndarray


@dataclass
class ImageScore:
    """Matched detections of one image, sorted by descending score.

    ``tp_box`` / ``tp_mask`` are (k, 10) bool: the detection is a true positive at each IoU
    threshold of ``IOU_THRESHOLDS`` (box IoU and mask IoU respectively).
    """

    conf: np.ndarray
    cls: np.ndarray
    tp_box: np.ndarray
    tp_mask: np.ndarray
    damage: dict[float, list[VehicleError]] = field(default_factory=dict)  # conf -> per labelled vehicle

    @classmethod
    def empty(cls) -> ImageScore:
        z = np.zeros((0, len(IOU_THRESHOLDS)), bool)
        return cls(np.zeros(0), np.zeros(0, int), z, z.copy())


@dataclass
class EvalResult:
    """What ``evaluate_model`` measured.

    Attributes:
        metrics: ``METRIC_KEYS`` (box/mask precision, recall, mAP50, mAP50-95 at conf floor
            ``conf``; Ultralytics fitness; ms per image) plus ``images``, ``instances`` and the
            per-class AP of every labelled class (``class_metrics``: ``mask_ap50/<class>`` ...).
        per_class: one dict per class: ``class``, ``images``, ``instances``, ``box/AP50``,
            ``box/AP50-95``, ``mask/AP50``, ``mask/AP50-95`` (None for a class without labels).
    """

    metrics: dict[str, float]
    per_class: list[dict[str, Any]]
    model: str
    data: str
    split: str
    imgsz: int
    conf: float
    iou: float
    model_format: str
    plots: list[str] = field(default_factory=list)  # PNGs of ``damage.tasks.evaluation.plots`` (when asked for)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


# ----------------------------------------------------------------------------- metric core (numpy)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # No epsilon in the denominator: with integer pixel areas an IoU of exactly 0.5 is common,
    # and COCO counts it as a match (an eps would push it just below the threshold).
    return np.divide(num, den, out=np.zeros(np.broadcast_shapes(num.shape, den.shape)), where=den > 0)


def box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes ``a`` (n, 4) and ``b`` (m, 4) -> (n, m)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(2)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return _safe_div(inter, area_a[:, None] + area_b[None, :] - inter)


def mask_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of binary masks ``a`` (n, h, w) and ``b`` (m, h, w) -> (n, m)."""
    # float32 matmul counts pixels exactly up to 2**24 per mask (4096 x 4096)
    fa = np.asarray(a).reshape(len(a), -1).astype(np.float32)
    fb = np.asarray(b).reshape(len(b), -1).astype(np.float32)
    inter = (fa @ fb.T).astype(np.float64)
    return _safe_div(inter, fa.sum(1, dtype=np.float64)[:, None] + fb.sum(1, dtype=np.float64)[None, :] - inter)


def match_detections(pred_cls: np.ndarray, true_cls: np.ndarray, iou: np.ndarray,
                     thresholds: np.ndarray = IOU_THRESHOLDS) -> np.ndarray:
    """Greedy matching (COCO / Ultralytics val): which detections are true positives.

    Detections must be in descending score order. Each takes, per IoU threshold, the unclaimed
    ground truth of its class with the highest IoU, if that IoU reaches the threshold.

    Args:
        pred_cls: (k,) predicted classes.
        true_cls: (n,) ground-truth classes.
        iou: (n, k) IoU of every ground truth with every detection.
        thresholds: IoU thresholds.

    Returns:
        (k, len(thresholds)) bool.
    """
    correct = np.zeros((len(pred_cls), len(thresholds)), bool)
    if not len(pred_cls) or not len(true_cls):
        return correct
    iou = np.where(np.asarray(true_cls)[:, None] == np.asarray(pred_cls)[None, :], iou, 0.0)
    matched = np.zeros((iou.shape[0], len(thresholds)), bool)
    cols = np.arange(len(thresholds))
    for j in np.flatnonzero((iou >= thresholds.min()).any(0)):
        available = np.where(matched, 0.0, iou[:, j, None])
        k = available.argmax(0)
        correct[j] = available[k, cols] >= thresholds
        matched[k, cols] |= correct[j]
    return correct


def score_image(dets: ImageDets, truth: ImageTruth) -> ImageScore:
    """Match one image's detections against its ground truth (box and mask IoU)."""
    order = np.argsort(-np.asarray(dets.scores), kind="stable")
    conf = np.asarray(dets.scores, np.float64)[order]
    cls = np.asarray(dets.cls, int)[order]
    if not len(order):
        return ImageScore.empty()
    if not len(truth.cls):
        z = np.zeros((len(order), len(IOU_THRESHOLDS)), bool)
        return ImageScore(conf, cls, z, z.copy())
    boxes = np.asarray(dets.boxes)[order]
    masks = np.asarray(dets.masks)[order]
    if masks.shape[1:] != truth.masks.shape[1:]:
        raise ValueError(f"score_image: mask sizes differ: predictions {masks.shape[1:]}, "
                         f"ground truth {truth.masks.shape[1:]}")
    tp_box = match_detections(cls, truth.cls, box_iou_np(truth.boxes, boxes))
    tp_mask = match_detections(cls, truth.cls, mask_iou_np(truth.masks, masks))
    return ImageScore(conf, cls, tp_box, tp_mask)


def _concat(scores: Sequence[ImageScore]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if not scores:
        z = np.zeros((0, len(IOU_THRESHOLDS)), bool)
        return np.zeros(0), np.zeros(0, int), z, z
    return (np.concatenate([s.conf for s in scores]), np.concatenate([s.cls for s in scores]).astype(int),
            np.concatenate([s.tp_box for s in scores]), np.concatenate([s.tp_mask for s in scores]))


def ap_summary(tp: np.ndarray, conf: np.ndarray, pred_cls: np.ndarray, target_cls: np.ndarray) -> dict[str, Any]:
    """Ultralytics' ``ap_per_class`` reduced to what we report.

    Returns:
        ``precision`` / ``recall`` (class means at the confidence of maximum mean F1, as
        Ultralytics reports them), ``mAP50``, ``mAP50-95`` (means over classes that have labels),
        and ``ap50`` / ``ap`` dicts class id -> AP.
    """
    from ultralytics.utils.metrics import ap_per_class

    target_cls = np.asarray(target_cls, int)
    if not len(target_cls):
        return {"precision": 0.0, "recall": 0.0, "mAP50": 0.0, "mAP50-95": 0.0, "ap50": {}, "ap": {}}
    res = ap_per_class(np.asarray(tp, bool), np.asarray(conf, float), np.asarray(pred_cls, int), target_cls)
    p, r, ap, classes = res[2], res[3], res[5], res[6]
    return {
        "precision": float(p.mean()), "recall": float(r.mean()),
        "mAP50": float(ap[:, 0].mean()), "mAP50-95": float(ap.mean()),
        "ap50": {int(c): float(ap[i, 0]) for i, c in enumerate(classes)},
        "ap": {int(c): float(ap[i].mean()) for i, c in enumerate(classes)},
    }


def fitness(box: dict[str, float], mask: dict[str, float]) -> float:
    """Ultralytics fitness of a segmentation model: ``FITNESS_WEIGHTS`` over box and mask mAP."""
    return float(sum(w * (box[k] + mask[k]) for k, w in FITNESS_WEIGHTS.items()))


def map_metrics(scores: Sequence[ImageScore], truths: Sequence[ImageTruth]) -> tuple[dict[str, float], dict]:
    """Box and mask mAP (and Ultralytics-style P/R) over a split.

    Returns:
        (metrics with keys ``box/...``, ``mask/...``, ``fitness``; the two raw ``ap_summary`` dicts)
    """
    conf, cls, tp_b, tp_m = _concat(scores)
    target = np.concatenate([t.cls for t in truths]).astype(int) if truths else np.zeros(0, int)
    box, mask = ap_summary(tp_b, conf, cls, target), ap_summary(tp_m, conf, cls, target)
    out = {}
    for kind, s in (("box", box), ("mask", mask)):
        for k in ("precision", "recall", "mAP50", "mAP50-95"):
            out[f"{kind}/{k}"] = s[k]
    out["fitness"] = fitness(box, mask)
    return out, {"box": box, "mask": mask}


def prf_at(scores: Sequence[ImageScore], n_truth: int, conf: float) -> dict[str, float]:
    """Micro-averaged precision, recall and F1 of the detections scoring above ``conf``.

    A detection is a true positive when it matches a ground truth of its class at IoU >= 0.5
    (box and mask separately). Pooled over classes (micro average): the operating point is about
    everything the deployed model reports, and a per-class mean on a small split would be driven
    by its rarest classes. With no detection, precision (and F1) is 0. ``conf`` is exclusive
    (``score > conf``), as Ultralytics' NMS applies it.

    Returns:
        ``box/precision``, ``box/recall``, ``box/f1``, the same for ``mask/``, ``dets_per_image``.
    """
    out: dict[str, float] = {}
    n_det = 0
    for kind in ("box", "mask"):
        tp = n_det = 0
        for s in scores:
            keep = s.conf > conf
            n_det += int(keep.sum())
            tp += int((s.tp_box if kind == "box" else s.tp_mask)[keep, 0].sum())
        p = tp / n_det if n_det else 0.0
        r = tp / n_truth if n_truth else 0.0
        out[f"{kind}/precision"] = p
        out[f"{kind}/recall"] = r
        out[f"{kind}/f1"] = 2 * p * r / (p + r) if p + r > 0 else 0.0
    out["dets_per_image"] = n_det / len(scores) if scores else 0.0
    return out


def damage_summary(scores: Sequence[ImageScore], conf: float) -> DamageMAE:
    """Per-vehicle damage-percentage error at ``conf`` over a split (``damage_percent.mae_summary``).

    Needs scores from a ``collect`` pass with ``conf`` among its ``op_confs``.
    """
    from damage.tasks.serving.damage_percent import mae_summary

    return mae_summary([e for s in scores for e in s.damage.get(conf, [])])


def damage_mae(scores: Sequence[ImageScore], conf: float) -> tuple[float, int]:
    """Mean absolute error (percentage points) of the per-vehicle damage percentage at ``conf``.

    Per labelled vehicle (rule in ``damage.tasks.serving.damage_percent``): a labelled vehicle that
    no predicted vehicle matches counts as 0 % predicted.

    Returns:
        (MAE, or NaN when no vehicle is labelled; number of labelled vehicles counted)
    """
    d = damage_summary(scores, conf)
    return d.mae, d.vehicles


def per_class_table(summaries: dict[str, dict], truths: Sequence[ImageTruth],
                    names: dict[int, str]) -> list[dict[str, Any]]:
    """Per-class rows: images and instances in the labels, box and mask AP50 / AP50-95."""
    rows = []
    for c, name in sorted(names.items()):
        n_inst = int(sum(int((t.cls == c).sum()) for t in truths))
        n_img = int(sum(bool((t.cls == c).any()) for t in truths))
        row: dict[str, Any] = {"class": name, "images": n_img, "instances": n_inst}
        for kind in ("box", "mask"):
            s = summaries[kind]
            row[f"{kind}/AP50"] = s["ap50"].get(c) if n_inst else None
            row[f"{kind}/AP50-95"] = s["ap"].get(c) if n_inst else None
        rows.append(row)
    return rows


CLASS_METRICS = {"box/AP50": "box_ap50", "box/AP50-95": "box_ap50-95", "mask/AP50": "mask_ap50",
                 "mask/AP50-95": "mask_ap50-95"}  # per-class table column -> MLflow metric prefix


def class_metrics(rows: Sequence[dict[str, Any]], missing: float | None = None) -> dict[str, float]:
    """Per-class AP as flat metrics: ``mask_ap50/<class>``, ``mask_ap50-95/<class>``, ``box_...``.

    Args:
        rows: ``per_class_table`` rows.
        missing: value for a class without labelled instances (its AP is undefined); None = leave
            the class out (MLflow logging), NaN = keep it visible (the promotion gate fails closed
            on a class it cannot check).

    Example:
        >>> class_metrics([{"class": "dent", "box/AP50": .5, "box/AP50-95": .2, "mask/AP50": .4,
        ...                 "mask/AP50-95": .1}])["mask_ap50/dent"]
        0.4
    """
    out: dict[str, float] = {}
    for row in rows:
        for col, prefix in CLASS_METRICS.items():
            v = row.get(col)
            if v is not None:
                out[f"{prefix}/{row['class']}"] = float(v)
            elif missing is not None:
                out[f"{prefix}/{row['class']}"] = missing
    return out


def class_drops(base: dict[str, float], cand: dict[str, float], prefix: str = "mask_ap50/") -> dict[str, float]:
    """Per-class drop ``base - cand`` of the ``prefix`` metrics (positive: the candidate is worse).

    Classes without a finite figure on the base side (no labelled instance) are skipped; a class
    the candidate has no finite figure for counts as AP 0 (it lost the class).

    Example:
        >>> class_drops({"mask_ap50/dent": .5, "mask_ap50/glass": float("nan")}, {"mask_ap50/glass": .7})
        {'dent': 0.5}
    """
    out = {}
    for k, b in base.items():
        if k.startswith(prefix) and math.isfinite(b):
            c = cand.get(k, 0.0)
            out[k[len(prefix):]] = b - (c if math.isfinite(c) else 0.0)
    return out


def worst_class_drop(base: dict[str, float], cand: dict[str, float],
                     prefix: str = "mask_ap50/") -> tuple[str | None, float]:
    """The class whose figure fell most from ``base`` to ``cand`` and by how much (negative: all rose;
    ``(None, -inf)`` without per-class figures).

    Example:
        >>> worst_class_drop({"mask_ap50/dent": .5, "mask_ap50/glass": .7}, {"mask_ap50/dent": .55,
        ...                                                                    "mask_ap50/glass": .65})
        ('glass', 0.04999999999999993)
    """
    drops = class_drops(base, cand, prefix)
    if not drops:
        return None, -math.inf
    worst = max(drops, key=drops.get)
    return worst, drops[worst]


# ----------------------------------------------------------------------------- model + data


@dataclass
class _Model:
    backend: Any
    names: dict[int, str]
    fmt: str
    imgsz: int
    stride: int


def _check_model_path(model: str | Path) -> Path:
    p = Path(model).expanduser()
    if p.suffix.lower() not in MODEL_SUFFIXES:
        raise DamageError(f"{p}: unsupported model format '{p.suffix}' (expected {' or '.join(MODEL_SUFFIXES)})")
    if not p.is_file():
        raise DamageError(f"{p}: model file not found")
    return p.resolve()


def _fixed_imgsz(backend: Any, fmt: str) -> int | None:
    """The input size an ONNX export is fixed to, or None when it accepts any size."""
    if fmt != "onnx":
        return None
    shape = backend.session.get_inputs()[0].shape
    h, w = shape[2], shape[3]
    if isinstance(h, int) and isinstance(w, int):
        if h != w:
            raise DamageError(f"ONNX input is {h}x{w}: only square inputs are evaluated (letterbox, rect=False)")
        return h
    return None


def _default_imgsz(backend: Any, fmt: str) -> int:
    """Model's own image size: ONNX metadata, else the .pt's training args, else 640."""
    meta = getattr(backend, "metadata", None) or {}
    sz = meta.get("imgsz")
    if sz is None and fmt == "pt":
        sz = (getattr(getattr(backend, "model", None), "args", None) or {}).get("imgsz")
    if isinstance(sz, (list, tuple)):
        sz = max(sz)
    return int(sz) if sz else 640


def open_model(model: str | Path, data_yaml: str | Path, imgsz: int | None = None) -> _Model:
    """``.pt`` (vetted, restricted unpickler) or ``.onnx`` (ONNX Runtime, CPU) via ``AutoBackend``; else DamageError."""
    import torch
    from ultralytics.nn.autobackend import AutoBackend

    from damage.tasks.training.checkpoint import ultralytics_safe_load, vetted_model_path

    p = _check_model_path(model)
    try:
        with ultralytics_safe_load():
            backend = AutoBackend(model=vetted_model_path(p), device=torch.device("cpu"), data=str(data_yaml),
                                  fp16=False, verbose=False)
    except Exception as e:  # corrupt file, wrong opset, not a YOLO checkpoint, refused pickle
        raise DamageError(f"{p}: cannot load model: {e}") from e
    backend.eval()
    fmt = backend.format
    fixed = _fixed_imgsz(backend, fmt)
    if fixed is not None and imgsz is not None and int(imgsz) != fixed:
        raise DamageError(f"{p}: ONNX input is fixed to {fixed}x{fixed}, cannot evaluate at imgsz={imgsz} "
                          f"(export with dynamic=True or pass imgsz={fixed})")
    size = int(imgsz or fixed or _default_imgsz(backend, fmt))
    stride = int(getattr(backend, "stride", 32) or 32)
    if size % stride:
        raise DamageError(f"{p}: imgsz={size} is not a multiple of the model stride {stride}")
    return _Model(backend, dict(backend.names), fmt, size, stride)


def load_split(data_yaml: str | Path, split: str, imgsz: int, stride: int = 32):
    """Ultralytics' val dataset for ``split`` with per-instance, full-resolution masks.

    Returns:
        (dataset, data dict from ``check_det_dataset``)

    Raises:
        DatasetError: unreadable data.yaml, unknown split, or a split without images.
    """
    from ultralytics.cfg import get_cfg
    from ultralytics.data.build import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    data_yaml = Path(data_yaml).expanduser()
    data = load_file(data_yaml, lambda p: check_det_dataset(str(p)), "data.yaml", DatasetError)
    if not data.get(split):
        have = [k for k in ("train", "val", "test") if data.get(k)]
        raise DatasetError(f"{data_yaml}: no split '{split}' (has: {', '.join(have)})")
    # mask_ratio=1 / overlap_mask=False: one full-size mask per instance (see module docstring).
    cfg = get_cfg(overrides={"task": "segment", "imgsz": imgsz, "rect": False, "overlap_mask": False,
                             "mask_ratio": 1, "cache": False, "fraction": 1.0, "single_cls": False})
    try:
        ds = build_yolo_dataset(cfg, data[split], 1, data, mode="val", rect=False, stride=stride)
    except Exception as e:
        raise DatasetError(f"{data_yaml}: cannot load split '{split}': {e}") from e
    if len(ds) == 0:
        raise DatasetError(f"{data_yaml}: split '{split}' has no images")
    return ds, data


# ----------------------------------------------------------------------------- one inference pass


@dataclass
class Collected:
    """What one pass over a split produced (see ``collect``).

    Attributes:
        truths: per-image ground truth at the prototype resolution (mAP matching).
        map_scores: NMS IoU -> per-image ``ImageScore`` at the conf floor (mAP).
        op_scores: NMS IoU -> per-image ``ImageScore`` of deployment-style detections (one class
            per box) above the lowest operating conf, matched at full letterbox resolution,
            with the per-vehicle damage-percentage errors per operating conf.
        speed: ms per image: ``preprocess``, ``inference``, ``postprocess`` (NMS + mask decode
            at the first IoU of ``ious``).
    """

    names: dict[int, str]
    imgsz: int
    model_format: str
    truths: list[ImageTruth]
    map_scores: dict[float, list[ImageScore]]
    op_scores: dict[float, list[ImageScore]]
    speed: dict[str, float]
    seconds: float
    confusion: Any = None  # Ultralytics ConfusionMatrix when ``collect(confusion=True)``


def split_outputs(out: Any):
    """(predictions (B, 4+nc+nm, A), prototypes (B, nm, h, w)) from any backend's output."""
    items = list(out) if isinstance(out, (list, tuple)) else [out]
    if items and isinstance(items[0], (list, tuple)):  # .pt in eval mode: ((preds, proto), raw)
        items = list(items[0])
    preds = next((t for t in items if getattr(t, "ndim", 0) == 3), None)
    proto = next((t for t in items if getattr(t, "ndim", 0) == 4), None)
    if preds is None or proto is None:
        raise DamageError("the model has no mask prototype output: not a segmentation model")
    return preds, proto


def _truth_tensors(item: dict, names: dict[int, str], proto_hw: tuple[int, int]) -> tuple[ImageTruth, Any]:
    """ImageTruth at prototype resolution (for mAP), plus full-resolution masks (op + damage)."""
    import torch
    import torch.nn.functional as F
    from ultralytics.utils import ops

    from damage.tasks.serving.damage_percent import damage_report

    h, w = item["img"].shape[1:]
    cls = item["cls"].view(-1).long().numpy()
    boxes = ops.xywh2xyxy(item["bboxes"].float()) * torch.tensor([w, h, w, h], dtype=torch.float32)
    full = item["masks"].bool()
    if full.shape[0] != len(cls):
        raise DatasetError(f"{item['im_file']}: {len(cls)} labels but {full.shape[0]} masks")
    if len(cls):
        # Ultralytics val: bilinear down to the prototype grid, then > 0.5.
        small = F.interpolate(full[None].float(), proto_hw, mode="bilinear", align_corners=False)[0].gt(0.5)
        dmg = damage_report(list(full.numpy()), [names.get(int(c), str(c)) for c in cls],
                            vehicle_class=VEHICLE_CLASS).damage_percent
    else:
        small = torch.zeros((0, *proto_hw), dtype=torch.bool)
        dmg = None
    truth = ImageTruth(Path(item["im_file"]).name, boxes.numpy(), cls, small.numpy(), dmg)
    return truth, full.numpy()


def _map_scores(pred, proto, truth: ImageTruth, iou: float, nc: int, max_det: int, conf_floor: float,
                imgsz: tuple[int, int], end2end: bool = False) -> ImageScore:
    """Validation NMS (multi-label) at the conf floor, masks at prototype resolution, matched.

    ``end2end``: ``pred`` holds the top-k rows of an NMS-free (YOLO26 one-to-one) export; they
    are only filtered by the floor (Ultralytics' end-to-end branch; ``iou`` has no effect).
    """
    from ultralytics.utils import nms, ops

    det = nms.non_max_suppression(pred[None], conf_floor, iou, nc=nc, multi_label=True, max_det=max_det,
                                  end2end=end2end)[0]
    masks = ops.process_mask(proto, det[:, 6:], det[:, :4], shape=imgsz)
    return score_image(ImageDets(det[:, :4].numpy(), det[:, 4].numpy(), det[:, 5].long().numpy(),
                                 masks.bool().numpy()), truth)


def _op_scores(pred, proto, truth: ImageTruth, truth_full: np.ndarray, iou: float, confs: Sequence[float],
               names: dict[int, str], max_det: int, imgsz: tuple[int, int], end2end: bool = False) -> ImageScore:
    """Deployment NMS (best class per box) above min(confs), full-res masks, per-vehicle damage % per conf."""
    from ultralytics.utils import nms, ops

    from damage.tasks.serving.damage_percent import vehicle_errors

    det = nms.non_max_suppression(pred[None], min(confs), iou, nc=len(names), multi_label=False,
                                  max_det=max_det, end2end=end2end)[0]
    masks = ops.process_mask(proto, det[:, 6:], det[:, :4], shape=imgsz, upsample=True).bool().numpy()
    full_truth = ImageTruth(truth.name, truth.boxes, truth.cls, truth_full, truth.damage_percent)
    s = score_image(ImageDets(det[:, :4].numpy(), det[:, 4].numpy(), det[:, 5].long().numpy(), masks),
                    full_truth)
    order = np.argsort(-det[:, 4].numpy(), kind="stable")
    masks = masks[order]
    truth_names = [names.get(int(c), str(c)) for c in truth.cls]
    for c in confs:
        keep = np.flatnonzero(s.conf > c)
        s.damage[c] = vehicle_errors(list(truth_full), truth_names, [masks[i] for i in keep],
                                     [names[int(s.cls[i])] for i in keep], vehicle_class=VEHICLE_CLASS)
    return s


def collect(model: str | Path, data_yaml: str | Path, split: str = "val", imgsz: int | None = None,
            ious: Sequence[float] = (0.7,), op_confs: Sequence[float] = (), max_det: int = 300,
            batch: int = 1, conf_floor: float = CONF_FLOOR, confusion: Any = None,
            progress: str | None = None) -> Collected:
    """Run the network once per image and score its output at every NMS IoU of ``ious``.

    Args:
        model: ``.pt`` or ``.onnx``.
        data_yaml: YOLO-seg data.yaml.
        split: split key of the data.yaml.
        imgsz: letterbox size; None = the model's own (ONNX metadata / .pt training args).
        ious: NMS IoU thresholds to score at (mAP at ``conf_floor`` for each).
        op_confs: operating confidences; when given, deployment-style detections and damage
            percentages are also scored for each IoU (``Collected.op_scores``).
        max_det: max detections per image after NMS.
        batch: images per forward pass.
        conf_floor: confidence floor of the mAP detections (keep 0.001).
        confusion: True = fill a confusion matrix (``damage.tasks.evaluation.plots``) at the first IoU of
            ``ious``, returned as ``Collected.confusion``; None = none.
        progress: a label (e.g. ``"sweep"``): show a progress bar / Prefect progress artifact
            over the images; None = silent.

    Raises:
        DamageError, DatasetError: bad model, data or arguments.
    """
    import torch

    if not ious:
        raise DamageError("collect: at least one NMS IoU is needed")
    for v in (*ious, *op_confs, conf_floor):
        if not 0 <= v <= 1:
            raise DamageError(f"thresholds must be in [0, 1], got {v}")
    t_start = time.perf_counter()
    m = open_model(model, data_yaml, imgsz)
    if confusion is True:
        from damage.tasks.evaluation.plots import new_confusion

        confusion = new_confusion(m.names)
    ds, _ = load_split(data_yaml, split, m.imgsz, m.stride)
    data_nc = len(ds.data["names"])
    if data_nc != len(m.names):
        raise DamageError(f"{model}: model has {len(m.names)} classes, {data_yaml} has {data_nc}")
    truths: list[ImageTruth] = []
    map_scores: dict[float, list[ImageScore]] = {float(v): [] for v in ious}
    op_scores: dict[float, list[ImageScore]] = {float(v): [] for v in ious} if op_confs else {}
    t_pre = t_inf = t_post = 0.0
    first_iou = float(ious[0])
    from contextlib import nullcontext

    from damage.tasks.core.progress import track

    end2end = bool(getattr(m.backend, "end2end", False))  # YOLO26 exported with its NMS-free head
    bar_cm = track(progress, f"{progress}: images", len(ds), artifact_every=16) if progress else nullcontext()
    with torch.inference_mode(), bar_cm as bar:
        m.backend(torch.zeros(1, 3, m.imgsz, m.imgsz))  # warm-up (lazy init of kernels), not timed
        for start in range(0, len(ds), batch):
            t0 = time.perf_counter()
            items = [ds[i] for i in range(start, min(start + batch, len(ds)))]
            im = torch.stack([it["img"] for it in items]).float() / 255
            t1 = time.perf_counter()
            preds, protos = split_outputs(m.backend(im))
            preds, protos = preds.float(), protos.float()
            t2 = time.perf_counter()
            t_pre += t1 - t0
            t_inf += t2 - t1
            hw = tuple(im.shape[2:])
            for i, item in enumerate(items):
                truth, truth_full = _truth_tensors(item, m.names, tuple(protos.shape[2:]))
                truths.append(truth)
                for v in map_scores:
                    tp = time.perf_counter()
                    map_scores[v].append(_map_scores(preds[i], protos[i], truth, v, len(m.names), max_det,
                                                     conf_floor, hw, end2end))
                    if v == first_iou:
                        t_post += time.perf_counter() - tp
                if confusion is not None:
                    from damage.tasks.evaluation.plots import confusion_update

                    confusion_update(confusion, preds[i], truth, first_iou, len(m.names), max_det)
                for v in op_scores:
                    op_scores[v].append(_op_scores(preds[i], protos[i], truth, truth_full, v, op_confs,
                                                   m.names, max_det, hw, end2end))
            if bar is not None:
                bar.advance(len(items))
    n = len(truths)
    speed = {"preprocess": 1e3 * t_pre / n, "inference": 1e3 * t_inf / n, "postprocess": 1e3 * t_post / n}
    return Collected(m.names, m.imgsz, m.fmt, truths, map_scores, op_scores, speed,
                     time.perf_counter() - t_start, confusion)


# ----------------------------------------------------------------------------- evaluate


def evaluate_model(model: str | Path, data_yaml: str | Path, split: str = "val", imgsz: int | None = None,
                   conf: float = CONF_FLOOR, iou: float = 0.7, max_det: int = 300, batch: int = 1,
                   plots_dir: str | Path | None = None) -> EvalResult:
    """Box and mask precision, recall, mAP50, mAP50-95, per-class AP, fitness and speed.

    mAP is computed from detections down to ``conf`` = 0.001, the standard floor, whatever the
    operating thresholds: a higher floor truncates the precision-recall curve and misstates AP
    (raise it only to reproduce such a figure). Precision and recall are Ultralytics' (class
    means at the confidence that maximises mean F1); the operating-point figures come from
    ``sweep_thresholds``. Speed is ms per image on this machine: pre-process (read, resize,
    letterbox, to tensor; label formatting included), inference, post-process (NMS + mask
    decode); ``latency_ms`` is their sum.

    Args:
        model: ``.pt`` or ``.onnx`` (FP32, FP16 or INT8; ONNX Runtime on CPU).
        data_yaml: YOLO-seg data.yaml.
        split: split to evaluate.
        imgsz: letterbox size; None = the model's own.
        conf: confidence floor of the mAP detections.
        iou: NMS IoU.
        max_det: max detections per image.
        batch: images per forward pass.
        plots_dir: when given, box/mask PR and F1 curves per class and the confusion matrix are
            drawn there (``damage.tasks.evaluation.plots``) and listed in ``EvalResult.plots``.

    Raises:
        DamageError, DatasetError: bad model, data or arguments (message names the file).
    """
    col = collect(model, data_yaml, split, imgsz, ious=(iou,), max_det=max_det, batch=batch, conf_floor=conf,
                  confusion=True if plots_dir is not None else None)
    metrics, summaries = map_metrics(col.map_scores[float(iou)], col.truths)
    metrics["speed/preprocess_ms"] = col.speed["preprocess"]
    metrics["speed/inference_ms"] = col.speed["inference"]
    metrics["speed/postprocess_ms"] = col.speed["postprocess"]
    metrics["latency_ms"] = sum(col.speed.values())
    metrics["images"] = float(len(col.truths))
    metrics["instances"] = float(sum(len(t.cls) for t in col.truths))
    per_class = per_class_table(summaries, col.truths, col.names)
    metrics.update(class_metrics(per_class))
    plots: list[str] = []
    if plots_dir is not None:
        from damage.tasks.evaluation.plots import write_eval_plots

        target = np.concatenate([t.cls for t in col.truths]).astype(int) if col.truths else np.zeros(0, int)
        plots = [str(p) for p in write_eval_plots(*_concat(col.map_scores[float(iou)]), target, col.names,
                                                    plots_dir, col.confusion)]
    return EvalResult(metrics, per_class, str(model), str(data_yaml), split, col.imgsz, conf, iou,
                      col.model_format, plots)


@dataclass(frozen=True)
class Evaluator:
    """The evaluation settings, built once from config and passed to every caller of ``evaluate_model``.

    The nightly flow, the CLI, the promotion gate, compression, quantization and distillation
    all measure models through one of these, so a candidate, its parent and production are
    compared on the same split, size and thresholds.

    Example:
        >>> ev = Evaluator.from_config(cfg)          # cfg.evaluate + the one image-size rule
        >>> ev("best.onnx", "data.yaml").metrics["mask/mAP50"]
        >>> gate_candidate(..., evaluate_fn=ev.metrics_fn("data.yaml"))
    """

    split: str = "val"
    imgsz: int | None = None  # None: the model's own size
    conf: float = CONF_FLOOR
    iou: float = 0.7
    max_det: int = 300

    @classmethod
    def from_config(cls, cfg: Config, **changes: Any) -> Evaluator:
        """``cfg.evaluate`` at ``cfg.imgsz`` (``export.imgsz``, else ``train.imgsz``); ``changes`` override."""
        e = cfg.evaluate
        return cls(**{"split": e.split, "imgsz": cfg.imgsz, "conf": e.conf, "iou": e.iou, "max_det": e.max_det,
                      **changes})

    def __call__(self, model: str | Path, data_yaml: str | Path, plots_dir: str | Path | None = None) -> EvalResult:
        """``evaluate_model`` with these settings (curves and confusion matrix into ``plots_dir`` if given)."""
        return evaluate_model(model, data_yaml, self.split, self.imgsz, self.conf, self.iou, self.max_det,
                              plots_dir=plots_dir)

    def metrics_fn(self, data_yaml: str | Path) -> Callable[[Path], dict[str, float]]:
        """``model -> metrics`` on ``data_yaml`` (the ``evaluate_fn`` of the gate and of quantization)."""
        return lambda model: self(model, data_yaml).metrics

    def params(self) -> dict[str, Any]:
        """The settings as MLflow parameters."""
        return asdict(self)


def evaluate_step(model: str | Path, data_yaml: str | Path, evaluator: Evaluator, parent_run_id: str,
                  name: str = "evaluate", dataset_fingerprint: str | None = None, system_metrics_s: float = 0.0,
                  dataset_source: str | None = None) -> EvalResult:
    """``evaluator(model, data_yaml)`` in a nested MLflow run ``name`` under ``parent_run_id`` (for the flows).

    Logs the parameters, every metric, the per-class table (``per_class.json``), the full
    result (``evaluation.json``), the curves and confusion matrix (``plots/``), the dataset as
    the run's input (digest = fingerprint) and system metrics every ``system_metrics_s`` seconds
    (0 = off), and tags the run with the model path and format.
    """
    import tempfile

    from damage.tasks.core import tracking
    from damage.tasks.core.sysmetrics import system_metrics
    from damage.tasks.data.mlflow_input import log_dataset_input

    with tracking.step_run(parent_run_id, name) as (c, run_id), tempfile.TemporaryDirectory(prefix="plots-") as tmp:
        log_dataset_input(c, run_id, data_yaml, dataset_fingerprint, "evaluation", dataset_source)
        with system_metrics(run_id, system_metrics_s, c.tracking_uri):
            res = evaluator(model, data_yaml, plots_dir=tmp)
        for p in res.plots:
            tracking.log_artifact(c, run_id, p, "plots")
        res.plots = [f"plots/{Path(p).name}" for p in res.plots]  # the temp files are gone: artifact paths
        tracking.log_params(c, run_id, {"model": str(model), "data": str(data_yaml),
                                        **evaluator.params(), "imgsz": res.imgsz})
        tracking.log_metrics(c, run_id, res.metrics)
        tracking.set_tags(c, run_id, {"model.format": res.model_format, "model.path": str(model)})
        tracking.log_dict(c, run_id, json_safe(res.per_class), "per_class.json")
        tracking.log_dict(c, run_id, json_safe(res.to_dict()), "evaluation.json")
    return res


__all__ = ["CONF_FLOOR", "EvalResult", "Evaluator", "collect", "evaluate_model", "evaluate_step"]
