"""Smoothed per-class histogram densities and their monotone likelihood ratios: what ``label_scores``
calibrates with.

A density is a histogram per class on a fixed axis (logit over [1e-6, 1 - 1e-6] for confidences,
linear over [0, 1] for IoU-like shares), shrunk towards the all-class histogram by ``SHRINK``
pseudo-samples (rare classes borrow from the rest), mixed with ``FLOOR_MIX`` of a uniform density
(where neither side has data a ratio of two densities is 1, whatever the sample sizes) and read by
linear interpolation, so a score moves continuously with its evidence. ``Density.ratio`` makes a
ratio monotone in its evidence (an isotonic fit over the bins, weighted by their samples);
``unimodal`` fits a class's density rising to one mode and falling after it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LOG_FLOOR = 1e-6  # confidences below this (and above 1 - this) share the end bins
CONF_BINS = 28  # logit axis over [1e-6, 1 - 1e-6]: about one logit unit each, fine at both ends
IOU_BINS = 10
SMOOTH = 0.5  # add-half per bin of the all-class histogram
FLOOR_MIX = 0.02  # share of a uniform density mixed into every histogram
SHRINK = 8.0  # pseudo-samples drawn from the all-class histogram


def _logit_axis(x: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(x, float), LOG_FLOOR, 1 - LOG_FLOOR)
    return np.log(p / (1 - p))


def _isotonic(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Non-decreasing least-squares fit of ``y`` with weights ``w`` (pool adjacent violators); bins
    without weight take the fit of their nearest weighted neighbour."""
    idx = np.flatnonzero(w > 0)
    blocks: list[list[float]] = []  # [value, weight, count]
    for i in idx:
        blocks.append([float(y[i]), float(w[i]), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, n2 = blocks.pop()
            v1, w1, n1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    fit = np.repeat([b[0] for b in blocks], [b[2] for b in blocks])
    return np.interp(np.arange(len(y)), idx, fit)


def _unimodal(p: np.ndarray) -> np.ndarray:
    """The unimodal least-squares fit of a histogram (non-decreasing up to its best mode, non-increasing after),
    renormalised."""
    best, best_err = p, math.inf
    ones = np.ones(len(p))
    for m in range(len(p)):
        up = _isotonic(p[:m + 1], ones[:m + 1])
        down = _isotonic(p[m:][::-1], ones[m:])[::-1]
        fit = np.r_[up[:m], max(up[m], down[0]), down[1:]]
        err = float(((fit - p) ** 2).sum())
        if err < best_err:
            best, best_err = fit, err
    return best / best.sum()


@dataclass
class Density:
    """Per-class smoothed histogram densities of one quantity on a fixed axis (see the module docstring)."""

    lo: float
    hi: float
    bins: int
    log: bool
    pdf_table: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # (nc, bins)
    counts: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # (nc, bins) samples per bin
    # monotone ratio tables already fitted, by (other, class, direction, weight): a ratio is read once per row
    _envelopes: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def fit(cls, values: Sequence[np.ndarray], weights: Sequence[np.ndarray] | None = None, log: bool = True,
            bins: int | None = None, unimodal: bool = False) -> Density:
        """``values[c]``: the samples of class ``c`` (``weights[c]`` their weights; default 1). ``unimodal``: each
        class's density rises to its mode and falls after it (a least-squares fit to the histogram)."""
        edge = math.log((1 - LOG_FLOOR) / LOG_FLOOR)
        lo, hi = (-edge, edge) if log else (0.0, 1.0)
        bins = bins or (CONF_BINS if log else IOU_BINS)
        d = cls(lo, hi, bins, log)
        counts = np.zeros((len(values), bins))
        for c, v in enumerate(values):
            w = None if weights is None else np.asarray(weights[c], float)
            counts[c] = np.histogram(d._axis(v), bins=bins, range=(lo, hi), weights=w)[0]
        pooled = counts.sum(0) + SMOOTH
        pooled /= pooled.sum()
        shrunk = (counts + SHRINK * pooled[None, :]) / (counts.sum(1, keepdims=True) + SHRINK)
        if unimodal:
            shrunk = np.array([_unimodal(row) for row in shrunk])
        # a floor that is the same density for every class and sample size: where neither side has
        # seen a value, the ratio of two densities is 1 (no evidence), not the ratio of sample sizes
        d.pdf_table = ((1 - FLOOR_MIX) * shrunk + FLOOR_MIX / bins) / ((hi - lo) / bins)
        d.counts = counts
        return d

    def _axis(self, x: Any) -> np.ndarray:
        return _logit_axis(x) if self.log else np.clip(np.asarray(x, float), 0.0, 1.0)

    def _interp(self, table_row: np.ndarray, x: Any) -> float:
        t = self._axis(x)
        pos = float(np.clip((t - self.lo) / ((self.hi - self.lo) / self.bins) - 0.5, 0, self.bins - 1))
        i0 = int(pos)
        i1 = min(i0 + 1, self.bins - 1)
        return float((1 - (pos - i0)) * table_row[i0] + (pos - i0) * table_row[i1])

    def ratio(self, other: Density, c: int, x: float, increasing: bool, weight: np.ndarray | None = None) -> float:
        """``self.pdf / other.pdf`` for class ``c`` at ``x``, made monotone in ``x`` (``increasing`` or
        not; isotonic fit of the log ratio over the bins, weighted by their samples): more evidence
        for an error never lowers its likelihood ratio. ``weight`` (per bin)
        multiplies the numerator first (a shape assumed for the error, e.g. the bad-outline IoU)."""
        key = (id(other), c, increasing, None if weight is None else np.asarray(weight, float).tobytes())
        hit = self._envelopes.get(key)
        if hit is None or hit[0] is not other:
            hit = (other, self._envelope(other, c, increasing, weight))
            self._envelopes[key] = hit
        return self._interp(hit[1], x)

    def _envelope(self, other: Density, c: int, increasing: bool, weight: np.ndarray | None) -> np.ndarray:
        r = self.pdf_table[c] / other.pdf_table[c]
        if weight is not None:
            r = r * weight
        w = self.counts[c] + other.counts[c] if len(self.counts) and len(other.counts) else np.ones_like(r)
        if not (w > 0).any():
            return r
        if not increasing:
            r, w = r[::-1], w[::-1]
        env = np.exp(_isotonic(np.log(r), w))
        return env[::-1] if not increasing else env

    def centres(self) -> np.ndarray:
        """Bin centres on the value axis (IoU or confidence)."""
        t = self.lo + (np.arange(self.bins) + 0.5) * (self.hi - self.lo) / self.bins
        return 1 / (1 + np.exp(-t)) if self.log else t

    def pdf(self, c: int | np.ndarray, x: Any) -> np.ndarray:
        """Density of class ``c`` at ``x`` (linear between bin centres: continuous in ``x``)."""
        t = self._axis(x)
        width = (self.hi - self.lo) / self.bins
        pos = np.clip((t - self.lo) / width - 0.5, 0, self.bins - 1)
        i0 = np.floor(pos).astype(int)
        i1 = np.minimum(i0 + 1, self.bins - 1)
        f = pos - i0
        row = self.pdf_table[c]
        if row.ndim == 1:
            return (1 - f) * row[i0] + f * row[i1]
        idx = np.arange(len(row))
        return (1 - f) * row[idx, i0] + f * row[idx, i1]


__all__ = ["CONF_BINS", "FLOOR_MIX", "IOU_BINS", "LOG_FLOOR", "SHRINK", "SMOOTH", "Density"]
