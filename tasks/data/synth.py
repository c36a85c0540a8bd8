"""Built-in synthetic vehicle-damage dataset (YOLO-seg), deterministic by seed.

Two kinds of views, the way damage photos are taken: whole scenes (0-2 vehicles, side, front or
rear, on a road, grass, gradient or noise background) and close-up inspection views (a window
cut from a scene rendered 1.8-2.8x larger, framed on one damage). Lighting varies, including low
light. Damage is rendered on the part it belongs to: dents and scratches on body panels, cracks
and shatter on glass, broken lamps on lamps, flat tyres on wheels, each with its own look at
160 px (dent: shaded crater with a crease ring; scratch: pale scuffed band with parallel
gouges; crack: thin branching line; shatter: radial web; broken lamp: dark lamp with shards;
flat tyre: squashed, bulging tyre with a sunken rim).

Labels are exact by construction: every instance's region is a mask that is painted in full,
and its label polygon is that mask's outer contour, so ``cv2.fillPoly(polygon)`` reproduces the
painted pixels. Damage cut by the image border is labelled by its visible part; a damage whose
visible part would be too small or in pieces (one polygon could not describe it) is not
rendered at all (an unlabelled visible damage would teach the model to miss it). With
``balance`` each image carries the damage type least represented so far in its split.

Example:
    >>> data_yaml = generate_dataset(Path("/tmp/synth"), images=240, seed=0, imgsz=160)
    >>> sample = render_sample(np.random.default_rng(0), 160)
    >>> [CLASSES[i.cls] for i in sample.instances]
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import yaml

from damage.tasks.core.atomic import atomic_output_dir
from damage.tasks.core.config import CLASSES
from damage.tasks.data.synth_views import fill as _fill
from damage.tasks.data.synth_views import outer as _outer
from damage.tasks.data.synth_views import render_closeup, render_tile
from damage.tasks.data.synth_views import single_region as _single_region
from damage.tasks.data.synth_views import solid as _solid

# Bump when the rendering changes: cached synthetic datasets are keyed by it.
GENERATOR_VERSION = 7  # 5: wider scratches, larger dents; 7: scratches are compact scuffs (aspect ~2-4)
SYNTH_MARKER = ".synth.json"  # marks a folder as synth output, so it may be replaced
_CLS = {name: i for i, name in enumerate(CLASSES)}
DAMAGE_TYPES = ["dent", "scratch", "crack", "glass_shatter", "lamp_broken", "tire_flat"]
VIEWS = ("scene", "closeup", "tile")

# Car paints (BGR): white, black, silver, grey, red, blue, navy, green, yellow, orange, beige, brown.
_PAINTS = np.array([
    (235, 235, 235), (30, 30, 32), (190, 192, 195), (120, 122, 125), (40, 40, 200), (190, 90, 30),
    (90, 40, 20), (60, 130, 40), (40, 210, 230), (30, 130, 240), (170, 200, 215), (40, 70, 110),
], dtype=np.float32)

# Side-view body templates in (u along the car rear->front, v up from the ground), units of length.
# Each: body outline (incl. cabin), side windows, wheel centres u, wheel radius, lamp boxes.
_SIDE_TEMPLATES = {
    "sedan": dict(
        body=[(0.0, 0.09), (0.0, 0.22), (0.03, 0.27), (0.26, 0.28), (0.35, 0.42), (0.62, 0.42),
              (0.74, 0.28), (0.96, 0.25), (1.0, 0.19), (1.0, 0.09)],
        windows=[[(0.30, 0.29), (0.37, 0.40), (0.47, 0.40), (0.47, 0.29)],
                 [(0.50, 0.29), (0.50, 0.40), (0.61, 0.40), (0.71, 0.29)]],
        wheels=(0.19, 0.80), r=0.095),
    "hatch": dict(
        body=[(0.0, 0.09), (0.0, 0.30), (0.05, 0.43), (0.58, 0.44), (0.72, 0.30), (0.96, 0.26),
              (1.0, 0.20), (1.0, 0.09)],
        windows=[[(0.06, 0.31), (0.09, 0.41), (0.30, 0.41), (0.30, 0.31)],
                 [(0.33, 0.31), (0.33, 0.41), (0.57, 0.41), (0.68, 0.31)]],
        wheels=(0.18, 0.80), r=0.10),
    "suv": dict(
        body=[(0.0, 0.10), (0.0, 0.46), (0.02, 0.50), (0.64, 0.50), (0.76, 0.33), (0.97, 0.30),
              (1.0, 0.24), (1.0, 0.10)],
        windows=[[(0.04, 0.35), (0.04, 0.47), (0.27, 0.47), (0.27, 0.35)],
                 [(0.30, 0.35), (0.30, 0.47), (0.48, 0.47), (0.48, 0.35)],
                 [(0.51, 0.35), (0.51, 0.47), (0.63, 0.47), (0.72, 0.35)]],
        wheels=(0.18, 0.80), r=0.11),
    "van": dict(
        body=[(0.0, 0.10), (0.0, 0.55), (0.02, 0.58), (0.78, 0.58), (0.92, 0.38), (0.99, 0.33),
              (1.0, 0.25), (1.0, 0.10)],
        windows=[[(0.55, 0.40), (0.55, 0.53), (0.76, 0.53), (0.86, 0.40)]],
        wheels=(0.17, 0.82), r=0.10),
    "pickup": dict(
        body=[(0.0, 0.10), (0.0, 0.30), (0.40, 0.30), (0.42, 0.46), (0.64, 0.46), (0.76, 0.31),
              (0.97, 0.29), (1.0, 0.22), (1.0, 0.10)],
        windows=[[(0.45, 0.32), (0.45, 0.43), (0.62, 0.43), (0.72, 0.32)]],
        wheels=(0.17, 0.80), r=0.11),
}


@dataclass(frozen=True)
class Instance:
    """One labelled object of a synthetic image.

    Attributes:
        cls: class id (index into ``damage.tasks.core.config.CLASSES``).
        polygon: (N, 2) int32 pixel coordinates (x, y); ``cv2.fillPoly`` of it gives ``mask``.
        mask: (H, W) bool, exactly the pixels rendered for this instance.
        parent: for damage, the index in ``Sample.instances`` of the vehicle it lies on.
    """

    cls: int
    polygon: np.ndarray
    mask: np.ndarray
    parent: int | None = None

    @property
    def name(self) -> str:
        return CLASSES[self.cls]

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass
class Sample:
    """A rendered image (BGR uint8) with its instances; ``low_light`` marks a dark scene."""

    image: np.ndarray
    instances: list[Instance] = field(default_factory=list)
    low_light: bool = False


# ----------------------------------------------------------------------------- geometry helpers


def _ellipse(c, axes, angle_deg, n: int = 40) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    a = math.radians(angle_deg)
    x, y = axes[0] * np.cos(t), axes[1] * np.sin(t)
    return np.stack([c[0] + x * math.cos(a) - y * math.sin(a), c[1] + x * math.sin(a) + y * math.cos(a)], 1)


def _pick_pixel(rng: np.random.Generator, mask: np.ndarray, margin: int = 0) -> tuple[int, int] | None:
    """A random pixel of ``mask``, preferring ones at least ``margin`` px from its edge."""
    if margin > 0:
        inner = cv2.erode(mask.astype(np.uint8), np.ones((2 * margin + 1, 2 * margin + 1), np.uint8))
        if inner.any():
            mask = inner
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    i = int(rng.integers(len(xs)))
    return int(xs[i]), int(ys[i])


# ----------------------------------------------------------------------------- backgrounds


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, channels: int = 1) -> np.ndarray:
    small = rng.random((cells, cells, channels)).astype(np.float32)
    big = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return big.reshape(h, w, channels)


def _vgrad(h: int, w: int, top, bottom) -> np.ndarray:
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    return np.broadcast_to((1 - t) * np.float32(top) + t * np.float32(bottom), (h, w, 3)).copy()


def _background(rng: np.random.Generator, s: int) -> tuple[np.ndarray, str]:
    kind = str(rng.choice(["road", "grass", "gradient", "noise", "wall"], p=[0.35, 0.2, 0.15, 0.15, 0.15]))
    img = np.empty((s, s, 3), np.float32)
    if kind in ("road", "grass"):
        hz = int(s * rng.uniform(0.25, 0.5))
        sky_top = np.float32([rng.uniform(150, 230), rng.uniform(110, 190), rng.uniform(60, 140)])
        img[:hz] = _vgrad(hz, s, sky_top, sky_top * 0.5 + 110)
        if kind == "road":
            base = rng.uniform(70, 130)
            ground = base + 25 * (_smooth_noise(rng, s - hz, s, 24) - 0.5) + rng.normal(0, 6, (s - hz, s, 1))
            img[hz:] = np.repeat(ground, 3, 2) * np.float32([1.0, 1.0, rng.uniform(0.95, 1.05)])
            y = int(hz + (s - hz) * rng.uniform(0.3, 0.9))
            colour = (230, 230, 230) if rng.random() < 0.6 else (40, 200, 230)
            for x0 in range(int(rng.integers(-20, 0)), s, max(8, s // 5)):
                cv2.rectangle(img, (x0, y), (x0 + max(4, s // 10), y + max(1, s // 80)), colour, -1)
        else:
            tex = _smooth_noise(rng, s - hz, s, 32, 3)
            green = np.float32([rng.uniform(20, 60), rng.uniform(90, 160), rng.uniform(30, 80)])
            img[hz:] = green * (0.7 + 0.6 * tex) + rng.normal(0, 8, (s - hz, s, 3))
    elif kind == "gradient":
        img[:] = _vgrad(s, s, rng.uniform(30, 230, 3), rng.uniform(30, 230, 3))
        if rng.random() < 0.5:
            img = np.ascontiguousarray(np.transpose(img, (1, 0, 2)))
    elif kind == "noise":
        cells = int(rng.integers(3, 20))
        img[:] = 40 + 180 * _smooth_noise(rng, s, s, cells, 3) * rng.uniform(0.6, 1.0)
    else:  # wall / garage: flat colour with panels
        img[:] = rng.uniform(60, 200, 3)
        for _ in range(int(rng.integers(2, 6))):
            x, y = rng.integers(0, s, 2)
            w, h = rng.integers(s // 8, s // 2, 2)
            cv2.rectangle(img, (int(x), int(y)), (int(x + w), int(y + h)), rng.uniform(40, 220, 3).tolist(), -1)
    return img, kind


# ----------------------------------------------------------------------------- vehicles


@dataclass
class _Parts:
    """Part masks of one vehicle in the padded canvas (uint8 0/1)."""

    body: np.ndarray
    glass: list[np.ndarray]
    lamps: list[tuple[np.ndarray, str]]  # (mask, "head"|"tail")
    wheels: list[tuple[float, float, float]]  # (cx, cy, r) for side views
    tyres: list[np.ndarray]  # wheel masks (side) or tyre blocks (front/rear)
    deco: list[tuple[str, np.ndarray]]  # dark trim (wheel wells, grille, door lines): not panel
    silhouette: np.ndarray | None = None


def _side_vehicle(rng, shape, x0, ground, length, facing, template) -> _Parts:
    t = _SIDE_TEMPLATES[template]
    jit = lambda pts, a=0.012: [(u + rng.uniform(-a, a), v + rng.uniform(-a, a)) for u, v in pts]  # noqa: E731
    hscale = rng.uniform(0.92, 1.08)

    def xy(pts):
        return np.array([(x0 + (u if facing > 0 else 1 - u) * length, ground - v * hscale * length) for u, v in pts])

    body = _fill(shape, [xy(jit(t["body"]))])
    glass = [_fill(shape, [xy(w)]) & body for w in t["windows"]]
    r = t["r"] * rng.uniform(0.92, 1.08) * length
    wheels, tyres, deco = [], [], []
    for u in t["wheels"]:
        cx = x0 + (u if facing > 0 else 1 - u) * length
        cy = ground - r
        wheels.append((cx, cy, r))
        tyres.append(_fill(shape, [_ellipse((cx, cy), (r, r), 0)]))
        deco.append(("well", _fill(shape, [_ellipse((cx, cy), (r * 1.18, r * 1.18), 0)]) & body))
    lamp_h = max(0.07 * length, 5.0)
    lamp_w = max(0.085 * length, 6.0)
    top_front = 0.25 if template != "van" else 0.3
    lamps = []
    for kind, u0 in (("head", 1.0), ("tail", 0.0)):
        v_top = (top_front if kind == "head" else 0.27) * hscale * length
        if template in ("hatch", "suv", "van") and kind == "tail":
            v_top = 0.33 * hscale * length
        x_edge = x0 + (u0 if facing > 0 else 1 - u0) * length
        inward = -1 if (kind == "head") == (facing > 0) else 1
        xa, xb = x_edge + inward * 1.0, x_edge + inward * (1.0 + lamp_w)
        ya, yb = ground - v_top + 1.5, ground - v_top + 1.5 + lamp_h
        m = _fill(shape, [[(xa, ya), (xb, ya), (xb, yb), (xa, yb)]]) & body
        lamps.append((m, kind))
    # door line: thin dark vertical seam between the windows' columns
    seam = np.zeros(shape, np.uint8)
    u_seam = 0.48 if template in ("sedan", "hatch") else 0.5
    xs = x0 + (u_seam if facing > 0 else 1 - u_seam) * length
    cv2.line(seam, (int(xs), int(ground - 0.12 * length)), (int(xs), int(ground - 0.3 * length)), 1, 1)
    deco.append(("seam", seam & body))
    return _Parts(body, glass, lamps, wheels, tyres, deco)


def _front_vehicle(rng, shape, x0, ground, length, rear: bool) -> _Parts:
    """Front (or rear) view: width ``length * 0.62``, two lamps, windscreen, tyre blocks."""
    w = length * rng.uniform(0.58, 0.66)
    h = w * rng.uniform(0.75, 0.95)
    lx, rx = x0, x0 + w
    roof = ground - h
    belt = ground - h * 0.5
    body_pts = [(lx, ground - h * 0.08), (lx, belt), (lx + w * 0.12, roof + h * 0.05), (lx + w * 0.2, roof),
                (rx - w * 0.2, roof), (rx - w * 0.12, roof + h * 0.05), (rx, belt), (rx, ground - h * 0.08)]
    body = _fill(shape, [body_pts])
    glass = [_fill(shape, [[(lx + w * 0.15, belt - h * 0.04), (lx + w * 0.22, roof + h * 0.06),
                             (rx - w * 0.22, roof + h * 0.06), (rx - w * 0.15, belt - h * 0.04)]]) & body]
    lamp_w, lamp_h = max(w * 0.2, 7.0), max(h * 0.12, 5.0)
    kind = "tail" if rear else "head"
    lamps = []
    for xa in (lx + w * 0.05, rx - w * 0.05 - lamp_w):
        ya = belt + h * 0.06
        lamps.append((_fill(shape, [[(xa, ya), (xa + lamp_w, ya), (xa + lamp_w, ya + lamp_h),
                                      (xa, ya + lamp_h)]]) & body, kind))
    tyres = []
    tw = w * 0.16
    for xa in (lx + w * 0.06, rx - w * 0.06 - tw):
        tyres.append(_fill(shape, [[(xa, ground - h * 0.12), (xa + tw, ground - h * 0.12), (xa + tw, ground),
                                    (xa, ground)]]))
    gx, gy = lx + w * 0.32, belt + h * 0.1
    grille = _fill(shape, [[(gx, gy), (rx - w * 0.32, gy), (rx - w * 0.32, gy + h * 0.14),
                            (gx, gy + h * 0.14)]]) & body
    plate = _fill(shape, [[(lx + w * 0.4, ground - h * 0.2), (rx - w * 0.4, ground - h * 0.2),
                           (rx - w * 0.4, ground - h * 0.11), (lx + w * 0.4, ground - h * 0.11)]]) & body
    deco = [("grille" if not rear else "trunk", grille), ("plate", plate)]
    return _Parts(body, glass, lamps, [], tyres, deco)


def _shade(layer: np.ndarray, mask: np.ndarray, colour, top: float = 1.15, bottom: float = 0.8) -> None:
    """Paint ``colour`` into ``mask`` with a vertical light falloff (metal looks lit from above)."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return
    y0, y1 = ys.min(), ys.max() + 1
    t = (ys - y0) / max(1, y1 - y0)
    layer[ys, xs] = np.float32(colour) * (top + (bottom - top) * t)[:, None]


