"""Drawing primitives of the synthetic generator: backgrounds, side/front vehicles and their parts, and the
damage shapes painted on them (dent, scratch, crack, shatter, lamp, flat tyre). ``tasks.data.synth`` composes
them into samples with exact labels; everything here draws into numpy arrays, deterministic by ``rng``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from damage.tasks.data.synth_views import fill as _fill

PAINTS = np.array([
    (235, 235, 235), (30, 30, 32), (190, 192, 195), (120, 122, 125), (40, 40, 200), (190, 90, 30),
    (90, 40, 20), (60, 130, 40), (40, 210, 230), (30, 130, 240), (170, 200, 215), (40, 70, 110),
], dtype=np.float32)

# Side-view body templates in (u along the car rear->front, v up from the ground), units of length.
# Each: body outline (incl. cabin), side windows, wheel centres u, wheel radius, lamp boxes.
SIDE_TEMPLATES = {
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


# ----------------------------------------------------------------------------- geometry helpers


def ellipse(c, axes, angle_deg, n: int = 40) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    a = math.radians(angle_deg)
    x, y = axes[0] * np.cos(t), axes[1] * np.sin(t)
    return np.stack([c[0] + x * math.cos(a) - y * math.sin(a), c[1] + x * math.sin(a) + y * math.cos(a)], 1)


def pick_pixel(rng: np.random.Generator, mask: np.ndarray, margin: int = 0) -> tuple[int, int] | None:
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


def smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, channels: int = 1) -> np.ndarray:
    small = rng.random((cells, cells, channels)).astype(np.float32)
    big = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return big.reshape(h, w, channels)


def vgrad(h: int, w: int, top, bottom) -> np.ndarray:
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    return np.broadcast_to((1 - t) * np.float32(top) + t * np.float32(bottom), (h, w, 3)).copy()


def background(rng: np.random.Generator, s: int) -> tuple[np.ndarray, str]:
    kind = str(rng.choice(["road", "grass", "gradient", "noise", "wall"], p=[0.35, 0.2, 0.15, 0.15, 0.15]))
    img = np.empty((s, s, 3), np.float32)
    if kind in ("road", "grass"):
        hz = int(s * rng.uniform(0.25, 0.5))
        sky_top = np.float32([rng.uniform(150, 230), rng.uniform(110, 190), rng.uniform(60, 140)])
        img[:hz] = vgrad(hz, s, sky_top, sky_top * 0.5 + 110)
        if kind == "road":
            base = rng.uniform(70, 130)
            ground = base + 25 * (smooth_noise(rng, s - hz, s, 24) - 0.5) + rng.normal(0, 6, (s - hz, s, 1))
            img[hz:] = np.repeat(ground, 3, 2) * np.float32([1.0, 1.0, rng.uniform(0.95, 1.05)])
            y = int(hz + (s - hz) * rng.uniform(0.3, 0.9))
            colour = (230, 230, 230) if rng.random() < 0.6 else (40, 200, 230)
            for x0 in range(int(rng.integers(-20, 0)), s, max(8, s // 5)):
                cv2.rectangle(img, (x0, y), (x0 + max(4, s // 10), y + max(1, s // 80)), colour, -1)
        else:
            tex = smooth_noise(rng, s - hz, s, 32, 3)
            green = np.float32([rng.uniform(20, 60), rng.uniform(90, 160), rng.uniform(30, 80)])
            img[hz:] = green * (0.7 + 0.6 * tex) + rng.normal(0, 8, (s - hz, s, 3))
    elif kind == "gradient":
        img[:] = vgrad(s, s, rng.uniform(30, 230, 3), rng.uniform(30, 230, 3))
        if rng.random() < 0.5:
            img = np.ascontiguousarray(np.transpose(img, (1, 0, 2)))
    elif kind == "noise":
        cells = int(rng.integers(3, 20))
        img[:] = 40 + 180 * smooth_noise(rng, s, s, cells, 3) * rng.uniform(0.6, 1.0)
    else:  # wall / garage: flat colour with panels
        img[:] = rng.uniform(60, 200, 3)
        for _ in range(int(rng.integers(2, 6))):
            x, y = rng.integers(0, s, 2)
            w, h = rng.integers(s // 8, s // 2, 2)
            cv2.rectangle(img, (int(x), int(y)), (int(x + w), int(y + h)), rng.uniform(40, 220, 3).tolist(), -1)
    return img, kind


# ----------------------------------------------------------------------------- vehicles


@dataclass
class Parts:
    """Part masks of one vehicle in the padded canvas (uint8 0/1)."""

    body: np.ndarray
    glass: list[np.ndarray]
    lamps: list[tuple[np.ndarray, str]]  # (mask, "head"|"tail")
    wheels: list[tuple[float, float, float]]  # (cx, cy, r) for side views
    tyres: list[np.ndarray]  # wheel masks (side) or tyre blocks (front/rear)
    deco: list[tuple[str, np.ndarray]]  # dark trim (wheel wells, grille, door lines): not panel
    silhouette: np.ndarray | None = None


def side_vehicle(rng, shape, x0, ground, length, facing, template) -> Parts:
    t = SIDE_TEMPLATES[template]
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
        tyres.append(_fill(shape, [ellipse((cx, cy), (r, r), 0)]))
        deco.append(("well", _fill(shape, [ellipse((cx, cy), (r * 1.18, r * 1.18), 0)]) & body))
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
    return Parts(body, glass, lamps, wheels, tyres, deco)


def front_vehicle(rng, shape, x0, ground, length, rear: bool) -> Parts:
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
    return Parts(body, glass, lamps, [], tyres, deco)


def shade(layer: np.ndarray, mask: np.ndarray, colour, top: float = 1.15, bottom: float = 0.8) -> None:
    """Paint ``colour`` into ``mask`` with a vertical light falloff (metal looks lit from above)."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return
    y0, y1 = ys.min(), ys.max() + 1
    t = (ys - y0) / max(1, y1 - y0)
    layer[ys, xs] = np.float32(colour) * (top + (bottom - top) * t)[:, None]


