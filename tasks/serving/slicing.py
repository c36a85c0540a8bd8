"""Sliced inference for whole-vehicle photos: overlapping tiles at the model's input scale, one downscaled
whole-image pass, instances merged into full-resolution masks (numpy only, like the predictor).

Why: a phone photo of a whole car is 1-12 MP and is letterboxed to the model's input (160-640 px), so a
scratch that covers a few hundred pixels of the photo covers a few pixels of the input and is lost (the
demo model's scratch AP50 fell from 0.69 on close-ups to 0.12 on whole scenes, issue 34). Tiles at the
model's own scale show damage at the size the model was trained on; the whole-image pass still sees
objects no tile can hold (the vehicle itself).

The one setting, ``predictor.slices`` (``parse_slices``):

* ``off``: no slicing; the predictor's results are exactly those it gave before slicing existed;
* ``auto``: slice an image when a side is more than ``AUTO_FACTOR`` (1.5) times the model's input side,
  tiles of the model's input size with ``DEFAULT_OVERLAP``;
* ``{size, overlap}``: tiles of ``size`` original pixels (resized to the input) overlapping by the
  fraction ``overlap``; an image no larger than a tile is not sliced.

How one image is predicted (``predict_sliced``):

1. ``tile_windows``: tiles cover the image with at least ``overlap`` of a tile shared by neighbours
   (the last tile of a row or column is moved back inside the image, so it overlaps more);
2. the tiles and the whole image are letterboxed to the same input and run in as few runtime calls as
   the graph allows: chunks of ``max_batch`` inputs with a dynamic batch axis, one input per call
   without one (``Predictor.infer`` loops);
3. each pass is post-processed by the predictor itself (its NMS, its exact mask decoding), at the
   tile's own resolution: masks come out at full resolution, cropped to their box (``BoxMask``);
4. ``merge_pieces``: pieces of one object seen by several tiles are joined (mask union), detections
   of the whole-image pass fill in what no tile holds, and the damage report (vehicle assignment,
   damage percentage) is computed once on the merged full-resolution masks.

Merge rules (class-aware; the reason for each is in ``merge_pieces``):

* two tile pieces of one class from different tiles join when their masks agree on the pixels both
  tiles saw: mask IoU >= ``JOIN_IOU`` inside the intersection of the two tiles. A mask cut at a tile
  border is seen again, uncut or cut elsewhere, by its neighbour, and inside the shared strip both
  see the same pixels; joins are transitive (an object across three tiles is one instance);
* a whole-pass detection larger than a tile on either side is "large": no tile saw it whole. When
  the tiles' joined mask of its class lies inside it and reaches its extent on all four sides (within
  the whole pass's resolution), the tiles rebuilt it and their full-resolution mask is kept; otherwise its mask is the whole pass's, and tile groups of
  its class lying inside it, or inside the union of its class's large detections (intersection over
  the group's area >= ``ABSORB_IOS``), are absorbed;
* a tile group larger than a tile (joined from pieces no tile saw whole) is kept only where the whole
  pass found its class there too (mask IoU >= ``CONFIRM_IOU``): chains of junk pieces do not grow into
  one big instance;
* a smaller whole-pass detection is kept only where no tile group of its class covers it (IOS >=
  ``ABSORB_IOS``): tiles see small objects at full resolution, the downscaled pass only backs them up.

The ``sahi`` package (0.12.8) was evaluated for this: its slice geometry matches ``tile_windows``, but
its merge (``GreedyNMMPostprocess``) matches predictions by box IoU/IOS and unions masks as polygons
(no holes, vertex resolution), it has no notion of the window each tile saw (a long scratch cut at a
border has low box overlap with its other half), its post-processing imports torch (the predictor must
not), and it runs one model call per slice. So the geometry and the merge are the project's own.

Example:
    >>> spec = parse_slices({"size": 160, "overlap": 0.25})
    >>> tile_windows(200, 300, (160, 160), spec.overlap)
    [(0, 0, 160, 160), (140, 0, 300, 160), (0, 40, 160, 200), (140, 40, 300, 200)]
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.errors import DamageError
from .damage_percent import BoxMask, damage_report

__all__ = ["ABSORB_IOS", "AUTO_FACTOR", "CONFIRM_IOU", "DEFAULT_OVERLAP", "JOIN_IOU", "Piece", "SliceSpec", "merge_pieces",
           "parse_slices", "predict_images", "predict_sliced", "tile_starts", "tile_windows"]

AUTO_FACTOR = 1.5  # auto slices an image whose side exceeds this many model input sides
DEFAULT_OVERLAP = 0.2  # share of a tile its neighbour also sees (auto, and a mapping without overlap)
JOIN_IOU = 0.5  # tile pieces join when their masks agree this well where both tiles looked
ABSORB_IOS = 0.5  # a piece lies inside another when this share of its pixels does
CONFIRM_IOU = 0.5  # a joined group larger than a tile needs a whole-pass detection of its class this close
MAX_BATCH = 8  # inputs per runtime call at most (a 12 MP photo at 640 px: 48 tiles; 8 bound the memory)
MAX_TILES = 1024  # tiles per image at most (a 4096-px tile grid over a 178 MP image stays far below)
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class SliceSpec:
    """A parsed ``predictor.slices`` value.

    Attributes:
        mode: ``off`` | ``auto`` | ``fixed`` (a ``{size, overlap}`` mapping).
        size: tile side in original pixels (``fixed``); None = the model's input size.
        overlap: share of a tile that its neighbour also sees, in (0, 0.5].
    """

    mode: str = "off"
    size: int | None = None
    overlap: float = DEFAULT_OVERLAP

    def tile_hw(self, imgsz: tuple[int, int]) -> tuple[int, int]:
        """Tile (h, w) in original pixels for a model of input ``imgsz`` (h, w)."""
        return (self.size, self.size) if self.size else (int(imgsz[0]), int(imgsz[1]))

    def active(self, h: int, w: int, imgsz: tuple[int, int]) -> bool:
        """Whether an ``h`` x ``w`` image is sliced."""
        if self.mode == "off":
            return False
        if self.mode == "auto":
            return h > AUTO_FACTOR * imgsz[0] or w > AUTO_FACTOR * imgsz[1]
        th, tw = self.tile_hw(imgsz)
        return h > th or w > tw

    def to_value(self) -> str | dict[str, Any]:
        """The config / metadata form: ``"off"``, ``"auto"`` or ``{"size": ..., "overlap": ...}``."""
        return self.mode if self.mode != "fixed" else {"size": self.size, "overlap": self.overlap}


def parse_slices(value: Any, name: str = "slices") -> SliceSpec:
    """``predictor.slices`` (or the ``damage.slices`` metadata) as a ``SliceSpec``.

    Accepts ``"off"``/``"auto"`` (YAML's bare ``off`` arrives as False), None (= off), or a mapping
    (or pydantic model) with ``size`` (pixels, 32-4096) and optional ``overlap`` (0 < overlap <= 0.5).

    Args:
        value: the setting.
        name: what the value is called in errors (e.g. the model file's metadata key).

    Raises:
        DamageError: anything else, naming ``name`` and the value.
    """
    if value is None or value is False:
        return SliceSpec("off")
    if isinstance(value, SliceSpec):
        return value
    if isinstance(value, str) and value.strip().lower() in ("off", "auto"):
        return SliceSpec(value.strip().lower())
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    if isinstance(value, dict) and set(value) <= {"size", "overlap"} and "size" in value:
        size, overlap = value["size"], value.get("overlap", DEFAULT_OVERLAP)
        if isinstance(size, bool) or not isinstance(size, int) or not 32 <= size <= 4096:
            raise DamageError(f"{name}.size must be an integer in [32, 4096] pixels, got {size!r}")
        if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 < overlap <= 0.5:
            raise DamageError(f"{name}.overlap must be a fraction in (0, 0.5], got {overlap!r}")
        return SliceSpec("fixed", int(size), float(overlap))
    raise DamageError(f"{name} must be 'off', 'auto' or {{size, overlap}}, got {value!r}")


# ----------------------------------------------------------------------------- geometry


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of ``tile`` px covering ``length`` px, neighbours sharing >= ``overlap``.

    The step is ``floor(tile * (1 - overlap))``; the last tile is moved back to end at ``length``
    (it then overlaps its neighbour more). A length no longer than a tile gives one tile at 0.
    """
    if length <= tile:
        return [0]
    step = max(int(math.floor(tile * (1 - overlap))), 1)
    n = math.ceil((length - tile) / step) + 1
    return sorted({min(i * step, length - tile) for i in range(n)})


def tile_windows(h: int, w: int, tile_hw: tuple[int, int], overlap: float) -> list[Box]:
    """Tile windows ``(x0, y0, x1, y1)`` (end-exclusive) covering an ``h`` x ``w`` image, row by row.

    Raises:
        DamageError: more than ``MAX_TILES`` tiles (a tile far too small for the image).
    """
    th, tw = min(tile_hw[0], h), min(tile_hw[1], w)
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    if len(ys) * len(xs) > MAX_TILES:
        raise DamageError(f"slicing a {w}x{h} image into {th}x{tw} tiles needs {len(ys) * len(xs)} tiles "
                          f"(at most {MAX_TILES}): raise slices.size")
    return [(x, y, x + tw, y + th) for y in ys for x in xs]


# ----------------------------------------------------------------------------- merge


@dataclass
class Piece:
    """One detection of one pass, in full-image coordinates.

    Attributes:
        cls, name, score: class index, class name, confidence.
        box: ``[x1, y1, x2, y2]`` float pixels of the full image.
        mask: full-frame ``BoxMask``.
        window: the region this pass saw (a tile, or the whole image).
        whole: from the downscaled whole-image pass.
    """

    cls: int
    name: str
    score: float
    box: list[float]
    mask: BoxMask
    window: Box
    whole: bool = False


def _meet(a: Box, b: Box) -> Box | None:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _hull(a: Box, b: Box) -> Box:
    return min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])