def _paint_glass(rng, layer, mask) -> None:
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return
    base = np.float32([rng.uniform(60, 95), rng.uniform(45, 70), rng.uniform(30, 50)])
    d = (xs - xs.min()) + (ys - ys.min())
    span = max(1, d.max())
    streak = np.abs(((d / span) * 2.0 + rng.uniform(0, 1)) % 1.0 - 0.5) < 0.12
    layer[ys, xs] = base * (1.0 + 0.5 * (ys - ys.min())[:, None] / max(1, np.ptp(ys))) + streak[:, None] * 35


def _paint_wheel(layer, cx, cy, r, tyre_mask=None, rim_dy: float = 0.0) -> None:
    if tyre_mask is None:
        tyre_mask = _fill(layer.shape[:2], [_ellipse((cx, cy), (r, r), 0)])
    layer[tyre_mask.astype(bool)] = (28, 28, 30)
    rim = _fill(layer.shape[:2], [_ellipse((cx, cy + rim_dy), (0.58 * r, 0.58 * r), 0)]) & tyre_mask
    _shade(layer, rim, (185, 185, 190), 1.1, 0.75)
    hub = _fill(layer.shape[:2], [_ellipse((cx, cy + rim_dy), (0.18 * r, 0.18 * r), 0)]) & tyre_mask
    layer[hub.astype(bool)] = (90, 90, 95)


