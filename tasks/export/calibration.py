"""Calibration for static INT8: the calibration images, their pre-processing, and the activation
ranges ONNX Runtime's calibrators compute from them (saved as ORT's calibration cache for
``quantize_static``). Entropy ranges use :func:`entropy_threshold`, ORT's own KL-divergence search
without its per-bin Python loops.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from damage.tasks.core.errors import DatasetError

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
# Calibrator settings per method. ``quantize_static`` builds its calibrator with ORT's defaults, and the
# Entropy default (128 histogram bins searched for a 128-bin window) has exactly one candidate, the full
# range: entropy would silently be min/max. So the ranges are computed here with a histogram wide enough
# to search (512 bins: 193 candidate thresholds per tensor) and handed to ``quantize_static`` through its
# calibration cache. Percentile keeps the asymmetric range (SiLU outputs are almost all positive).
CALIB_CHUNK = 4  # calibration images per calibrator pass (ranges and histograms accumulate across passes)
CALIBRATOR_OPTIONS: dict[str, dict[str, Any]] = {
    "minmax": {"symmetric": False},
    "entropy": {"symmetric": False, "num_bins": 512, "num_quantized_bins": 128},
    "percentile": {"symmetric": False, "num_bins": 2048, "percentile": 99.99},
}


# ----------------------------------------------------------------------------- calibration data
def calibration_images(data_yaml: str | Path, n: int, seed: int = 0, split: str = "train") -> list[Path]:
    """``n`` images (seeded sample) of ``split`` of a YOLO data.yaml.

    Raises:
        DatasetError: unreadable data.yaml, missing split, or no images.
    """
    from damage.tasks.data.dataset import split_images

    data_yaml = Path(data_yaml)
    if not data_yaml.is_file():
        raise DatasetError(f"{data_yaml}: data.yaml not found")
    files = split_images(data_yaml, split)
    if not files:
        raise DatasetError(f"{data_yaml}: split '{split}' has no images")
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(files))[: max(1, n)]
    return [files[i] for i in sorted(idx)]


def preprocess_image(path: Path, imgsz: int) -> np.ndarray:
    """Ultralytics val pre-processing: letterbox to ``imgsz`` (pad 114), RGB, CHW, 0..1, batch of 1."""
    import cv2
    from ultralytics.data.augment import LetterBox

    im = cv2.imread(str(path))
    if im is None:
        raise DatasetError(f"{path}: cannot read image")
    im = LetterBox((imgsz, imgsz), auto=False, stride=32)(image=im)
    im = im[..., ::-1].transpose(2, 0, 1)
    return np.ascontiguousarray(im, dtype=np.float32)[None] / 255.0


class ImageReader:
    """ORT ``CalibrationDataReader`` over letterboxed images (re-iterable via ``rewind``)."""

    def __init__(self, images: Sequence[Path], imgsz: int, input_name: str):
        self.images, self.imgsz, self.input_name = list(images), imgsz, input_name
        self._it: Iterable | None = None

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = iter(self.images)
        p = next(self._it, None)
        return None if p is None else {self.input_name: preprocess_image(p, self.imgsz)}

    def rewind(self) -> None:
        self._it = None

    def __iter__(self):
        self.rewind()
        while (item := self.get_next()) is not None:
            yield item


def calibrate(model_path: Path, reader: ImageReader, method, options: dict[str, Any],
               op_types: Sequence[str] | None, work: Path) -> Path:
    """Activation ranges of ``model_path`` over ``reader`` with ``method``/``options``, saved as an ORT
    calibration cache (JSON) for ``quantize_static``; returns its path."""
    from onnxruntime.quantization.calibrate import (
        CalibrationMethod,
        TensorsData,
        create_calibrator,
        save_tensors_data,
    )
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    ops = list(op_types) if op_types is not None else sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
    cal = create_calibrator(model_path, ops, augmented_model_path=str(work / "augmented.onnx"),
                            calibrate_method=method, extra_options=dict(options))
    # a few images per pass: the calibrator holds every activation of the images it is given (GBs at 640 px)
    for i in range(0, len(reader.images), CALIB_CHUNK):
        cal.collect_data(ImageReader(reader.images[i:i + CALIB_CHUNK], reader.imgsz, reader.input_name))
    cache = work / "calibration.json"
    if method == CalibrationMethod.Entropy:  # ORT's own search, without its per-bin Python loops
        col = cal.collector
        data = TensorsData(method, {t: (*entropy_threshold(h, col.num_quantized_bins), *h[:2])
                                    for t, h in col.histogram_dict.items()})
    else:
        data = cal.compute_data()
    save_tensors_data(data, cache)
    return cache


def entropy_threshold(histogram: tuple, num_quantized_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """ONNX Runtime's KL-divergence threshold search (``HistogramCollector.get_entropy_threshold``), the
    same arithmetic step for step (each window's bins, outliers, merge, spread, smoothing and
    divergence by ORT's own helpers, in ORT's dtypes), so the same thresholds; only the loops over
    the 128 quantized bins of each candidate window are array operations. ORT's version spends
    about 50 ms per tensor in them at 512 bins (15 s for a YOLOv8n-seg).

    Args:
        histogram: ``(hist, edges, min, max)`` as ORT's ``HistogramCollector`` keeps it.
        num_quantized_bins: bins of the quantized window (ORT's ``num_quantized_bins``).
    """
    from onnxruntime.quantization.calibrate import entropy, smooth_distribution

    hist, edges, lo, hi = histogram[:4]
    nb, nq = hist.size, num_quantized_bins
    zero, half = nb // 2, nq // 2
    below = np.concatenate([[0], np.cumsum(hist)])  # below[k] = sum(hist[:k]); ints: exact
    kl = np.zeros(zero - half + 1)
    bounds = []
    for i in range(half, zero + 1):
        start, end = zero - i, min(zero + i + 1, nb)
        bounds.append((edges[start], edges[end]))
        sliced = hist[start:end]
        p = sliced.copy()
        p[0] += below[start]
        p[-1] += below[nb] - below[end]
        nonzeros = (p != 0).astype(np.int64)
        m = sliced.size // nq
        quantized = sliced[:nq * m].reshape(nq, m).sum(1).astype(np.int64)
        quantized[-1] += sliced[nq * m:].sum()
        norm = nonzeros[:nq * m].reshape(nq, m).sum(1)
        q = np.zeros(p.size, dtype=np.int64)
        spread = np.divide(quantized, norm, out=np.zeros(nq), where=norm != 0)
        q[:nq * m] = np.repeat(spread, m)  # int64 assignment truncates, as ORT's does
        ps, qs = smooth_distribution(p), smooth_distribution(q)
        kl[i - half] = np.inf if ps is None or qs is None else np.array(entropy(ps, qs), dtype=edges.dtype)
    t0, t1 = bounds[int(np.argmin(kl))]
    return (lo if t0 < lo else t0), (hi if t1 > hi else t1)