def _sub(m: BoxMask, r: Box) -> np.ndarray:
    return m[r[1]:r[3], r[0]:r[2]]


def _agree(a: Piece, b: Piece) -> bool:
    """Mask IoU >= JOIN_IOU inside the region both tiles saw (and some pixels in common there)."""
    seen = _meet(a.window, b.window)
    r = _meet(seen, _hull(a.mask.extent, b.mask.extent)) if seen else None
    if r is None or _meet(a.mask.extent, b.mask.extent) is None:
        return False
    ma, mb = _sub(a.mask, r), _sub(b.mask, r)
    inter = int(np.count_nonzero(ma & mb))
    union = int(np.count_nonzero(ma | mb))
    return inter > 0 and inter >= JOIN_IOU * union


def _ios(small: BoxMask, big: BoxMask) -> float:
    """Share of ``small``'s pixels inside ``big``."""
    r = _meet(small.extent, big.extent)
    n = small.count()
    return int(np.count_nonzero(_sub(small, r) & _sub(big, r))) / n if r and n else 0.0


def _bigger(p: Piece, th: int, tw: int) -> bool:
    return p.box[2] - p.box[0] > tw or p.box[3] - p.box[1] > th


def _iou(a: BoxMask, b: BoxMask) -> float:
    r = _meet(a.extent, b.extent)
    inter = int(np.count_nonzero(_sub(a, r) & _sub(b, r))) if r else 0
    union = a.count() + b.count() - inter
    return inter / union if union else 0.0