# ----------------------------------------------------------------------------- damage shapes


def _dent_shape(rng, shape, panel, length):
    c = _pick_pixel(rng, panel, margin=max(2, int(0.03 * length)))
    if c is None:
        return None
    a = max(4.0, length * rng.uniform(0.05, 0.12))
    b = a * rng.uniform(0.55, 1.0)
    return _fill(shape, [_ellipse(c, (a, b), rng.uniform(0, 180), 28)]) & panel, {"c": c, "a": a}


def _scratch_shape(rng, shape, panel, length, unit):
    c = _pick_pixel(rng, panel, margin=2)
    if c is None:
        return None
    # A compact scuff, 10-24 % of the vehicle's length and 8-12 px wide at 160 px (aspect about 2-4).
    # Long thin bands (v4-v6: up to 45 % of the length, aspect up to 10) were the one class the demo model
    # kept missing (box AP50 0.17-0.22 over three generator versions): it found them in fragments.
    ln = max(12.0, length * rng.uniform(0.10, 0.24))
    th = math.radians(rng.uniform(-25, 25) + (180 if rng.random() < 0.5 else 0))
    n = 8
    t = np.linspace(-0.5, 0.5, n) * ln
    cxs = c[0] + t * math.cos(th)
    cys = c[1] + t * math.sin(th) + rng.normal(0, 0.06 * ln, n).cumsum() * 0.3
    nx, ny = -math.sin(th), math.cos(th)
    # wide enough for the mask prototypes (1/4 scale): a 4-6 px band (v4) is about one prototype pixel
    half = max(2.0, unit * rng.uniform(4.0, 6.0)) * (0.7 + 0.3 * rng.random(n))
    half[0] = half[-1] = max(0.8, half.min() * 0.5)  # tapered ends
    left = np.stack([cxs + nx * half, cys + ny * half], 1)
    right = np.stack([cxs - nx * half, cys - ny * half], 1)[::-1]
    return _fill(shape, [np.concatenate([left, right])]) & panel, {"pts": np.stack([cxs, cys], 1),
                                                                  "half": float(np.median(half))}


