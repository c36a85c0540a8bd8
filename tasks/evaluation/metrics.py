"""The numpy metric core of the evaluator: per-image matching at IoU 0.50:0.95 (boxes and masks), AP and
mAP summaries (Ultralytics' ``ap_per_class``), P/R/F1 at an operating point, per-vehicle damage-% errors, and
the per-class table and drops the gate, the compression gate and the fine-tune guard read.

Torch-free: ``tasks.evaluation.evaluate`` runs the one inference pass and hands its ``ImageScore``s here.
"""


from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
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


def concat(scores: Sequence[ImageScore]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
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
    conf, cls, tp_b, tp_m = concat(scores)
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


