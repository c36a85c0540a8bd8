"""Polygon geometry shared by the synthetic generator (which must write valid labels) and the data gate
(which flags invalid ones): one definition of a self-intersecting outline."""

from __future__ import annotations

import numpy as np

# Polygons with more vertices than this skip the O(k^2) self-intersection test (mask contours
# from real tools rarely exceed a few hundred points; the cap bounds the worst case).
MAX_SELF_INTERSECT_POINTS = 2000


def polygon_self_intersects(pts: np.ndarray) -> bool:
    """True if two non-adjacent edges of the closed polygon cross properly (bow-tie)."""
    k = len(pts)
    if k < 4 or k > MAX_SELF_INTERSECT_POINTS:
        return False
    a = pts
    b = np.roll(pts, -1, axis=0)
    i, j = np.triu_indices(k, 2)
    keep = ~((i == 0) & (j == k - 1))  # first and last edge share a vertex
    i, j = i[keep], j[keep]
    if i.size == 0:
        return False

    def orient(p, q, r):
        return (q[:, 0] - p[:, 0]) * (r[:, 1] - p[:, 1]) - (q[:, 1] - p[:, 1]) * (r[:, 0] - p[:, 0])

    a1, b1, a2, b2 = a[i], b[i], a[j], b[j]
    d1, d2 = orient(a1, b1, a2), orient(a1, b1, b2)
    d3, d4 = orient(a2, b2, a1), orient(a2, b2, b1)
    # Touching is not crossing: pixel contours touch themselves at pinches, and after
    # normalisation (x / width) float rounding turns those exact zeros into tiny +-values.
    span = float(np.ptp(pts, axis=0).max()) or 1.0
    tol = 1e-9 * span * span

    def opposite(u, v):
        return ((u > tol) & (v < -tol)) | ((u < -tol) & (v > tol))

    return bool(np.any(opposite(d1, d2) & opposite(d3, d4)))