def _crack_shape(rng, shape, pane, unit):
    c = _pick_pixel(rng, pane, margin=2)
    if c is None:
        return None
    ys, xs = np.nonzero(pane)
    size = max(np.ptp(xs), np.ptp(ys))
    lines = np.zeros(shape, np.uint8)
    # 3-4 px at 160 px: still a thin line, but wide enough to survive the 1/4-scale mask prototypes
    thick = max(2, int(round(unit * rng.uniform(2.6, 3.6))))
    segs = []

    def branch(p, ang, ln, depth):
        pts = [p]
        for _ in range(3):
            ang += rng.uniform(-0.5, 0.5)
            q = (pts[-1][0] + ln / 3 * math.cos(ang), pts[-1][1] + ln / 3 * math.sin(ang))
            pts.append(q)
        segs.append(np.array(pts))
        if depth > 0:
            k = int(rng.integers(1, len(pts)))
            branch(pts[k], ang + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1), ln * 0.55, depth - 1)

    for _ in range(int(rng.integers(2, 4))):
        branch(c, rng.uniform(0, 2 * np.pi), size * rng.uniform(0.35, 0.7), 1)
    cv2.polylines(lines, [np.round(s).astype(np.int32) for s in segs], False, 1, thick)
    return lines & pane, {"segs": segs}


def _shatter_shape(rng, shape, pane):
    c = _pick_pixel(rng, pane, margin=2)
    if c is None:
        return None
    ys, xs = np.nonzero(pane)
    size = min(np.ptp(xs), np.ptp(ys)) + 1
    rad = max(4.0, size * rng.uniform(0.45, 0.8))
    n = 14
    ang = np.linspace(0, 2 * np.pi, n, endpoint=False)
    rr = rad * rng.uniform(0.7, 1.0, n)
    pts = np.stack([c[0] + rr * np.cos(ang), c[1] + rr * np.sin(ang)], 1)
    return _fill(shape, [pts]) & pane, {"c": c, "rad": rad}


def _flat_tyre(cx, cy, r) -> np.ndarray:
    """A tyre squashed at the bottom: flat contact patch, sidewalls bulging outwards."""
    pts = _ellipse((cx, cy), (r, r), 0, 48)
    dy = pts[:, 1] - cy
    low = dy > 0.3 * r
    pts[low, 1] = cy + 0.3 * r + (dy[low] - 0.3 * r) * 0.35
    bulge = np.clip(dy / r, 0, None)
    pts[:, 0] = cx + (pts[:, 0] - cx) * (1 + 0.45 * bulge)
    pts[:, 1] += 0.455 * r  # the rim sinks while the squashed tread stays on the ground
    return pts


# ----------------------------------------------------------------------------- damage painting


