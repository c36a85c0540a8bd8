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
from damage.tasks.data.synth_paint import (
    PAINTS,
    SIDE_TEMPLATES,
    Parts,
    background,
    crack_shape,
    dent_shape,
    ellipse,
    flat_tyre,
    front_vehicle,
    paint_crack,
    paint_dent,
    paint_glass,
    paint_lamp,
    paint_scratch,
    paint_shatter,
    paint_wheel,
    scratch_shape,
    shade,
    shatter_shape,
    side_vehicle,
)
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
        template = str(rng.choice(list(SIDE_TEMPLATES)))
        parts = side_vehicle(rng, shape, x0, ground, length, 1 if rng.random() < 0.5 else -1, template)
    else:
        length *= 0.9
        x0 = pad + rng.uniform(-0.1 * length, s - 0.55 * length)
        parts = front_vehicle(rng, shape, x0, ground, length, rear=view == "rear")
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
    bg, _ = background(rng, s)
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
                parts.tyres[flat] = _fill(shape, [flat_tyre(cx, cy, r)])
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
        shadow = _fill(shape, [ellipse(((xs.min() + xs.max()) / 2, ys.max()),
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
        paint = PAINTS[int(rng.integers(len(PAINTS)))] * rng.uniform(0.85, 1.1, 3).astype(np.float32)
        paint = np.clip(paint, 0, 255)
        shade(layer, sil, paint)
        for name, m in parts.deco:
            mb = m.astype(bool)
            layer[mb] *= 0.25 if name in ("well", "grille") else (0.55 if name == "seam" else 0.8)
            if name == "plate":
                layer[mb] = (225, 225, 225)
        for g in parts.glass:
            paint_glass(rng, layer, g.astype(bool))
        for i, t in enumerate(parts.tyres):
            if parts.wheels:
                cx, cy, r = parts.wheels[i]
                paint_wheel(layer, cx, cy, r, t, rim_dy=0.3 * r if i == flat else 0.0)
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
                    got = dent_shape(rng, vshape, panel, length)
                elif dmg == "scratch":
                    got = scratch_shape(rng, vshape, panel, length, unit)
                elif dmg in ("crack", "glass_shatter"):
                    panes = [g for g in parts.glass if g.sum() >= 12]
                    if not panes:
                        break
                    pane = panes[int(rng.integers(len(panes)))]
                    got = (crack_shape(rng, vshape, pane, unit) if dmg == "crack"
                           else shatter_shape(rng, vshape, pane))
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
                    paint_wheel(layer, cx, cy, r, _fill(vshape, [ellipse((cx, cy), (r, r), 0)]))
                continue
            occupied |= cv2.dilate(region.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            if dmg == "dent":
                paint_dent(rng, layer, region, info, paint)
            elif dmg == "scratch":
                paint_scratch(rng, layer, region, info, paint)
            elif dmg == "crack":
                paint_crack(rng, layer, region, info)
            elif dmg == "glass_shatter":
                paint_shatter(rng, layer, region, info)
            elif dmg == "lamp_broken":
                lamp_damaged.add(info["lamp"])
            records.append((_CLS[dmg], vis_d, v_index))
        for i, (m, kind) in enumerate(parts.lamps):
            paint_lamp(rng, layer, m.astype(bool), kind, broken=i in lamp_damaged)
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


def _crop_parts(parts: Parts, box: tuple[slice, slice]) -> Parts:
    """The same parts cut to a bounding box (wheel centres shifted into its coordinates)."""
    dy, dx = box[0].start, box[1].start
    return Parts(
        body=parts.body[box], glass=[g[box] for g in parts.glass], lamps=[(m[box], k) for m, k in parts.lamps],
        wheels=[(cx - dx, cy - dy, r) for cx, cy, r in parts.wheels], tyres=[t[box] for t in parts.tyres],
        deco=[(n, d[box]) for n, d in parts.deco])


def _not_panel(parts: Parts) -> np.ndarray:
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
