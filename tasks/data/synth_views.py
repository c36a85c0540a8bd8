"""Views of the synthetic generator cut from larger scenes, and the mask/polygon helpers they share with it.

Moved out of ``damage.tasks.data.synth`` (over the 600-line limit), which imports them; this module never
imports it back: the scene renderer is passed in (``SceneFn``), and instances and samples are copied
with ``dataclasses.replace``, so the classes stay the generator's.

* ``render_closeup``: an inspection photo, a window framed on one damage of a scene rendered ``zoom``
  times larger (the close-up views of the demo's data);
* ``render_tile``: a training crop at the tile scale of sliced inference (issue 34): a window of ``s``
  px at a random place of a whole scene rendered ``scale`` times larger, as ``damage.tasks.serving.slicing``
  feeds a high-resolution photo to the model tile by tile. The demo's whole-scene set is 640 px and
  its model's input 160 px: ``scale`` 4 shows training the damage at the size the tiles show it.

Both label every instance in the window by its visible part; a window that would cut an instance
into pieces (or leave a sliver too small to label) is rejected, and after a few rejected scenes the
view falls back to an ordinary scene.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

__all__ = ["crop_sample", "fill", "frame_window", "labelable", "outer", "render_closeup", "render_tile",
           "single_region", "solid"]

SceneFn = Callable[[np.random.Generator, int, "str | None", "int | None"], Any]  # (rng, side, target, vehicles)


def fill(shape: tuple[int, int], polys, value: int = 1) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    cv2.fillPoly(m, [np.round(np.asarray(p)).astype(np.int32) for p in polys], value)
    return m


def outer(mask: np.ndarray) -> np.ndarray | None:
    """Largest outer contour of a mask as a simple (N, 2) int32 polygon, or None if degenerate.

    Pixel contours cross themselves where two pixels touch only diagonally; the data gate
    (rightly) calls such polygons degenerate. Closing the mask with a 3x3 kernel joins those
    pinches, so the label stays a simple polygon covering the painted region.
    """
    from damage.tasks.data.polygons import polygon_self_intersects

    m = mask.astype(np.uint8)
    for _ in range(4):
        cnts, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        if not cnts:
            return None
        c = max(cnts, key=lambda c: (cv2.contourArea(c), len(c)))
        if len(c) < 3:
            return None
        poly = c.reshape(-1, 2)
        # checked as written too: normalised to 6 decimals, a vertex that touches an edge in
        # pixels can land a hair across it, and the data gate reads the written numbers
        written = np.round(poly.astype(np.float64) / m.shape[1], 6)
        if not polygon_self_intersects(poly.astype(np.float64)) and not polygon_self_intersects(written):
            return poly
        m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
    return None


def solid(mask: np.ndarray) -> np.ndarray | None:
    """The region a label polygon can describe: fillPoly of the largest outer contour."""
    poly = outer(mask)
    if poly is None:
        return None
    return fill(mask.shape, [poly]).astype(bool)


def single_region(m: np.ndarray) -> bool:
    """True when one label polygon describes the mask: one piece, its fill adds (almost) nothing."""
    region = solid(m)
    if region is None or (m & ~region).any():
        return False
    return int((region & ~m).sum()) <= max(2, int(0.1 * m.sum()))


def render_closeup(rng: np.random.Generator, s: int, target: str | None, zoom: tuple[float, float],
                   render_scene: SceneFn) -> Any:
    """An inspection photo: an ``s`` px window of a ``zoom`` times larger single-vehicle scene.

    The window is framed on one ``target`` damage; in about a quarter of the views the window's
    border cuts through it. Every instance in the window is labelled by its visible part; a
    window that would cut an instance into pieces (or leave a sliver too small to label) is
    rejected, and after 6 rejected scenes the view falls back to an ordinary scene.
    """
    lo, hi = zoom
    for _attempt in range(6):
        big = max(s, int(round(s * rng.uniform(lo, hi))))
        scene = render_scene(rng, big, target, 1)
        damage = [i for i in scene.instances if i.parent is not None]
        focus = [i for i in damage if target is None or i.name == target] or damage
        if not focus:
            continue
        anchor = focus[int(rng.integers(len(focus)))]
        win = frame_window(rng, scene, anchor, s)
        if win is None:
            continue
        return crop_sample(scene, win, s)
    return render_scene(rng, s, target, None)


def frame_window(rng, scene: Any, anchor: Any, s: int) -> tuple[int, int] | None:
    """Top-left corner of an ``s`` px window showing ``anchor``, every instance in one labelable piece."""
    big = scene.image.shape[0]
    min_area = max(12, int(20 * (s / 160.0) ** 2))
    ys, xs = np.nonzero(anchor.mask)
    for _ in range(20):
        corner = []
        # in a quarter of the views the frame cuts the damage on one axis: labelled by its visible part
        cut_axis = int(rng.integers(2)) if rng.random() < 0.25 else -1
        for axis, (lo_px, hi_px) in enumerate(((xs.min(), xs.max()), (ys.min(), ys.max()))):
            span = hi_px - lo_px + 1
            if axis == cut_axis and span >= 8:
                keep = rng.uniform(0.35, 0.75) * span  # share of the damage left inside the window
                o = lo_px + keep - s if rng.random() < 0.5 else hi_px + 1 - keep
            else:
                a, b = min(lo_px, hi_px + 1 - s), max(lo_px, hi_px + 1 - s)
                o = rng.uniform(a, b)
            corner.append(int(np.clip(round(o), 0, big - s)))
        x0, y0 = corner
        if anchor.mask[y0:y0 + s, x0:x0 + s].any() and labelable(scene, x0, y0, s, min_area):
            return x0, y0
    return None


def labelable(scene: Any, x0: int, y0: int, s: int, min_area: int) -> bool:
    """Every instance the ``s`` px window at (x0, y0) shows is one piece of at least ``min_area`` px."""
    for inst in scene.instances:
        v = inst.mask[y0:y0 + s, x0:x0 + s]
        if v.any() and (v.sum() < min_area or not single_region(v)):
            return False
    return True


def crop_sample(scene: Any, win: tuple[int, int], s: int) -> Any:
    """Cut the window out of a rendered scene; instances keep their visible part, exact."""
    x0, y0 = win
    img = scene.image[y0:y0 + s, x0:x0 + s].astype(np.float32)
    if scene.low_light and img.mean() < 32:  # dim, but above the data gate's "too_dark" floor
        img += 32 - float(img.mean())
    instances: list[Any] = []
    index: dict[int, int] = {}
    for k, inst in enumerate(scene.instances):
        m = inst.mask[y0:y0 + s, x0:x0 + s]
        if not m.any() or (inst.parent is not None and inst.parent not in index):
            continue
        poly = outer(m)
        if poly is None:
            continue
        index[k] = len(instances)
        instances.append(dataclasses.replace(inst, polygon=poly.astype(np.int32), mask=m.copy(),
                                             parent=None if inst.parent is None else index[inst.parent]))
    return dataclasses.replace(scene, image=np.clip(img, 0, 255).astype(np.uint8), instances=instances)


def render_tile(rng: np.random.Generator, s: int, scale: float, render_scene: SceneFn,
                target: str | None = None) -> Any:
    """A tile-scale training crop: an ``s`` px window at a random place of a scene rendered ``scale`` times larger.

    Unlike a close-up, the window is not framed on a damage: it is what one tile of a sliced
    high-resolution photo shows (part of a vehicle, damage at full resolution, background), so the
    model trains on the inputs sliced inference gives it. A window must show some vehicle and cut
    no instance into pieces; after 6 scenes without one the view falls back to a plain scene.
    """
    big = max(s, int(round(s * scale)))
    min_area = max(12, int(20 * (s / 160.0) ** 2))
    for _attempt in range(6):
        scene = render_scene(rng, big, target, None)
        vehicles = [i for i in scene.instances if i.parent is None]
        if not vehicles:
            continue
        for _ in range(20):
            x0, y0 = (int(v) for v in rng.integers(0, big - s + 1, 2))
            if any(v.mask[y0:y0 + s, x0:x0 + s].any() for v in vehicles) and labelable(scene, x0, y0, s, min_area):
                return crop_sample(scene, (x0, y0), s)
    return render_scene(rng, s, target, None)