def _paint_dent(rng, layer, region, info, body_colour):
    ys, xs = np.nonzero(region)
    c = np.float32(info["c"])
    ang = rng.uniform(0, 2 * np.pi)
    proj = ((xs - c[0]) * math.cos(ang) + (ys - c[1]) * math.sin(ang)) / max(1.0, info["a"])
    base = layer[ys, xs]
    lum = float(np.mean(body_colour))
    strength = 0.55 if lum > 90 else 0.9
    # one flank in shadow, the other catching light; an additive term keeps dents visible on black paint
    layer[ys, xs] = base * (1 + strength * np.clip(proj, -1, 1))[:, None] + (45 * np.clip(proj, -1, 1))[:, None]
    # creased metal: a dark crease ring half-way out and a bright specular pinch at the centre
    rho = np.hypot(xs - c[0], ys - c[1]) / max(1.0, info["a"])
    layer[ys[np.abs(rho - 0.55) < 0.09], xs[np.abs(rho - 0.55) < 0.09]] *= 0.45
    spec = rho < 0.16
    layer[ys[spec], xs[spec]] = layer[ys[spec], xs[spec]] * 0.4 + 150
    edge = region & ~cv2.erode(region.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    layer[edge] *= 0.5


def _paint_scratch(rng, layer, region, info, body_colour):
    lum = float(np.mean(body_colour))
    bright = lum < 110 or (lum < 170 and rng.random() < 0.5)
    tone = np.float32((225, 228, 232) if bright else (55, 60, 70))
    layer[region] = layer[region] * 0.25 + tone * 0.75
    core = np.zeros(region.shape, np.uint8)
    pts = info["pts"]
    d = pts[-1] - pts[0]
    normal = np.array([-d[1], d[0]]) / max(1e-6, float(np.hypot(*d)))
    for off in (-0.45, 0.0, 0.45):  # parallel gouges across the band's width
        cv2.polylines(core, [np.round(pts + off * info["half"] * normal).astype(np.int32)], False, 1, 1)
    core_px = core.astype(bool) & region
    layer[core_px] = (250, 250, 250) if bright else (25, 30, 40)


def _paint_crack(rng, layer, region, info):
    # bright chipped halo around a dark fracture line
    layer[region] = (215, 222, 225)
    ys, xs = np.nonzero(region)
    layer[ys, xs] -= np.float32(rng.uniform(0, 35, (len(ys), 1)))
    core = np.zeros(region.shape, np.uint8)
    cv2.polylines(core, [np.round(sg).astype(np.int32) for sg in info["segs"]], False, 1, 1)
    layer[core.astype(bool) & region] = (70, 70, 75)


def _paint_shatter(rng, layer, region, info):
    layer[region] = layer[region] * 0.35 + np.float32((200, 205, 210)) * 0.65
    web = np.zeros(region.shape, np.uint8)
    c, rad = info["c"], info["rad"]
    for a in np.linspace(0, 2 * np.pi, int(rng.integers(7, 11)), endpoint=False) + rng.uniform(0, 1):
        cv2.line(web, c, (int(c[0] + 1.5 * rad * math.cos(a)), int(c[1] + 1.5 * rad * math.sin(a))), 1, 1)
    for k in (0.35, 0.7):
        ring = _ellipse(c, (rad * k, rad * k), 0, 9)
        cv2.polylines(web, [np.round(ring).astype(np.int32)], True, 1, 1)
    layer[web.astype(bool) & region] = (45, 45, 50)
    cv2.circle(web, c, 1, 2, -1)
    layer[(web == 2) & region] = (250, 250, 250)


def _paint_lamp(rng, layer, mask, kind, broken):
    colour = np.float32((200, 235, 250) if kind == "head" else (40, 40, 215))
    if not broken:
        _shade(layer, mask, colour, 1.1, 0.85)
        return
    ys, xs = np.nonzero(mask)
    layer[ys, xs] = colour * 0.18 + 20
    # a few surviving shards, dimmed, separated by dark gaps
    for _ in range(int(rng.integers(2, 4))):
        i = int(rng.integers(len(xs)))
        tri = np.array([(xs[i], ys[i]), (xs[i] + rng.integers(-4, 5), ys[i] + rng.integers(1, 5)),
                        (xs[i] + rng.integers(1, 5), ys[i] + rng.integers(-4, 1))], np.int32)
        shard = _fill(mask.shape, [tri]).astype(bool) & mask.astype(bool)
        layer[shard] = colour * 0.6
    crack = np.zeros(mask.shape, np.uint8)
    cv2.line(crack, (int(xs.min()), int(ys.min())), (int(xs.max()), int(ys.max())), 1, 1)
    layer[crack.astype(bool) & mask.astype(bool)] = (10, 10, 10)


# ----------------------------------------------------------------------------- one sample


def _vehicle_plan(rng, shape, s, pad, n_vehicles, slot, view: str | None = None):
    """Place one vehicle: returns its parts and view, sized and positioned in the padded canvas."""
    if n_vehicles == 1:
        length = s * rng.uniform(0.5, 0.95)
        ground = pad + s * rng.uniform(0.6, 1.02)
    else:
        length = s * rng.uniform(0.48, 0.7)
        ground = pad + s * (rng.uniform(0.42, 0.55) if slot == 0 else rng.uniform(0.88, 1.02))
    drawn = str(rng.choice(["side", "front", "rear"], p=[0.7, 0.15, 0.15]))
    view = view or drawn
    if view == "side":
        x0 = pad + rng.uniform(-0.25 * length, s - 0.75 * length)
        template = str(rng.choice(list(_SIDE_TEMPLATES)))
        parts = _side_vehicle(rng, shape, x0, ground, length, 1 if rng.random() < 0.5 else -1, template)
    else:
        length *= 0.9
        x0 = pad + rng.uniform(-0.1 * length, s - 0.55 * length)
        parts = _front_vehicle(rng, shape, x0, ground, length, rear=view == "rear")
    return parts, view, length


def _choose_damage(rng, view: str, target: str | None = None) -> list[str]:
    k = int(rng.choice([0, 1, 2, 3], p=[0.12, 0.3, 0.33, 0.25]))
    pool = [d for d in DAMAGE_TYPES if not (d == "tire_flat" and view != "side")]
    # only side views show flat tyres (and some are lost at the border): weight them up there
    w = np.array([1.6 if d == "tire_flat" else 1.0 for d in pool])
    chosen = list(rng.choice(pool, size=min(k, len(pool)), replace=False, p=w / w.sum()))
    if target is not None:  # the requested damage first (it gets the first pick of free space)
        chosen = [target] + [d for d in chosen if d != target][:2]
    return chosen


def render_sample(rng: np.random.Generator, imgsz: int, view: str = "scene", target: str | None = None,
                  zoom: tuple[float, float] = (1.8, 2.8), tile_scale: float = 4.0) -> Sample:
    """Render one synthetic image and its exact instances.

    Args:
        rng: random generator; the same generator state gives the same sample.
        imgsz: side of the square image in pixels.
        view: ``"scene"`` (0-2 whole vehicles in their surroundings) or ``"closeup"`` (an
            inspection photo: a window of ``imgsz`` px cut from a scene rendered ``zoom`` times
            larger, framed on one damage, which may be cut by the window's border).
        target: damage type the (first) vehicle carries, e.g. ``"dent"``; None = random damage.
            ``"tile"``: a training crop at the tile scale of sliced inference, a window of ``imgsz``
            px at a random place of a whole scene rendered ``tile_scale`` times larger
            (``damage.tasks.data.synth_views.render_tile``).
        zoom: close-up magnification range (uniform); ignored for scenes.
        tile_scale: the tile view's scene size as a multiple of ``imgsz``.

    Returns:
        Sample with the BGR uint8 image, instances (vehicles first, then their damage, each
        damage's ``parent`` pointing at its vehicle) and the low-light flag.

    Raises:
        ValueError: unknown ``view`` or ``target``.
    """
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    if target is not None and target not in DAMAGE_TYPES:
        raise ValueError(f"target must be one of {DAMAGE_TYPES} or None, got {target!r}")
    if view == "closeup":
        return render_closeup(rng, int(imgsz), target, zoom, _render_scene)
    if view == "tile":
        return render_tile(rng, int(imgsz), tile_scale, _render_scene, target)
    return _render_scene(rng, int(imgsz), target)


def _render_scene(rng: np.random.Generator, imgsz: int, target: str | None = None,
                  n_vehicles: int | None = None) -> Sample:
    """A whole scene; ``target`` goes on the first vehicle, ``n_vehicles`` fixes the count."""
    s = int(imgsz)
    pad = s // 4  # vehicles stick out of the frame by at most ~0.25 s: the padding keeps them whole
    shape = (s + 2 * pad, s + 2 * pad)
    unit = s / 160.0  # stroke widths scale with the image so 96 px sets stay learnable
    bg, _ = _background(rng, s)
    canvas = np.zeros((*shape, 3), np.float32)
    canvas[pad:pad + s, pad:pad + s] = bg
    crop = (slice(pad, pad + s), slice(pad, pad + s))
    min_area = max(12, int(20 * unit * unit))

    drawn_n = int(rng.choice([0, 1, 2], p=[0.06, 0.62, 0.32]))
    if n_vehicles is None:
        n_vehicles = max(drawn_n, 1) if target else drawn_n
    taken = np.zeros(shape, bool)
    records: list[tuple[int, np.ndarray, int | None]] = []  # (cls, visible mask in image, parent vehicle)
    for slot in range(n_vehicles):
        for _attempt in range(12):
            want = target if slot == 0 else None
            parts, view, length = _vehicle_plan(rng, shape, s, pad, n_vehicles, slot,
                                                view="side" if want == "tire_flat" else None)
            damages = _choose_damage(rng, view, want)
            flat = None
            # a flat tyre goes on a wheel that is fully in frame (a cut one could not be labelled)
            inside = [i for i, (cx, cy, r) in enumerate(parts.wheels)
                      if pad + 1.5 * r <= cx <= pad + s - 1 - 1.5 * r and cy + r <= pad + s - 1]
            if "tire_flat" in damages and inside:
                flat = inside[int(rng.integers(len(inside)))]
                cx, cy, r = parts.wheels[flat]
                parts.tyres[flat] = _fill(shape, [_flat_tyre(cx, cy, r)])
            union = parts.body.copy()
            for t in parts.tyres:
                union |= t
            sil = _solid(union)
            if sil is None:
                continue
            vis = sil[crop]
            vis_solid = _solid(vis)
            # a vehicle mostly outside the frame, split by the border or touching another: re-place it
            if (vis_solid is None or vis_solid.sum() < 0.45 * sil.sum() or (vis & ~vis_solid).any()
                    or (sil & taken).any()):
                continue
            break
        else:
            continue
        taken |= cv2.dilate(sil.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        records.append((_CLS["vehicle"], vis, None))
        v_index = len(records) - 1
        # ground shadow: outside the silhouette, part of the background
        ys, xs = np.nonzero(sil)
        shadow = _fill(shape, [_ellipse(((xs.min() + xs.max()) / 2, ys.max()),
                                        ((np.ptp(xs) + 2) * 0.55, 3 + length * 0.03), 0)])
        canvas[shadow.astype(bool) & ~taken] *= 0.55  # never darken a vehicle already placed

        # --- paint the vehicle into its own layer, composited through the silhouette only;
        # work inside the vehicle's bounding box (the costly mask ops scale with its area)
        box = (slice(max(0, ys.min() - 2), ys.max() + 3), slice(max(0, xs.min() - 2), xs.max() + 3))
        parts = _crop_parts(parts, box)
        sil = sil[box]
        vshape = sil.shape

        def to_image(m_box: np.ndarray, box=box) -> np.ndarray:
            full = np.zeros(shape, bool)
            full[box] = m_box
            return full[crop]

        layer = canvas[box].copy()
        paint = _PAINTS[int(rng.integers(len(_PAINTS)))] * rng.uniform(0.85, 1.1, 3).astype(np.float32)
        paint = np.clip(paint, 0, 255)
        _shade(layer, sil, paint)
        for name, m in parts.deco:
            mb = m.astype(bool)
            layer[mb] *= 0.25 if name in ("well", "grille") else (0.55 if name == "seam" else 0.8)
            if name == "plate":
                layer[mb] = (225, 225, 225)
        for g in parts.glass:
            _paint_glass(rng, layer, g.astype(bool))
        for i, t in enumerate(parts.tyres):
            if parts.wheels:
                cx, cy, r = parts.wheels[i]
                _paint_wheel(layer, cx, cy, r, t, rim_dy=0.3 * r if i == flat else 0.0)
            else:
                layer[t.astype(bool)] = (28, 28, 30)

        # panel = painted metal, where dents and scratches belong
        panel = parts.body.astype(bool) & ~_not_panel(parts)
        occupied = np.zeros(vshape, bool)
        lamp_damaged: set[int] = set()
        for dmg in damages:
            region, info, vis_d = None, None, None
            for _try in range(6):
                if dmg == "dent":
                    got = _dent_shape(rng, vshape, panel, length)
                elif dmg == "scratch":
                    got = _scratch_shape(rng, vshape, panel, length, unit)
                elif dmg in ("crack", "glass_shatter"):
                    panes = [g for g in parts.glass if g.sum() >= 12]
                    if not panes:
                        break
                    pane = panes[int(rng.integers(len(panes)))]
                    got = (_crack_shape(rng, vshape, pane, unit) if dmg == "crack"
                           else _shatter_shape(rng, vshape, pane))
                elif dmg == "lamp_broken":
                    free = [i for i in range(len(parts.lamps)) if i not in lamp_damaged]
                    if not free:
                        break
                    li = free[int(rng.integers(len(free)))]
                    got = (parts.lamps[li][0], {"lamp": li})
                else:  # tire_flat
                    if flat is None:
                        break
                    got = (parts.tyres[flat], {})
                if got is None:
                    continue
                cand = _solid(got[0].astype(bool))
                if cand is None or (cand & occupied).any():
                    continue
                vis_d = to_image(cand)
                # too small to see, or cut by the border into pieces one polygon cannot describe:
                # not rendered, so not labelled. A damage cut by the border is labelled by its
                # visible part (never left unlabelled).
                if vis_d.sum() < min_area or not _single_region(vis_d):
                    continue
                region, info = cand, got[1]
                break
            if region is None:
                if dmg == "tire_flat" and flat is not None:
                    # cannot label it (cut off): render a normal wheel instead
                    cx, cy, r = parts.wheels[flat]
                    _paint_wheel(layer, cx, cy, r, _fill(vshape, [_ellipse((cx, cy), (r, r), 0)]))
                continue
            occupied |= cv2.dilate(region.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            if dmg == "dent":
                _paint_dent(rng, layer, region, info, paint)
            elif dmg == "scratch":
                _paint_scratch(rng, layer, region, info, paint)
            elif dmg == "crack":
                _paint_crack(rng, layer, region, info)
            elif dmg == "glass_shatter":
                _paint_shatter(rng, layer, region, info)
            elif dmg == "lamp_broken":
                lamp_damaged.add(info["lamp"])
            records.append((_CLS[dmg], vis_d, v_index))
        for i, (m, kind) in enumerate(parts.lamps):
            _paint_lamp(rng, layer, m.astype(bool), kind, broken=i in lamp_damaged)
        canvas[box][sil] = layer[sil]

    # --- lighting: exposure, colour cast, a directional falloff and sensor noise
    img = canvas[crop]
    low = rng.random() < 0.18
    gain = rng.uniform(0.3, 0.5) if low else rng.uniform(0.75, 1.2)
    cast = rng.uniform(0.9, 1.1, 3).astype(np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s - 0.5
    fall = 1 + rng.uniform(0, 0.35) * (xx * math.cos(ang) + yy * math.sin(ang))
    img = img * (gain * fall)[..., None] * cast
    img += rng.normal(0, 7 if low else rng.uniform(1.5, 5), img.shape).astype(np.float32)
    if low:
        # dark but above the data gate's "too_dark" floor (mean 25): a dim scene, not a black frame
        m = float(img.mean())
        if m < 32:
            img += 32 - m
    image = np.clip(img, 0, 255).astype(np.uint8)

    instances: list[Instance] = []
    index: dict[int, int] = {}  # record -> instance index, so ``parent`` stays valid if one is dropped
    for r, (cls, m, parent) in enumerate(records):
        m = m.astype(bool)
        poly = _outer(m)
        if poly is None or (parent is not None and parent not in index):
            continue
        index[r] = len(instances)
        instances.append(Instance(cls, poly.astype(np.int32), m, None if parent is None else index[parent]))
    return Sample(image, instances, low)


def _crop_parts(parts: _Parts, box: tuple[slice, slice]) -> _Parts:
    """The same parts cut to a bounding box (wheel centres shifted into its coordinates)."""
    dy, dx = box[0].start, box[1].start
    return _Parts(
        body=parts.body[box], glass=[g[box] for g in parts.glass], lamps=[(m[box], k) for m, k in parts.lamps],
        wheels=[(cx - dx, cy - dy, r) for cx, cy, r in parts.wheels], tyres=[t[box] for t in parts.tyres],
        deco=[(n, d[box]) for n, d in parts.deco])


def _not_panel(parts: _Parts) -> np.ndarray:
    """Pixels of a vehicle that are not painted metal (glass, lamps, wheels, trim), grown by 1 px."""
    m = np.zeros(parts.body.shape, np.uint8)
    for g in parts.glass:
        m |= g
    for lm, _ in parts.lamps:
        m |= lm
    for t in parts.tyres:
        m |= t
    for name, d in parts.deco:
        if name != "seam":
            m |= d
    return cv2.dilate(m, np.ones((3, 3), np.uint8)).astype(bool)


# ----------------------------------------------------------------------------- dataset writer


def label_lines(sample: Sample, imgsz: int) -> list[str]:
    """YOLO-seg label lines: ``class x1 y1 x2 y2 ...`` normalised by the image size."""
    lines = []
    for inst in sample.instances:
        xy = inst.polygon.astype(np.float64) / float(imgsz)
        lines.append(f"{inst.cls} " + " ".join(f"{v:.6f}" for v in xy.reshape(-1)))
    return lines


def _is_synth_output(out: Path) -> bool:
    return (out / SYNTH_MARKER).is_file()


def next_target(counts: dict[str, int]) -> str:
    """The damage type with the fewest instances so far (ties: the first in ``DAMAGE_TYPES``).

    Asking every image for the least represented damage keeps the per-class counts of a split
    within a few instances of each other, whatever the random extra damage adds.

    >>> next_target({"dent": 3, "scratch": 1, "crack": 1, "glass_shatter": 2, "lamp_broken": 5, "tire_flat": 4})
    'scratch'
    """
    return min(DAMAGE_TYPES, key=lambda d: (counts.get(d, 0), DAMAGE_TYPES.index(d)))


def generate_dataset(out: Path, images: int, seed: int = 0, imgsz: int = 160, val_fraction: float = 0.2,
                     closeup_fraction: float = 0.0, zoom: tuple[float, float] = (1.8, 2.8),
                     balance: bool = True, tile_fraction: float = 0.0, tile_scale: float = 4.0) -> Path:
    """Write the synthetic YOLO-seg dataset into ``out`` (atomically) and return its data.yaml.

    Layout: ``images/{train,val}/*.png``, ``labels/{train,val}/*.txt``, ``data.yaml`` (absolute
    ``path``), plus a ``.synth.json`` marker with the arguments. The same arguments give
    byte-identical images and labels. A non-empty ``out`` is refused unless it is an earlier
    synth output, which is replaced.

    Args:
        out: output folder.
        images: number of images (>= 2: at least one per split).
        seed: generator seed.
        imgsz: side of the square images in pixels.
        val_fraction: fraction of images in the val split (at least one image each side).
        closeup_fraction: share of close-up inspection views (the rest are whole scenes).
        zoom: close-up magnification range.
        balance: each image carries the damage type least represented so far in its split
            (class-balanced counts); False = random damage.
        tile_fraction: share of tile-scale training crops of high-resolution scenes (``render_sample``'s
            ``"tile"`` view: what sliced inference feeds the model); close-ups + tiles <= 1.
        tile_scale: the tiles' scene size as a multiple of ``imgsz`` (4: 640-px scenes for 160-px tiles).

    Raises:
        DatasetError: bad arguments or ``out`` is a non-empty folder that is not synth output.
    """
    from damage.tasks.core.errors import DatasetError

    if images < 2:
        raise DatasetError(f"{out}: need at least 2 images (one train, one val), got {images}")
    if not 0 < val_fraction < 1:
        raise DatasetError(f"{out}: val_fraction must be in (0, 1), got {val_fraction}")
    if imgsz < 32:
        raise DatasetError(f"{out}: imgsz must be >= 32, got {imgsz}")
    if seed < 0:
        raise DatasetError(f"{out}: seed must be >= 0, got {seed}")
    if not 0 <= closeup_fraction <= 1:
        raise DatasetError(f"{out}: closeup_fraction must be in [0, 1], got {closeup_fraction}")
    if not 1 <= zoom[0] <= zoom[1]:
        raise DatasetError(f"{out}: zoom must be [min, max] with 1 <= min <= max, got {list(zoom)}")
    if not 0 <= tile_fraction <= 1 - closeup_fraction or tile_scale < 1:
        raise DatasetError(f"{out}: tile_fraction must be in [0, 1 - closeup_fraction] and tile_scale >= 1, "
                           f"got {tile_fraction} and {tile_scale}")
    out = Path(out).expanduser().resolve()
    n_val = min(images - 1, max(1, round(images * val_fraction)))
    val_idx = set(np.random.default_rng([seed, 7919]).permutation(images)[:n_val].tolist())
    png = [cv2.IMWRITE_PNG_COMPRESSION, 6]
    counts: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    # the view of image i depends on (seed, i) only, so a larger dataset keeps the first images' views
    # (tile crops take the draws just above the close-ups' share: tile_fraction 0 leaves every view as it was)
    draws = np.random.default_rng([seed, 104729]).random(images)
    views = np.where(draws < closeup_fraction, "closeup",
                     np.where(draws < closeup_fraction + tile_fraction, "tile", "scene"))
    with atomic_output_dir(out, replace_if=_is_synth_output) as tmp:
        for split in ("train", "val"):
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "labels" / split).mkdir(parents=True)
        for i in range(images):
            split = "val" if i in val_idx else "train"
            target = next_target(counts[split]) if balance else None
            sample = render_sample(np.random.default_rng([seed, i]), imgsz, str(views[i]), target, zoom, tile_scale)
            for inst in sample.instances:
                if inst.parent is not None:
                    counts[split][inst.name] = counts[split].get(inst.name, 0) + 1
            name = f"synth_{i:05d}"
            ok, buf = cv2.imencode(".png", sample.image, png)
            if not ok:
                raise DatasetError(f"{out}: could not encode image {name}.png")
            (tmp / "images" / split / f"{name}.png").write_bytes(buf.tobytes())
            lines = label_lines(sample, imgsz)
            (tmp / "labels" / split / f"{name}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        data = {"path": str(out), "train": "images/train", "val": "images/val",
                "names": dict(enumerate(CLASSES))}
        (tmp / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        marker = {"generator": "damage.tasks.data.synth", "version": GENERATOR_VERSION, "images": images, "seed": seed,
                  "imgsz": imgsz, "val_fraction": val_fraction, "closeup_fraction": closeup_fraction,
                  "zoom": list(zoom), "balance": balance, "damage_counts": counts}
        if tile_fraction:  # only then: a dataset without tiles keeps its byte-identical marker
            marker.update({"tile_fraction": tile_fraction, "tile_scale": tile_scale})
        (tmp / SYNTH_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return out / "data.yaml"