def _rebuilt(group: Piece, big: Piece, tol: float) -> bool:
    """The tiles' joined ``group`` is the whole pass's ``big`` object: inside it, and the same extent."""
    ea, eb = group.mask.extent, big.mask.extent
    return _ios(group.mask, big.mask) >= ABSORB_IOS and all(abs(a - b) <= tol for a, b in zip(ea, eb, strict=True))


def _union(group: list[Piece]) -> Piece:
    """One piece from a group: mask union over the hull of the extents, best score, hull of the boxes."""
    if len(group) == 1:
        return group[0]
    ext = group[0].mask.extent
    for p in group[1:]:
        ext = _hull(ext, p.mask.extent)
    crop = np.zeros((ext[3] - ext[1], ext[2] - ext[0]), bool)
    for p in group:
        x0, y0, x1, y1 = p.mask.extent
        crop[y0 - ext[1]:y1 - ext[1], x0 - ext[0]:x1 - ext[0]] |= p.mask.crop
    best = max(group, key=lambda p: p.score)
    box = [min(p.box[0] for p in group), min(p.box[1] for p in group),
           max(p.box[2] for p in group), max(p.box[3] for p in group)]
    win = group[0].window
    for p in group[1:]:
        win = _hull(win, p.window)
    return Piece(best.cls, best.name, best.score, box, BoxMask(crop, ext[0], ext[1], best.mask.shape), win)


