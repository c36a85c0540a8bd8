"""Torch-free predictor for exported YOLO-seg models (YOLOv8, YOLO11, YOLO26), with damage percentages.

Imports only numpy, OpenCV, ONNX Runtime (or OpenVINO, ``damage.tasks.serving.backends``) and the
standard library (plus the numpy-only ``damage.tasks.serving.damage_percent`` and the stdlib-only
``damage.tasks.core.errors`` / ``damage.tasks.core.images``), so a claim app or a serving container can run it
without torch, ultralytics or prefect. Either runtime reads the same ``.onnx`` file; ``backend``
picks one (``auto``: the one the export measured fastest, see ``damage.tasks.serving.backends``).

Hostile input is bounded: every image's pixel count is checked from its header before it is
decoded (``max_pixels``: argument, else ``damage.max_pixels`` in the ONNX metadata, which may only lower
``DEFAULT_MAX_PIXELS``); masks stay cropped to their box; at most ``max_det`` instances per image; the
metadata's types and ranges and a fixed graph input's sides (``MAX_IMGSZ``) are validated.

The maths follow Ultralytics' predictor exactly, so results match ``YOLO(model.onnx).predict(...,
retina_masks=True)``:

* letterbox: resize (INTER_LINEAR) to fit ``imgsz`` keeping the aspect ratio, pad with grey 114
  centred (``LetterBox(auto=False)``), BGR->RGB, /255;
* class-aware NMS: best class per anchor, ``score > conf``, boxes offset by ``class * 7680``,
  greedy IoU suppression (``iou > thr``), at most ``max_det`` kept;
* end-to-end exports (YOLO26's NMS-free one-to-one head, ``end2end`` in Ultralytics' metadata):
  the graph already returns top-k rows ``x1, y1, x2, y2, score, class, coefficients...``; rows with
  ``score > conf`` are kept in their order, at most ``max_det``, and no NMS runs (``iou`` is unused).
  Their TopK size is fixed at export, so they are always fed the full square ``imgsz`` (fewer anchors otherwise);
* masks: logits = coefficients x prototypes, mapped to the original image with Ultralytics'
  "native" path (optional x1/x2/x4 bilinear upsample, remove the letterbox padding, bilinear
  resize to the original size), ``> 0`` (sigmoid > 0.5), cropped to the box. Both bilinear
  steps are linear and separable, so they are folded into two small matrices per image size and
  evaluated only on each box's rows and columns: exact, and cheap for small instances.

Large photos can be sliced (``slices``: ``off`` | ``auto`` | ``{size, overlap}``, default the ``damage.slices``
metadata): overlapping tiles at the model's scale plus one downscaled whole-image pass, batched and merged
into full-resolution masks by ``damage.tasks.serving.slicing``; ``off`` is exactly the unsliced predictor.

Example:
    >>> p = Predictor("model.onnx")
    >>> [r] = p.predict(["car.jpg"])
    >>> r.damage.damage_percent, [(i.name, round(i.score, 2)) for i in r.instances]
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..core.errors import DamageError
from ..core.images import DEFAULT_MAX_PIXELS, check_image_bytes, check_pixels
from .backends import open_runtime, raw_metadata, resolve_backend
from .damage_percent import BoxMask, DamageReport, damage_report
from .mask_decode import mask_from_logits, native_axes, single_thread_matmul, taps
from .metadata import MAX_IMGSZ
from .metadata import decode as decode_metadata
from .metadata import validate as validate_metadata
from .slicing import parse_slices, predict_images

__all__ = ["Instance", "Prediction", "Predictor", "letterbox", "nms", "read_image", "read_metadata"]

DEFAULT_CONF = 0.25
DEFAULT_IOU = 0.7
MAX_WH = 7680  # per-class box offset for class-aware NMS (Ultralytics' value)
MAX_NMS = 30000  # boxes entering NMS at most, highest scores first
NMS_MATRIX_MAX = 2048  # NMS over at most this many boxes computes all pair IoUs at once (16 MB per float32 matrix)
MAX_DET = 1000  # instances per image at most, whatever the caller asks
AXES_CACHE = 16  # image sizes whose resampling matrices are kept
LOGIT_CHUNK = 64  # instances whose prototype-resolution mask logits are computed in one GEMM
PAD_VALUE = 114
ImageLike = str | os.PathLike | np.ndarray


# ----------------------------------------------------------------------------- results


class _LazyPolygon:
    """``Instance.polygon``: traced from the mask on first read when the instance was built without one.

    The outline is for the JSON output and the overlay; the predictor's own result (masks, damage
    percentage) never needs it, so ``Predictor.predict`` leaves it to whoever reads it (it costs
    a contour trace per instance: about a quarter of the post-processing of a busy photo). A
    dataclass field whose default is a descriptor: ``Instance(..., polygon=[...])`` still stores
    a given outline.
    """

    def __set_name__(self, owner, name: str) -> None:
        self.slot = f"_{name}"

    def __get__(self, obj, objtype=None):
        if obj is None:
            return None  # the dataclass default
        v = obj.__dict__.get(self.slot)
        if v is None:
            m = obj.mask
            if isinstance(m, BoxMask):
                v = _polygon(m.crop, m.x0, m.y0)
            else:
                v = _polygon(np.ascontiguousarray(m, dtype=bool), 0, 0)
            obj.__dict__[self.slot] = v
        return v

    def __set__(self, obj, value) -> None:
        obj.__dict__[self.slot] = value


@dataclass
class Instance:
    """One detected instance, in original-image pixels.

    Attributes:
        id: index in ``Prediction.instances`` (score order).
        cls: class index; ``name`` its class name.
        score: confidence.
        box: ``[x1, y1, x2, y2]`` float pixels, clipped to the image.
        mask: the instance's HxW mask of the original image as a ``BoxMask`` (stored as its box
            crop; ``np.asarray(mask)`` gives the full frame when really needed).
        area_px: pixels in ``mask``.
        polygon: largest outer contour of the mask, simplified (``[[x, y], ...]``, ints); traced
            from ``mask`` on first read when not given.
        vehicle_id: the vehicle instance this damage is assigned to (a vehicle: its own id),
            None for damage outside every vehicle.
    """

    id: int
    cls: int
    name: str
    score: float
    box: list[float]
    mask: BoxMask | np.ndarray
    area_px: int
    polygon: list[list[int]] | None = _LazyPolygon()  # type: ignore[assignment]
    vehicle_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "class": self.name,
            "score": round(float(self.score), 5),
            "box": [round(float(v), 2) for v in self.box],
            "area_px": int(self.area_px),
            "polygon": self.polygon,
            "vehicle_id": self.vehicle_id,
        }


@dataclass
class Prediction:
    """Everything predicted for one image."""

    width: int
    height: int
    instances: list[Instance] = field(default_factory=list)
    damage: DamageReport = field(default_factory=DamageReport)

    def to_dict(self, image: str = "", model: str = "", conf: float = 0.0, iou: float = 0.0) -> dict[str, Any]:
        """The JSON document of ``damage predict`` (also what the MLflow pyfunc returns per row)."""
        return {
            "image": str(image),
            "width": int(self.width),
            "height": int(self.height),
            "model": str(model),
            "conf": float(conf),
            "iou": float(iou),
            "instances": [i.to_dict() for i in self.instances],
            "vehicles": [
                {"id": v["id"], "area_px": v["area_px"], "damage_px": v["damage_px"],
                 "damage_percent": round(v["damage_percent"], 3),
                 "by_class": {c: round(p, 3) for c, p in v["by_class"].items()}}
                for v in self.damage.vehicles
            ],
            "damage_percent": None if self.damage.damage_percent is None else round(self.damage.damage_percent, 3),
            "note": self.damage.note,
        }


# ----------------------------------------------------------------------------- metadata / input


def read_metadata(onnx_path: str | os.PathLike) -> dict[str, Any]:
    """Decoded metadata of an exported model: names (list), imgsz ([h, w]), stride, task, thresholds.

    Reads Ultralytics' keys (``names``, ``imgsz``, ``stride``, ``task``) and the pipeline's
    ``damage.*`` keys (JSON values, see ``damage.tasks.export.onnx``).
    """
    return decode_metadata(raw_metadata(Path(onnx_path)))


def read_image(src: ImageLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """BGR uint8 image from a path or an array (grey and BGRA arrays are converted).

    A file's pixel count is read from its header and refused above ``max_pixels`` before
    anything is decoded.

    Raises:
        DamageError: the file is missing, too large (``ImageTooLarge``) or not a decodable image.
    """
    if isinstance(src, np.ndarray):
        im = src
        if im.ndim >= 2:
            check_pixels(int(im.shape[1]), int(im.shape[0]), max_pixels, "image array")
        if im.dtype != np.uint8:
            raise DamageError(f"image array must be uint8, got {im.dtype}")
        if im.ndim == 2:
            return cv2.cvtColor(im, cv2.COLOR_GRAY2BGR)
        if im.ndim == 3 and im.shape[2] == 4:
            return cv2.cvtColor(im, cv2.COLOR_BGRA2BGR)
        if im.ndim != 3 or im.shape[2] != 3:
            raise DamageError(f"image array must be HxW, HxWx3 or HxWx4, got shape {im.shape}")
        return im
    path = Path(src)
    if not path.is_file():
        raise DamageError(f"{path}: image not found")
    data = np.fromfile(str(path), np.uint8)  # fromfile + imdecode: works for any path encoding
    return decode_image(data, max_pixels, str(path))


def decode_image(data: np.ndarray | bytes, max_pixels: int, name: str) -> np.ndarray:
    """Decode an encoded image (BGR) after checking its header's pixel count against ``max_pixels``."""
    buf = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if not buf.size:
        raise DamageError(f"{name}: not a readable image (empty)")
    check_image_bytes(buf[: 1 << 20].tobytes(), max_pixels, name)
    im = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if im is None or im.size == 0:
        raise DamageError(f"{name}: not a readable image")
    return im


