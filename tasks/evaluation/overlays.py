"""Overlays of explanations (``damage.tasks.evaluation.explain``): the heatmap over the image with the
instance's outline and label, the image with every outline, and a grid of tiles. An explanation is
any object with ``heatmap``, ``mask``, ``box``, ``label``, ``method``, ``layer`` and ``name``
(``damage.tasks.evaluation.explain.InstanceExplanation``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from damage.tasks.core.atomic import atomic_write_bytes
from damage.tasks.core.errors import DamageError


def display_scale(hw: tuple[int, int], min_side: int) -> float:
    return max(1.0, min_side / float(min(hw)))


def render_overlay(image: np.ndarray, exp: Any, alpha: float = 0.5, min_side: int = 320) -> np.ndarray:
    """JET heatmap blended over the image, the instance's mask outline and its label.

    Small images are upscaled so that the shorter side is at least ``min_side`` (legible labels).
    """
    s = display_scale(image.shape[:2], min_side)
    size = (round(image.shape[1] * s), round(image.shape[0] * s))
    img = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR) if s > 1 else image.copy()
    heat = cv2.resize(exp.heatmap, size, interpolation=cv2.INTER_LINEAR) if s > 1 else exp.heatmap
    colour = cv2.applyColorMap(np.clip(heat * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    out = cv2.addWeighted(img, 1 - alpha, colour, alpha, 0)
    mask = cv2.resize(exp.mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) if s > 1 else \
        exp.mask.astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    thick = max(1, round(min(size) / 200))
    cv2.drawContours(out, contours, -1, (255, 255, 255), thick + 1, cv2.LINE_AA)
    cv2.drawContours(out, contours, -1, (0, 0, 0), max(1, thick - 1), cv2.LINE_AA)
    x1, y1, x2, y2 = (int(round(v * s)) for v in exp.box)
    cv2.rectangle(out, (x1, y1), (x2, y2), (255, 255, 255), 1)
    put_label(out, f"{exp.label} [{exp.method} {exp.layer}]", (x1, y1))
    return out


def put_label(img: np.ndarray, text: str, at: tuple[int, int]) -> None:
    fs = max(0.35, min(img.shape[:2]) / 900)
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, fs, 1)
    x = int(min(max(0, at[0]), max(0, img.shape[1] - tw - 2)))
    y = int(at[1] - th - base - 2 if at[1] - th - base - 2 >= 0 else min(at[1] + 1, img.shape[0] - th - base - 2))
    y = max(0, y)
    cv2.rectangle(img, (x, y), (x + tw + 2, y + th + base + 2), (0, 0, 0), -1)
    cv2.putText(img, text, (x + 1, y + th + 1), cv2.FONT_HERSHEY_SIMPLEX, fs, (255, 255, 255), 1, cv2.LINE_AA)


def render_summary(image: np.ndarray, exps: Sequence[Any], min_side: int = 320) -> np.ndarray:
    """The image with every instance's outline and label: the first tile of the grid."""
    s = display_scale(image.shape[:2], min_side)
    size = (round(image.shape[1] * s), round(image.shape[0] * s))
    out = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR) if s > 1 else image.copy()
    for e in exps:
        m = cv2.resize(e.mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (0, 255, 255), 1, cv2.LINE_AA)
    put_label(out, f"{len(exps)} instance(s)" if exps else "no detections", (0, 0))
    return out


def make_grid(tiles: Sequence[np.ndarray], cols: int | None = None, gap: int = 4) -> np.ndarray:
    """Tile images (resized to the first tile's size) in rows of ``cols`` (default: about square)."""
    if not tiles:
        raise ValueError("make_grid needs at least one tile")
    h, w = tiles[0].shape[:2]
    cols = cols or math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    grid = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), 40, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        t = t if t.shape[:2] == (h, w) else cv2.resize(t, (w, h))
        grid[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = t
    return grid


def write_png(path: Path, img: np.ndarray) -> Path:
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise DamageError(f"{path}: could not encode PNG")
    atomic_write_bytes(path, buf.tobytes())
    return path