def paint_glass(rng, layer, mask) -> None:
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return
    base = np.float32([rng.uniform(60, 95), rng.uniform(45, 70), rng.uniform(30, 50)])
    d = (xs - xs.min()) + (ys - ys.min())
    span = max(1, d.max())
    streak = np.abs(((d / span) * 2.0 + rng.uniform(0, 1)) % 1.0 - 0.5) < 0.12
    layer[ys, xs] = base * (1.0 + 0.5 * (ys - ys.min())[:, None] / max(1, np.ptp(ys))) + streak[:, None] * 35


def paint_wheel(layer, cx, cy, r, tyre_mask=None, rim_dy: float = 0.0) -> None:
    if tyre_mask is None:
        tyre_mask = _fill(layer.shape[:2], [ellipse((cx, cy), (r, r), 0)])
    layer[tyre_mask.astype(bool)] = (28, 28, 30)
    rim = _fill(layer.shape[:2], [ellipse((cx, cy + rim_dy), (0.58 * r, 0.58 * r), 0)]) & tyre_mask
    shade(layer, rim, (185, 185, 190), 1.1, 0.75)
    hub = _fill(layer.shape[:2], [ellipse((cx, cy + rim_dy), (0.18 * r, 0.18 * r), 0)]) & tyre_mask
    layer[hub.astype(bool)] = (90, 90, 95)


# ----------------------------------------------------------------------------- damage shapes


def dent_shape(rng, shape, panel, length):
    c = pick_pixel(rng, panel, margin=max(2, int(0.03 * length)))
    if c is None:
        return None
    a = max(4.0, length * rng.uniform(0.05, 0.12))
    b = a * rng.uniform(0.55, 1.0)
    return _fill(shape, [ellipse(c, (a, b), rng.uniform(0, 180), 28)]) & panel, {"c": c, "a": a}


def scratch_shape(rng, shape, panel, length, unit):
    c = pick_pixel(rng, panel, margin=2)
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


def crack_shape(rng, shape, pane, unit):
    c = pick_pixel(rng, pane, margin=2)
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


def shatter_shape(rng, shape, pane):
    c = pick_pixel(rng, pane, margin=2)
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


def flat_tyre(cx, cy, r) -> np.ndarray:
    """A tyre squashed at the bottom: flat contact patch, sidewalls bulging outwards."""
    pts = ellipse((cx, cy), (r, r), 0, 48)
    dy = pts[:, 1] - cy
    low = dy > 0.3 * r
    pts[low, 1] = cy + 0.3 * r + (dy[low] - 0.3 * r) * 0.35
    bulge = np.clip(dy / r, 0, None)
    pts[:, 0] = cx + (pts[:, 0] - cx) * (1 + 0.45 * bulge)
    pts[:, 1] += 0.455 * r  # the rim sinks while the squashed tread stays on the ground
    return pts


# ----------------------------------------------------------------------------- damage painting


def paint_dent(rng, layer, region, info, body_colour):
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


def paint_scratch(rng, layer, region, info, body_colour):
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


def paint_crack(rng, layer, region, info):
    # bright chipped halo around a dark fracture line
    layer[region] = (215, 222, 225)
    ys, xs = np.nonzero(region)
    layer[ys, xs] -= np.float32(rng.uniform(0, 35, (len(ys), 1)))
    core = np.zeros(region.shape, np.uint8)
    cv2.polylines(core, [np.round(sg).astype(np.int32) for sg in info["segs"]], False, 1, 1)
    layer[core.astype(bool) & region] = (70, 70, 75)


def paint_shatter(rng, layer, region, info):
    layer[region] = layer[region] * 0.35 + np.float32((200, 205, 210)) * 0.65
    web = np.zeros(region.shape, np.uint8)
    c, rad = info["c"], info["rad"]
    for a in np.linspace(0, 2 * np.pi, int(rng.integers(7, 11)), endpoint=False) + rng.uniform(0, 1):
        cv2.line(web, c, (int(c[0] + 1.5 * rad * math.cos(a)), int(c[1] + 1.5 * rad * math.sin(a))), 1, 1)
    for k in (0.35, 0.7):
        ring = ellipse(c, (rad * k, rad * k), 0, 9)
        cv2.polylines(web, [np.round(ring).astype(np.int32)], True, 1, 1)
    layer[web.astype(bool) & region] = (45, 45, 50)
    cv2.circle(web, c, 1, 2, -1)
    layer[(web == 2) & region] = (250, 250, 250)


def paint_lamp(rng, layer, mask, kind, broken):
    colour = np.float32((200, 235, 250) if kind == "head" else (40, 40, 215))
    if not broken:
        shade(layer, mask, colour, 1.1, 0.85)
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


