"""Does an explanation point at the instance it explains? Two measurements, logged with every one.

* Energy-based pointing game (Wang et al., Score-CAM 2020): the share of the heatmap's total mass
  inside the instance's box (``heat_in_box``) and inside its mask (``heat_in_mask``). A map that
  ignores the instance puts about the box's area share (``box_area_share``) there; ``box_lift`` is
  the ratio (``>= 5``: five times what chance puts there).
* Deletion check (Petsiuk et al., RISE 2018): grey out the map's hottest pixels, as many as the box
  has, and re-score the same anchor: ``deletion_drop`` is the fall of the instance's score. The
  same number of random pixels greyed gives ``random_drop``: a faithful map drops the score more.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def box_mass_share(heatmap: np.ndarray, box: Sequence[float], dilate: float = 0.1) -> tuple[float, float]:
    """Share of the heatmap's mass inside a box (grown by ``dilate`` of its size per side) and the box's area share.

    A heatmap that concentrates on the instance has ``mass share > area share``.

    Returns:
        (mass share, area share), both in ``[0, 1]``; mass share is 0 for an all-zero heatmap.
    """
    h, w = heatmap.shape
    x1, y1, x2, y2 = (float(v) for v in box)
    dx, dy = (x2 - x1) * dilate, (y2 - y1) * dilate
    xa, ya = max(0, int(math.floor(x1 - dx))), max(0, int(math.floor(y1 - dy)))
    xb, yb = min(w, int(math.ceil(x2 + dx))), min(h, int(math.ceil(y2 + dy)))
    area = max(0, xb - xa) * max(0, yb - ya) / float(h * w)
    total = float(heatmap.sum())
    inside = float(heatmap[ya:yb, xa:xb].sum()) if xb > xa and yb > ya else 0.0
    return (inside / total if total > 0 else 0.0), area


def pointing(heatmap: np.ndarray, box: Sequence[float], mask: np.ndarray | None = None) -> dict[str, float]:
    """Energy-based pointing game of one instance: heat share in its box (undilated) and mask.

    Example:
        >>> heat = np.zeros((10, 10), np.float32); heat[2:4, 2:4] = 1
        >>> pointing(heat, [2, 2, 4, 4])["heat_in_box"], pointing(heat, [2, 2, 4, 4])["box_lift"]
        (1.0, 25.0)
    """
    share, area = box_mass_share(heatmap, box, dilate=0.0)
    total = float(heatmap.sum())
    in_mask = float(heatmap[mask].sum()) / total if mask is not None and total > 0 and mask.any() else 0.0
    return {"heat_in_box": share, "heat_in_mask": in_mask, "box_area_share": area,
            "box_lift": share / area if area > 0 else 0.0}


def greyed(image: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """``image`` with the flat pixel indices ``pixels`` set to the image's mean colour."""
    out = image.copy()
    flat = out.reshape(-1, out.shape[-1]) if out.ndim == 3 else out.reshape(-1)
    flat[pixels] = image.reshape(len(flat), -1).mean(0).astype(image.dtype).squeeze()
    return out


def deletion(score_fn: Callable[[np.ndarray], float], image: np.ndarray, heatmap: np.ndarray,
             box: Sequence[float], score: float, seed: int = 0) -> dict[str, float]:
    """Deletion check of one instance: its score after greying the map's hottest pixels (as many as
    the box has) and after greying as many random pixels.

    Args:
        score_fn: the instance's score (same anchor, same class) on a modified image.
        image: the original image (``H x W x 3``, the heatmap's size).
        heatmap: the instance's map, ``H x W``.
        box: ``[x1, y1, x2, y2]`` of the instance.
        score: its score on the unmodified image.

    Returns:
        ``deletion_drop`` and ``random_drop`` (score falls, in score units), ``deleted_pixels``.
    """
    h, w = heatmap.shape
    _, area = box_mass_share(heatmap, box, dilate=0.0)
    n = max(1, min(h * w, round(area * h * w)))
    hottest = np.argsort(heatmap.reshape(-1), kind="stable")[::-1][:n]
    rand = np.random.default_rng(seed).choice(h * w, size=n, replace=False)
    return {"deletion_drop": score - score_fn(greyed(image, hottest)),
            "random_drop": score - score_fn(greyed(image, rand)), "deleted_pixels": float(n)}


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Fidelity over many instances: medians, the share with ``box_lift >= 5``, deletion vs random.

    Example:
        >>> summarise([{"heat_in_box": .6, "heat_in_mask": .4, "box_lift": 6.0, "deletion_drop": .3,
        ...             "random_drop": .0}])["lift5_share"]
        1.0
    """
    if not rows:
        return {}
    col = lambda k: np.array([float(r[k]) for r in rows if k in r])  # noqa: E731
    out = {"instances": float(len(rows)), "heat_in_box_median": float(np.median(col("heat_in_box"))),
           "heat_in_mask_median": float(np.median(col("heat_in_mask"))),
           "lift5_share": float(np.mean(col("box_lift") >= 5.0))}
    d, r = col("deletion_drop"), col("random_drop")
    if len(d) and len(d) == len(r):
        out.update({"deletion_drop_median": float(np.median(d)), "random_drop_median": float(np.median(r)),
                    "deletion_beats_random_share": float(np.mean(d > r))})
    return out
