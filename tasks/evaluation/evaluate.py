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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from damage.tasks.core.errors import DamageError, DatasetError, load_file
from damage.tasks.core.jsonsafe import json_safe
from damage.tasks.evaluation.metrics import (
    CONF_FLOOR,
    VEHICLE_CLASS,
    EvalResult,
    ImageDets,
    ImageScore,
    ImageTruth,
    class_metrics,
    concat,
    map_metrics,
    per_class_table,
    score_image,
)

if TYPE_CHECKING:
    from damage.tasks.core.config import Config, RayConfig

log = logging.getLogger(__name__)

MODEL_SUFFIXES = (".pt", ".onnx")


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


@dataclass
class ImageResult:
    """What one image of a pass produced (``ImageScorer``): its truth, its scores per NMS IoU, its share of the
    confusion matrix and of the time spent (pre-process, inference, post-process, in seconds)."""

    truth: ImageTruth
    map_scores: dict[float, ImageScore]
    op_scores: dict[float, ImageScore]
    confusion: np.ndarray | None
    seconds: tuple[float, float, float]


class ImageScorer:
    """The per-image work of ``collect``: the model opened and the split loaded once, then images scored by
    index. ``collect`` calls it over the whole split in this process, or ``damage.tasks.scale.shards`` on Ray
    workers (one per worker); either way each image's result comes from this code.

    Raises:
        DamageError, DatasetError: bad model, data or arguments.
    """

    def __init__(self, model: str | Path, data_yaml: str | Path, split: str = "val", imgsz: int | None = None,
                 ious: Sequence[float] = (0.7,), op_confs: Sequence[float] = (), max_det: int = 300,
                 batch: int = 1, conf_floor: float = CONF_FLOOR, confusion: bool = False) -> None:
        import torch

        self.m = open_model(model, data_yaml, imgsz)
        self.ds, _ = load_split(data_yaml, split, self.m.imgsz, self.m.stride)
        data_nc = len(self.ds.data["names"])
        if data_nc != len(self.m.names):
            raise DamageError(f"{model}: model has {len(self.m.names)} classes, {data_yaml} has {data_nc}")
        self.ious, self.op_confs = [float(v) for v in ious], [float(v) for v in op_confs]
        self.max_det, self.batch, self.conf_floor, self.confusion = max_det, max(1, int(batch)), conf_floor, confusion
        self.end2end = bool(getattr(self.m.backend, "end2end", False))  # YOLO26 exported with its NMS-free head
        with torch.inference_mode():
            self.m.backend(torch.zeros(1, 3, self.m.imgsz, self.m.imgsz))  # warm-up (lazy init of kernels), not timed

    def __len__(self) -> int:
        return len(self.ds)

    def __call__(self, indices: Sequence[int]) -> list[ImageResult]:
        """Score the images ``indices`` of the split, ``batch`` per forward pass."""
        import torch

        out: list[ImageResult] = []
        m, nc = self.m, len(self.m.names)
        with torch.inference_mode():
            for start in range(0, len(indices), self.batch):
                t0 = time.perf_counter()
                items = [self.ds[int(i)] for i in indices[start:start + self.batch]]
                im = torch.stack([it["img"] for it in items]).float() / 255
                t1 = time.perf_counter()
                preds, protos = split_outputs(m.backend(im))
                preds, protos = preds.float(), protos.float()
                t2 = time.perf_counter()
                hw = tuple(im.shape[2:])
                for i, item in enumerate(items):
                    truth, truth_full = _truth_tensors(item, m.names, tuple(protos.shape[2:]))
                    map_s: dict[float, ImageScore] = {}
                    t_post = 0.0
                    for k, v in enumerate(self.ious):
                        tp = time.perf_counter()
                        map_s[v] = _map_scores(preds[i], protos[i], truth, v, nc, self.max_det, self.conf_floor,
                                               hw, self.end2end)
                        if k == 0:
                            t_post = time.perf_counter() - tp
                    cm = None
                    if self.confusion:
                        from damage.tasks.evaluation.plots import confusion_update, new_confusion

                        one = new_confusion(m.names)
                        confusion_update(one, preds[i], truth, self.ious[0], nc, self.max_det)
                        cm = one.matrix
                    op_s = {v: _op_scores(preds[i], protos[i], truth, truth_full, v, self.op_confs, m.names,
                                          self.max_det, hw, self.end2end) for v in self.ious} if self.op_confs else {}
                    out.append(ImageResult(truth, map_s, op_s, cm,
                                           ((t1 - t0) / len(items), (t2 - t1) / len(items), t_post)))
        return out


