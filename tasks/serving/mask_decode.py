"""Mask decoding of the ONNX predictor: prototype logits -> full-resolution instance masks (numpy only).

Ultralytics' "native" mask path (``process_mask_native``: optional x1/x2/x4 bilinear upsample,
remove the letterbox padding, bilinear resize to the original size, ``> 0``, crop to the box) is
linear and separable per axis, so it is folded into two small interpolation matrices per image
size (``native_axes``), kept in sparse form (``taps``) and evaluated only on each box's rows and
columns: exact, and cheap for small instances. Moved out of ``damage.tasks.serving.predictor`` (over the
600-line limit) unchanged; the predictor and ``damage.tasks.serving.slicing`` both decode through it.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["BLAS_SINGLE_MNK", "interp_matrix", "mask_crop", "mask_from_logits", "native_axes", "resample",
           "single_thread_matmul", "span", "taps"]

# A matrix product runs on one thread up to this many multiply-adds (m*n*k) in OpenBLAS (numpy's wheels):
# the post-processing keeps every product below it. OpenBLAS's idle threads spin after a threaded call, and
# on two cores they took a core from ONNX Runtime's next run (e2e 151-169 vs 96-105 ms with one BLAS thread).
BLAS_SINGLE_MNK = 1 << 18

def interp_matrix(n_out: int, n_in: int, scale: float | None = None) -> np.ndarray:
    """(n_out, n_in) matrix of torch ``F.interpolate(mode="bilinear", align_corners=False)`` along one axis."""
    if n_out == n_in and scale is None:
        return np.eye(n_in, dtype=np.float32)
    s = np.float32(n_in / n_out if scale is None else scale)
    src = np.maximum((np.arange(n_out, dtype=np.float32) + 0.5) * s - 0.5, 0)
    i0 = np.floor(src).astype(np.int64)
    i0 = np.minimum(i0, n_in - 1)
    lam = src - i0
    i1 = np.minimum(i0 + 1, n_in - 1)
    m = np.zeros((n_out, n_in), np.float32)
    rows = np.arange(n_out)
    np.add.at(m, (rows, i0), 1 - lam)
    np.add.at(m, (rows, i1), lam)
    return m


def native_axes(mh: int, mw: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column matrices (h, mh) and (w, mw) of Ultralytics' ``process_mask_native``.

    That function upsamples the prototype-resolution logits by f in {1, 2, 4} (the smallest factor
    that puts the letterbox padding on whole pixels), crops the padding and resizes bilinearly to
    the original image; both steps are linear per axis, so their product is exact.
    """
    gain = min(4 * mh / h, 4 * mw / w)
    pad = (4 * mh - max(round(h * gain), 1)) | (4 * mw - max(round(w * gain), 1))
    f = 4 // math.gcd(4, pad | pad // 2)
    up_y = interp_matrix(f * mh, mh, 1 / f) if f > 1 else np.eye(mh, dtype=np.float32)
    up_x = interp_matrix(f * mw, mw, 1 / f) if f > 1 else np.eye(mw, dtype=np.float32)
    im1_h, im1_w = f * mh, f * mw
    if (im1_h, im1_w) == (h, w):  # scale_masks returns the input unchanged
        return up_y, up_x
    g = min(im1_h / h, im1_w / w)
    pad_w, pad_h = (im1_w - max(round(w * g), 1)) / 2, (im1_h - max(round(h * g), 1)) / 2
    top, left = round(pad_h - 0.1), round(pad_w - 0.1)
    bottom, right = top + max(round(h * g), 1), left + max(round(w * g), 1)
    ay = interp_matrix(h, bottom - top) @ up_y[top:bottom]
    ax = interp_matrix(w, right - left) @ up_x[left:right]
    return ay, ax


def taps(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sparse form of an interpolation matrix: per output row, source indices and weights (n_out, T).

    Rows with fewer than T taps are padded with their first tap and weight 0, so every index
    stays inside the row's own source span.
    """
    nz = m != 0
    t = max(int(nz.sum(1).max()), 1)
    order = np.argsort(~nz, axis=1, kind="stable")[:, :t]
    w = np.take_along_axis(m, order, 1).astype(np.float32)
    pad = w == 0
    order[pad] = np.broadcast_to(order[:, :1], order.shape)[pad]
    return order.astype(np.intp), w


def mask_crop(coef: np.ndarray, protos: np.ndarray, taps_y: tuple[np.ndarray, np.ndarray],
              taps_x: tuple[np.ndarray, np.ndarray], x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """Bool mask of one instance over original-image rows y0:y1 and columns x0:x1.

    Args:
        coef: (nm,) mask coefficients; protos: (nm, mh, mw) prototypes.
        taps_y, taps_x: ``taps`` of the ``native_axes`` matrices of this image size.
        x0, y0, x1, y1: the box region in original pixels (end-exclusive), non-empty.

    Only the prototype rows and columns the region's interpolation taps touch are multiplied
    by the coefficients (``mask_from_logits`` when the logits of many instances are computed at
    once), and the two bilinear passes are gathers of 2-4 taps per pixel: no full-size logits
    and no dense matmuls.
    """
    (py0, py1), (px0, px1) = span(taps_y, y0, y1), span(taps_x, x0, x1)
    nm = protos.shape[0]
    sub = (coef @ protos[:, py0:py1, px0:px1].reshape(nm, -1)).reshape(py1 - py0, px1 - px0)
    return resample(sub, py0, px0, taps_y, taps_x, x0, y0, x1, y1)


def mask_from_logits(logits: np.ndarray, taps_y: tuple[np.ndarray, np.ndarray], taps_x: tuple[np.ndarray, np.ndarray],
                     x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """``mask_crop`` given the instance's (mh, mw) prototype-resolution logits (``coef @ protos``)."""
    (py0, py1), (px0, px1) = span(taps_y, y0, y1), span(taps_x, x0, x1)
    return resample(logits[py0:py1, px0:px1], py0, px0, taps_y, taps_x, x0, y0, x1, y1)


def single_thread_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` (2-D, float32) as products of column blocks small enough for OpenBLAS to run each on one
    thread (``BLAS_SINGLE_MNK``): the same dot products as one call, up to float rounding (OpenBLAS may
    pick another kernel for a block: last-bit differences)."""
    m, k = a.shape
    n = b.shape[1]
    step = max(BLAS_SINGLE_MNK // max(m * k, 1), 1)
    if step >= n:
        return a @ b
    out = np.empty((m, n), np.result_type(a, b))
    for c in range(0, n, step):
        np.matmul(a, b[:, c:c + step], out=out[:, c:c + step])
    return out


def span(taps: tuple[np.ndarray, np.ndarray], a: int, b: int) -> tuple[int, int]:
    """The prototype rows (or columns) that output rows a:b read: [lo, hi)."""
    idx = taps[0][a:b]
    return int(idx.min()), int(idx.max()) + 1


def resample(sub: np.ndarray, py0: int, px0: int, taps_y: tuple[np.ndarray, np.ndarray],
              taps_x: tuple[np.ndarray, np.ndarray], x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """The two bilinear passes over ``sub`` (logits from prototype row py0, column px0), then ``> 0``."""
    iy, wy = taps_y[0][y0:y1], taps_y[1][y0:y1]
    ix, wx = taps_x[0][x0:x1], taps_x[1][x0:x1]
    rows = np.einsum("kt,ktq->kq", wy, sub[iy - py0])  # (y1-y0, q)
    return np.einsum("jt,kjt->kj", wx, rows[:, ix - px0]) > 0