def letterbox(im: np.ndarray, new_shape: tuple[int, int], auto: bool = False,
              stride: int = 32) -> tuple[np.ndarray, tuple[float, float, int, int]]:
    """Ultralytics ``LetterBox(new_shape, auto, center=True, stride)``: resize to fit, pad grey 114.

    With ``auto`` the padding is only what makes each side a multiple of ``stride`` (the
    "minimum rectangle" Ultralytics' predictor uses with dynamic-shape models).

    Returns:
        The padded BGR image and ``(gain_y, gain_x, pad_top, pad_left)``.
    """
    h0, w0 = im.shape[:2]
    r = min(new_shape[0] / h0, new_shape[1] / w0)
    new_w, new_h = max(round(w0 * r), 1), max(round(h0 * r), 1)
    dw, dh = new_shape[1] - new_w, new_shape[0] - new_h
    if auto:
        dw, dh = dw % stride, dh % stride
    dw, dh = dw / 2, dh / 2
    if (w0, h0) != (new_w, new_h):
        im = cv2.resize(im, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    im = cv2.copyMakeBorder(im, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return im, (new_h / h0, new_w / w0, top, left)


# ----------------------------------------------------------------------------- NMS


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy NMS (torchvision semantics: suppress IoU > ``iou``); indices in descending score order.

    Up to ``NMS_MATRIX_MAX`` boxes, the IoUs of all pairs are computed at once (the same float32
    operations as the loop, so the same decisions) and the greedy pass only reads rows of it;
    beyond that, one row per kept box, as the loop always did.
    """
    order = np.argsort(-scores, kind="stable")
    if order.size > NMS_MATRIX_MAX:
        return _nms_rows(boxes, order, iou)
    b = boxes[order]
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    areas = (x2 - x1) * (y2 - y1)
    w = np.clip(np.minimum(x2[:, None], x2) - np.maximum(x1[:, None], x1), 0, None)
    h = np.clip(np.minimum(y2[:, None], y2) - np.maximum(y1[:, None], y1), 0, None)
    inter = w * h
    with np.errstate(invalid="ignore", divide="ignore"):
        over = inter / (areas[:, None] + areas - inter) > iou  # NaN IoU (zero-area pair) keeps the box
    gone = np.zeros(order.size, bool)
    keep = []
    for i in range(order.size):
        if not gone[i]:
            keep.append(i)
            gone |= over[i]
    return order[np.asarray(keep, dtype=np.int64)]


def _nms_rows(boxes: np.ndarray, order: np.ndarray, iou: float) -> np.ndarray:
    """``nms`` one kept box at a time (memory linear in the number of boxes)."""
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1) * (y2 - y1)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        if not rest.size:
            break
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        ious = inter / (areas[i] + areas[rest] - inter)
        order = rest[~(ious > iou)]  # NaN IoU (zero-area pair) keeps the box, as torchvision does
    return np.asarray(keep, dtype=np.int64)


def _select_end2end(rows: np.ndarray, conf: float, max_det: int) -> np.ndarray:
    """Ultralytics' end-to-end branch of ``non_max_suppression``: rows with ``score > conf``, in order."""
    return np.ascontiguousarray(rows[rows[:, 4] > conf][:max_det], dtype=np.float32)


def _select(pred: np.ndarray, nc: int, conf: float, iou: float, max_det: int) -> np.ndarray:
    """Ultralytics ``non_max_suppression`` for one image: rows (x1, y1, x2, y2, score, cls, coefs...)."""
    scores_all = pred[4:4 + nc]  # (nc, N): columns stay anchors until after the filter (cheap)
    cls = scores_all.argmax(0)
    score = scores_all[cls, np.arange(scores_all.shape[1])]
    cand = np.flatnonzero(score > conf)
    if not cand.size:
        return np.zeros((0, pred.shape[0] + 2 - nc), np.float32)
    x = pred[:, cand].T  # (n, 4 + nc + nm)
    score, cls = score[cand], cls[cand]
    if len(cand) > MAX_NMS:
        top = np.argsort(-score, kind="stable")[:MAX_NMS]
        x, score, cls = x[top], score[top], cls[top]
    xy, wh = x[:, :2], x[:, 2:4] / 2
    boxes = np.concatenate([xy - wh, xy + wh], 1)
    keep = nms(boxes + (cls * MAX_WH)[:, None].astype(boxes.dtype), score, iou)[:max_det]
    return np.concatenate([boxes[keep], score[keep, None], cls[keep, None].astype(np.float32),
                           x[keep, 4 + nc:]], 1).astype(np.float32)


def _polygon(crop: np.ndarray, x0: int, y0: int) -> list[list[int]]:
    cnts, _ = cv2.findContours(crop.view(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not cnts:
        return []
    c = max(cnts, key=cv2.contourArea)
    c = cv2.approxPolyDP(c, 1.0, True)  # 1 px tolerance: compact JSON, visually identical
    return (c.reshape(-1, 2) + (x0, y0)).tolist()


def _scale_boxes(boxes: np.ndarray, input_hw: tuple[int, int], shape0: tuple[int, int]) -> np.ndarray:
    """Ultralytics ``scale_boxes``: letterboxed-input pixels -> original pixels, clipped."""
    h0, w0 = shape0
    ih, iw = input_hw
    gain = min(ih / h0, iw / w0)
    new_h, new_w = max(round(h0 * gain), 1), max(round(w0 * gain), 1)
    pad_x, pad_y = round((iw - new_w) / 2 - 0.1), round((ih - new_h) / 2 - 0.1)
    boxes[:, [0, 2]] = ((boxes[:, [0, 2]] - pad_x) / (new_w / w0)).clip(0, w0)
    boxes[:, [1, 3]] = ((boxes[:, [1, 3]] - pad_y) / (new_h / h0)).clip(0, h0)
    return boxes


# ----------------------------------------------------------------------------- predictor


class Predictor:
    """YOLO-seg predictor on ONNX Runtime or OpenVINO; thresholds, names and size default to the model's metadata.

    Args:
        onnx_path: exported model (``damage.tasks.export.onnx.export_onnx``).
        conf: confidence threshold; None = the sweep's choice in the metadata, else 0.25.
        iou: NMS IoU threshold; None = metadata, else 0.7.
        max_det: detections kept per image at most.
        providers: ORT execution providers (default CPU; ONNX Runtime only).
        threads: inference threads (default: the physical cores, ``backends.physical_cores``).
        vehicle_class: class name of vehicles for the damage percentage.
        rect: with a dynamic-size model, pad each batch of same-sized images only to a multiple
            of the stride (Ultralytics' predict default: less padding, faster); False = always
            the full square ``imgsz``.
        max_pixels: largest image accepted (width x height, checked from the header before
            decoding); None = ``damage.max_pixels`` of the metadata, else ``DEFAULT_MAX_PIXELS``.
        backend: ``auto`` | ``onnxruntime`` | ``openvino`` (``backends.resolve_backend``; config
            ``predictor.backend``).
        spinning: ONNX Runtime worker threads spin between ops (``predictor.spinning``).
        cache_optimized: cache ONNX Runtime's optimised graph next to the model (``predictor.cache_optimized``).
        openvino_precision: ``f32`` | ``bf16`` inference precision of OpenVINO (``predictor.openvino_precision``).
        slices: ``off`` | ``auto`` | ``{size, overlap}`` sliced inference of large images
            (``damage.tasks.serving.slicing``); None = ``damage.slices`` of the metadata (the slicing the
            thresholds were chosen with), else off. ``off`` gives exactly the unsliced results.

    Raises:
        DamageError: the file is missing or not a segmentation model with two outputs; an unknown
            backend, or ``openvino`` asked for and not installed.

    Attributes:
        backend: the runtime in use (``onnxruntime`` or ``openvino``); ``runtime`` its object.
        end2end: the model is an end-to-end export (rows after top-k, no NMS; see the module doc).
    """

    instance_type = Instance  # what ``damage.tasks.serving.slicing`` builds merged instances as

    def __init__(self, onnx_path: str | os.PathLike, conf: float | None = None, iou: float | None = None,
                 max_det: int = 300, providers: Sequence[str] | None = None, threads: int | None = None,
                 vehicle_class: str = "vehicle", rect: bool = True, max_pixels: int | None = None,
                 backend: str = "auto", spinning: bool = True, cache_optimized: bool = True,
                 openvino_precision: str = "f32", slices: Any = None):
        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise DamageError(f"{self.path}: model not found")
        raw = raw_metadata(self.path)
        self.metadata = validate_metadata(decode_metadata(raw), self.path)
        self.backend = resolve_backend(backend, self.metadata, self.path)
        self.runtime = open_runtime(self.backend, self.path, threads, list(providers) if providers else None,
                                    spinning, cache_optimized, openvino_precision)
        if self.runtime.n_outputs < 2:
            raise DamageError(f"{self.path}: expected a segmentation model (2 outputs), got {self.runtime.n_outputs}")
        shape = self.runtime.input_shape
        self.dynamic_batch = shape[0] is None
        fixed_hw = [d for d in shape[2:] if d is not None]
        self.end2end = bool(self.metadata.get("end2end"))
        # an end-to-end graph's TopK k is fixed at export: never feed it fewer anchors (smaller rect inputs)
        self.rect = bool(rect) and len(fixed_hw) < 2 and not self.end2end
        if len(fixed_hw) == 2:
            if not all(isinstance(v, int) and 32 <= v <= MAX_IMGSZ for v in fixed_hw):  # before any allocation
                raise DamageError(f"{self.path}: fixed ONNX input {fixed_hw} is outside [32, {MAX_IMGSZ}] per side")
            self.imgsz = (int(fixed_hw[0]), int(fixed_hw[1]))
        elif self.metadata.get("imgsz"):
            self.imgsz = tuple(int(v) for v in self.metadata["imgsz"])
        else:
            self.imgsz = (640, 640)
        self.stride = int(self.metadata.get("stride") or 32)
        nc_out = self.runtime.output_shapes[0][1]
        names = self.metadata.get("names")
        if not names:
            names = ([str(i) for i in range(int(nc_out) - 4 - 32)] if isinstance(nc_out, int) and not self.end2end
                     else [])
        self.names = list(names)
        # `is None`, not `or`: a chosen threshold of 0 is a value, not a missing key
        meta_conf, meta_iou = self.metadata.get("damage.conf"), self.metadata.get("damage.iou")
        self.conf = float(conf if conf is not None else DEFAULT_CONF if meta_conf is None else meta_conf)
        self.iou = float(iou if iou is not None else DEFAULT_IOU if meta_iou is None else meta_iou)
        # sliced photos have their own operating confidence when the nightly chose one (evaluate.extra_sets)
        meta_sliced = self.metadata.get("damage.sliced_conf")
        self._sliced_conf = None if conf is not None or meta_sliced is None else float(meta_sliced)
        if not 1 <= int(max_det) <= MAX_DET:
            raise DamageError(f"max_det must be in [1, {MAX_DET}], got {max_det}")
        self.max_det = int(max_det)
        meta_px = min(int(self.metadata.get("damage.max_pixels") or DEFAULT_MAX_PIXELS), DEFAULT_MAX_PIXELS)
        self.max_pixels = int(max_pixels if max_pixels is not None else meta_px)  # a file may lower it, never raise
        self.vehicle_class = vehicle_class
        self.slices = (parse_slices(slices) if slices is not None else
                       parse_slices(self.metadata.get("damage.slices"), f"{self.path}: ONNX metadata 'damage.slices'"))
        self._axes: dict[tuple[int, int, int, int], tuple] = {}
        self.timings: dict[str, float] = {}

    # -- steps ---------------------------------------------------------------------------

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Letterboxed NCHW float32 batch (RGB, 0-1), as Ultralytics' predictor builds it."""
        auto = self.rect and len({im.shape for im in images}) == 1  # Ultralytics: same shapes only
        lbs = [letterbox(im, self.imgsz, auto, self.stride)[0] for im in images]
        batch = np.empty((len(lbs), 3, *lbs[0].shape[:2]), np.float32)
        for k, lb in enumerate(lbs):
            # BGR->RGB and HWC->CHW in one strided copy, /255 as Ultralytics does
            np.divide(lb[..., ::-1].transpose(2, 0, 1), np.float32(255), out=batch[k], casting="unsafe")
        return batch

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bare runtime call (``session.run``): (detections, prototypes (N, nm, mh, mw)).

        Detections are (N, 4+nc+nm, anchors) for NMS exports, (N, k, 6+nm) rows for end-to-end ones.
        """
        if self.dynamic_batch or len(batch) == 1:
            return self.runtime.run(batch)
        outs = [self.runtime.run(batch[i:i + 1]) for i in range(len(batch))]
        return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])

    def postprocess(self, det: np.ndarray, proto: np.ndarray, shape: tuple[int, int],
                    input_hw: tuple[int, int], conf: float | None = None, iou: float | None = None) -> Prediction:
        """NMS, masks at the original size, polygons and the damage report for one image.

        Args:
            det: (4 + nc + nm, anchors) raw detections of this image, or (k, 6 + nm) rows of an
                end-to-end export.
            proto: (nm, mh, mw) mask prototypes of this image.
            shape: original image (h, w).
            input_hw: the letterboxed input size the outputs belong to.
            conf: confidence threshold for this call (default ``self.conf``).
            iou: NMS IoU threshold for this call (default ``self.iou``).
        """
        h, w = shape
        nm, mh, mw = proto.shape
        conf = self.conf if conf is None else conf
        if self.end2end:
            if det.ndim != 2 or det.shape[1] != 6 + nm:
                raise DamageError(f"{self.path}: end-to-end output should be (k, 6 + {nm}) rows per image, "
                                  f"got {det.shape}")
            rows = _select_end2end(det, conf, self.max_det)
        else:
            nc = det.shape[0] - 4 - nm
            rows = _select(det, nc, conf, self.iou if iou is None else iou, self.max_det)
        pred = Prediction(width=w, height=h)
        if not len(rows):
            pred.damage = damage_report([], [], self.vehicle_class)
            return pred
        boxes = _scale_boxes(rows[:, :4].copy(), input_hw, (h, w))
        key = (mh, mw, h, w)
        if key not in self._axes:
            if len(self._axes) >= AXES_CACHE:  # a service sees many image sizes: keep the latest few
                self._axes.pop(next(iter(self._axes)))
            ay, ax = native_axes(mh, mw, h, w)
            self._axes[key] = (taps(ay), taps(ax))
        taps_y, taps_x = self._axes[key]
        # cols/rows kept by Ultralytics' crop_mask: r >= x1 and r < x2 (float box edges)
        lo = np.ceil(boxes[:, :2]).astype(np.int64)
        hi = np.ceil(boxes[:, 2:]).astype(np.int64)
        # integer regions, clipped to the image, as Python ints (numpy scalars make every slice slower)
        regions = np.concatenate([lo, hi], 1).clip(0, [w, h, w, h]).tolist()
        box_list, scores, classes = boxes.tolist(), rows[:, 4].tolist(), rows[:, 5].astype(np.int64).tolist()
        coefs = rows[:, 6:]
        protos = np.ascontiguousarray(proto, dtype=np.float32).reshape(nm, -1)
        instances, masks, names, extents = [], [], [], []
        for k, (x0, y0, x1, y1) in enumerate(regions):
            if k % LOGIT_CHUNK == 0:
                # one GEMM per chunk of instances instead of a strided proto copy per instance (BLAS is
                # ~5x faster); chunks bound the memory at LOGIT_CHUNK x mh x mw floats
                logits = single_thread_matmul(coefs[k:k + LOGIT_CHUNK], protos).reshape(-1, mh, mw)
            if x1 <= x0 or y1 <= y0:
                continue  # empty mask: Ultralytics drops such predictions too
            crop = mask_from_logits(logits[k % LOGIT_CHUNK], taps_y, taps_x, x0, y0, x1, y1)
            area = int(np.count_nonzero(crop))
            if area == 0:
                continue
            full = BoxMask(crop, x0, y0, (h, w))  # cropped to its box, never an HxW array per instance
            cls = classes[k]
            name = self.names[cls] if cls < len(self.names) else str(cls)
            instances.append(Instance(id=len(instances), cls=cls, name=name, score=scores[k],
                                      box=box_list[k], mask=full, area_px=area))
            masks.append(full)
            names.append(name)
            extents.append((x0, y0, x1, y1))
        rep = damage_report(masks, names, self.vehicle_class, boxes=extents)
        for inst in instances:
            inst.vehicle_id = rep.assignment.get(inst.id)
        pred.instances, pred.damage = instances, rep
        return pred

    # -- public ----------------------------------------------------------------------------

    def predict(self, images: ImageLike | Sequence[ImageLike], batch_size: int | None = None,
                conf: float | None = None, iou: float | None = None) -> list[Prediction]:
        """Predict a list of images (paths or BGR arrays); one ``Prediction`` per image, in order.

        Args:
            images: one image or a list of them.
            batch_size: images per ``session.run`` (default: all at once with a dynamic-batch
                model, else 1).
            conf: confidence threshold for this call only (default ``self.conf``; a sliced image:
                ``self.sliced_conf``, ``damage.sliced_conf`` of the metadata when the nightly chose one).
            iou: NMS IoU threshold for this call only (default ``self.iou``).

        Raises:
            DamageError: an image cannot be read (``read_image``).
        """
        if isinstance(images, (str, os.PathLike, np.ndarray)):
            images = [images]
        t0 = time.perf_counter()
        ims = [read_image(s, self.max_pixels) for s in images]
        t_read = time.perf_counter() - t0
        if self.slices.mode == "off":
            results = self.predict_arrays(ims, batch_size, conf, iou)
        else:
            results = predict_images(self, ims, self.slices, batch_size, conf, iou)
        self.timings = {"read": t_read, **self.timings}
        return results

    @property
    def sliced_conf(self) -> float:
        """The default confidence of sliced images: ``damage.sliced_conf``, else (or with ``conf`` given) ``conf``."""
        return self.conf if self._sliced_conf is None else self._sliced_conf

    def conf_for(self, h: int, w: int) -> float:
        """The default confidence of an ``h`` x ``w`` image: ``sliced_conf`` when it is sliced, else ``conf``."""
        return self.sliced_conf if self.slices.active(h, w, self.imgsz) else self.conf

    def predict_arrays(self, ims: Sequence[np.ndarray], batch_size: int | None = None, conf: float | None = None,
                       iou: float | None = None) -> list[Prediction]:
        """``predict`` of decoded BGR images without slicing: letterbox each batch, one run, post-process."""
        bs = batch_size or (len(ims) if self.dynamic_batch else 1)
        results: list[Prediction] = []
        t_pre = t_inf = t_post = 0.0
        for i in range(0, len(ims), max(bs, 1)):
            chunk = ims[i:i + bs]
            t0 = time.perf_counter()
            batch = self.preprocess(chunk)
            t1 = time.perf_counter()
            det, proto = self.infer(batch)
            t2 = time.perf_counter()
            hw = batch.shape[2:]
            results += [self.postprocess(det[k], proto[k], im.shape[:2], hw, conf, iou) for k, im in enumerate(chunk)]
            t3 = time.perf_counter()
            t_pre, t_inf, t_post = t_pre + t1 - t0, t_inf + t2 - t1, t_post + t3 - t2
        self.timings = {"preprocess": t_pre, "inference": t_inf, "postprocess": t_post}
        return results

    __call__ = predict