def collect(model: str | Path, data_yaml: str | Path, split: str = "val", imgsz: int | None = None,
            ious: Sequence[float] = (0.7,), op_confs: Sequence[float] = (), max_det: int = 300,
            batch: int = 1, conf_floor: float = CONF_FLOOR, confusion: Any = None,
            progress: str | None = None, ray: RayConfig | None = None) -> Collected:
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
        ray: the ``ray:`` section to score the images on Ray workers (Ray connected by the caller,
            ``damage.tasks.scale.ray_runtime.connect``); None = in this process. The figures are the same:
            every image is scored by the same ``ImageScorer`` code and the results are used in index order.

    Raises:
        DamageError, DatasetError: bad model, data or arguments.
    """
    if not ious:
        raise DamageError("collect: at least one NMS IoU is needed")
    for v in (*ious, *op_confs, conf_floor):
        if not 0 <= v <= 1:
            raise DamageError(f"thresholds must be in [0, 1], got {v}")
    t_start = time.perf_counter()
    kwargs = {"model": model, "data_yaml": data_yaml, "split": split, "imgsz": imgsz, "ious": tuple(ious),
              "op_confs": tuple(op_confs), "max_det": max_det, "batch": batch, "conf_floor": conf_floor,
              "confusion": confusion is not None}
    scorer = ImageScorer(**kwargs)  # on the driver too: checks model and data, names the classes
    m, n = scorer.m, len(scorer)
    from contextlib import nullcontext

    from damage.tasks.core.progress import track

    bar_cm = track(progress, f"{progress}: images", n, artifact_every=16) if progress else nullcontext()
    with bar_cm as bar:
        if ray is None:
            results: list[ImageResult] = []
            for start in range(0, n, scorer.batch):
                results += scorer(list(range(start, min(start + scorer.batch, n))))
                if bar is not None:
                    bar.advance(len(results) - start)
        else:
            from damage.tasks.scale.shards import map_indices

            kwargs["imgsz"] = m.imgsz  # the driver's resolved size: every worker letterboxes alike
            results = map_indices(n, ImageScorer, kwargs, ray, ship=("model",),
                                  on_result=(lambda i, r: bar.advance(1)) if bar is not None else None)
    if confusion is True:
        from damage.tasks.evaluation.plots import new_confusion

        confusion = new_confusion(m.names)
    if confusion is not None:
        for r in results:
            confusion.matrix += r.confusion
    truths = [r.truth for r in results]
    map_scores = {v: [r.map_scores[v] for r in results] for v in scorer.ious}
    op_scores = {v: [r.op_scores[v] for r in results] for v in scorer.ious} if op_confs else {}
    speed = {k: 1e3 * sum(r.seconds[j] for r in results) / n
             for j, k in enumerate(("preprocess", "inference", "postprocess"))}
    return Collected(m.names, m.imgsz, m.fmt, truths, map_scores, op_scores, speed,
                     time.perf_counter() - t_start, confusion)


# ----------------------------------------------------------------------------- evaluate


def evaluate_model(model: str | Path, data_yaml: str | Path, split: str = "val", imgsz: int | None = None,
                   conf: float = CONF_FLOOR, iou: float = 0.7, max_det: int = 300, batch: int = 1,
                   plots_dir: str | Path | None = None, ray: RayConfig | None = None) -> EvalResult:
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
        ray: score the images on Ray workers (``collect``); None = in this process. Same figures.

    Raises:
        DamageError, DatasetError: bad model, data or arguments (message names the file).
    """
    col = collect(model, data_yaml, split, imgsz, ious=(iou,), max_det=max_det, batch=batch, conf_floor=conf,
                  confusion=True if plots_dir is not None else None, ray=ray)
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
        plots = [str(p) for p in write_eval_plots(*concat(col.map_scores[float(iou)]), target, col.names,
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
    ray: RayConfig | None = field(default=None, compare=False)  # score on Ray workers (same figures); not a param
    plots: bool = field(default=True, compare=False)  # draw the curves where a caller asks (evaluate.plots)

    @classmethod
    def from_config(cls, cfg: Config, **changes: Any) -> Evaluator:
        """``cfg.evaluate`` at ``cfg.imgsz`` (``export.imgsz``, else ``train.imgsz``); ``changes`` override."""
        e = cfg.evaluate
        return cls(**{"split": e.split, "imgsz": cfg.imgsz, "conf": e.conf, "iou": e.iou, "max_det": e.max_det,
                      "plots": e.plots, **changes})

    def __call__(self, model: str | Path, data_yaml: str | Path, plots_dir: str | Path | None = None) -> EvalResult:
        """``evaluate_model`` with these settings (curves and confusion matrix into ``plots_dir`` if given and
        ``plots`` is on)."""
        return evaluate_model(model, data_yaml, self.split, self.imgsz, self.conf, self.iou, self.max_det,
                              plots_dir=plots_dir if self.plots else None, ray=self.ray)

    def metrics_fn(self, data_yaml: str | Path) -> Callable[[Path], dict[str, float]]:
        """``model -> metrics`` on ``data_yaml`` (the ``evaluate_fn`` of the gate and of quantization)."""
        return lambda model: self(model, data_yaml).metrics

    def params(self) -> dict[str, Any]:
        """The settings as MLflow parameters (where the images were scored, and whether curves were drawn, are not:
        they change no figure)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("ray", "plots")}


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