def _join_tiles(pieces: list[Piece]) -> list[Piece]:
    """Union-find over pairs of pieces that agree (same class, different tiles, boxes meet)."""
    n = len(pieces)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if n > 1:
        ext = np.array([p.mask.extent for p in pieces], np.int64)
        cls = np.array([p.cls for p in pieces])
        win = [p.window for p in pieces]
        for i in range(n):
            # candidates: later pieces of the same class whose extents meet piece i's (vectorised filter)
            j = np.flatnonzero((cls[i + 1:] == cls[i]) & (ext[i + 1:, 0] < ext[i, 2]) & (ext[i + 1:, 2] > ext[i, 0])
                               & (ext[i + 1:, 1] < ext[i, 3]) & (ext[i + 1:, 3] > ext[i, 1])) + i + 1
            for k in j.tolist():
                if win[k] != win[i] and find(k) != find(i) and _agree(pieces[i], pieces[k]):
                    parent[find(k)] = find(i)
    groups: dict[int, list[Piece]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(pieces[i])
    return [_union(g) for g in groups.values()]


def merge_pieces(pieces: Sequence[Piece], tile_hw: tuple[int, int], edge_tol: float = 8.0) -> list[Piece]:
    """Merge the detections of all passes of one image into instances (rules in the module docstring).

    Args:
        pieces: every pass's detections in full-image coordinates (``Piece.whole`` marks the
            whole-image pass).
        tile_hw: the tile size (h, w) in original pixels: a whole-pass detection larger than it on
            either side is "large".
        edge_tol: pixels by which the extents of a large detection and the tiles' rebuilt mask of it
            may differ (the whole pass's resolution: ``predict_sliced`` passes 2 input pixels + 1).

    Returns:
        The merged instances, highest score first.
    """
    th, tw = tile_hw
    groups = _join_tiles([p for p in pieces if not p.whole])
    whole = [p for p in pieces if p.whole]
    is_large = [_bigger(p, th, tw) for p in whole]
    large = [p for p, b in zip(whole, is_large, strict=True) if b]
    small = [p for p, b in zip(whole, is_large, strict=True) if not b]
    # A large object the tiles reconstructed across their borders (their joined mask lies in the whole
    # pass's and reaches its extent on all four sides, within the whole pass's resolution) keeps the
    # tiles' full-resolution mask (mask IoU would not do: a thin scratch's downscaled mask is fatter); otherwise the tiles saw only
    # fragments of what the whole pass outlines, and counting them again would duplicate it (or split a
    # vehicle into tile-sized parts): they are absorbed.
    large = [b for b in large if not any(g.cls == b.cls and _rebuilt(g, b, edge_tol) for g in groups)]
    # (inside the union of the class's large detections: a tile group may join pieces of two adjacent cars)
    covers = {c: _union([b for b in large if b.cls == c]).mask for c in {b.cls for b in large}}
    kept = [g for g in groups if g.cls not in covers or _ios(g.mask, covers[g.cls]) < ABSORB_IOS]
    # A group larger than a tile was seen by no tile whole and joined from pieces: it stands only where the
    # whole pass (which saw it whole) found the same class there. A model trained on close-ups sees "vehicle"
    # in every tile of a car park; joined, such pieces grew into one vehicle over most of a 640-px photo.
    kept = [g for g in kept if not _bigger(g, th, tw)
            or any(w.cls == g.cls and _iou(g.mask, w.mask) >= CONFIRM_IOU for w in whole)]
    # Tiles see small objects at full resolution; the downscaled pass only adds what no tile found.
    extra = [p for p in small if not any(p.cls == g.cls and max(_ios(p.mask, g.mask), _ios(g.mask, p.mask))
                                         >= ABSORB_IOS for g in kept)]
    return sorted(large + kept + extra, key=lambda p: -p.score)


# ----------------------------------------------------------------------------- predict


def _shift(m: BoxMask, dx: int, dy: int, shape: tuple[int, int]) -> BoxMask:
    return BoxMask(m.crop, m.x0 + dx, m.y0 + dy, shape)


def predict_sliced(predictor: Any, im: np.ndarray, spec: SliceSpec, conf: float | None = None,
                   iou: float | None = None, max_batch: int = MAX_BATCH) -> Any:
    """Predict one BGR image with tiles + a whole-image pass, merged at full resolution.

    Args:
        predictor: a ``damage.tasks.serving.predictor.Predictor`` (its ``preprocess``, ``infer`` and
            ``postprocess`` do each pass, so the maths are the unsliced predictor's).
        im: HxWx3 BGR uint8 image.
        spec: the slicing (``parse_slices``); tiles of ``spec.tile_hw(predictor.imgsz)``.
        conf, iou: thresholds for this call (default: the predictor's).
        max_batch: inputs per runtime call at most (a graph without a dynamic batch axis gets one).

    Returns:
        A ``Prediction`` of the full image; ``predictor.timings`` gets ``tiles`` and ``runs``.
    """
    h, w = im.shape[:2]
    tile_hw = spec.tile_hw(predictor.imgsz)
    windows = tile_windows(h, w, tile_hw, spec.overlap)
    crops = [im[y0:y1, x0:x1] for x0, y0, x1, y1 in windows] + [im]
    wins = [*windows, (0, 0, w, h)]
    bs = max(int(max_batch), 1) if predictor.dynamic_batch else 1
    pieces: list[Piece] = []
    whole_pred = None
    t_pre = t_inf = t_post = 0.0
    runs = 0
    for s in range(0, len(crops), bs):
        t0 = time.perf_counter()
        batch = predictor.preprocess(crops[s:s + bs])
        t1 = time.perf_counter()
        det, proto = predictor.infer(batch)
        t2 = time.perf_counter()
        runs += 1
        for k in range(len(batch)):
            x0, y0, x1, y1 = wins[s + k]
            whole = s + k == len(crops) - 1
            pred = predictor.postprocess(det[k], proto[k], (y1 - y0, x1 - x0), batch.shape[2:], conf, iou)
            if whole:
                whole_pred = pred
            for inst in pred.instances:
                box = [inst.box[0] + x0, inst.box[1] + y0, inst.box[2] + x0, inst.box[3] + y0]
                pieces.append(Piece(inst.cls, inst.name, float(inst.score), box, _shift(inst.mask, x0, y0, (h, w)),
                                    wins[s + k], whole))
        t_post += time.perf_counter() - t2
        t_pre, t_inf = t_pre + t1 - t0, t_inf + t2 - t1
    t0 = time.perf_counter()
    ih, iw = predictor.imgsz
    merged = merge_pieces(pieces, tile_hw, 2 * max(h / ih, w / iw) + 1)[:predictor.max_det]
    instances = [predictor.instance_type(id=i, cls=p.cls, name=p.name, score=p.score, box=p.box, mask=p.mask,
                                         area_px=p.mask.count()) for i, p in enumerate(merged)]
    rep = damage_report([p.mask for p in merged], [p.name for p in merged], predictor.vehicle_class,
                        boxes=[p.mask.extent for p in merged])
    for inst in instances:
        inst.vehicle_id = rep.assignment.get(inst.id)
    t_post += time.perf_counter() - t0
    predictor.timings = {"preprocess": t_pre, "inference": t_inf, "postprocess": t_post,
                         "tiles": float(len(windows)), "runs": float(runs)}
    return dataclasses.replace(whole_pred, width=w, height=h, instances=instances, damage=rep)


def predict_images(predictor: Any, images: Sequence[np.ndarray], spec: SliceSpec, batch_size: int | None = None,
                   conf: float | None = None, iou: float | None = None) -> list[Any]:
    """One ``Prediction`` per image, in order: sliced where ``spec`` says so, else the unsliced path."""
    out: list[Any] = [None] * len(images)
    plain = [i for i, im in enumerate(images) if not spec.active(*im.shape[:2], predictor.imgsz)]
    if plain:
        for i, r in zip(plain, predictor.predict_arrays([images[i] for i in plain], batch_size, conf, iou),
                        strict=True):
            out[i] = r
    timings = dict(predictor.timings) if plain else {}
    for i, im in enumerate(images):
        if out[i] is None:
            c = conf if conf is not None else predictor.sliced_conf
            out[i] = predict_sliced(predictor, im, spec, c, iou, batch_size or MAX_BATCH)
            for k, v in predictor.timings.items():
                timings[k] = timings.get(k, 0.0) + v
    predictor.timings = timings
    return out
