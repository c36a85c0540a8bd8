"""Per-vehicle damage percentage: the one definition used by the predictor, the evaluator and the tests.

Definition (one for the predictor, the evaluator and the tests, so their figures agree):

* Instances whose class is ``vehicle_class`` are vehicles; every other instance is damage.
* Each damage instance is assigned to the vehicle whose mask it overlaps most (pixel count;
  ties go to the vehicle listed first). Damage that overlaps no vehicle is not assigned and
  is reported separately (``DamageReport.outside``).
* For each vehicle ``v`` with assigned damage ``D_v``:
  ``damage_percent = 100 * |union(D_v) & v| / |v|``; the per-class breakdown applies the
  same formula to the assigned damage of one class. Overlapping damage instances are counted
  once (union), so the classes of a breakdown may sum to more than the total when two
  classes cover the same pixels.
* Image level: the same over the union of all vehicles,
  ``100 * |union(assigned damage) & union(vehicles)| / |union(vehicles)|``.
* No vehicle: the percentage is ``None`` and ``note`` says why.

Error against labels (``vehicle_errors`` / ``mae_summary``, the sweep's ``damage_mae`` and the
``damage_pct_mae`` metric): per labelled vehicle, in percentage points. Each labelled vehicle
is matched to the predicted vehicle with the highest mask IoU (at least ``MATCH_IOU``; greedy,
best pairs first, one-to-one); both sides' percentages come from ``damage_report`` above. A
labelled vehicle without a match counts as 0 % predicted; predicted vehicles matching no label
are not counted (they are a detection error, not a percentage error). The per-class breakdown
averages ``|predicted - labelled|`` of one class over the vehicles where that class is labelled
or predicted.

Only numpy is imported, so the ONNX predictor can use this module without torch.

Example:
    >>> car = np.zeros((4, 4), bool); car[:, :2] = True
    >>> dent = np.zeros((4, 4), bool); dent[0, :] = True
    >>> damage_report([car, dent], ["vehicle", "dent"]).damage_percent
    25.0
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["MATCH_IOU", "DamageMAE", "DamageReport", "VehicleError", "damage_report", "mae_summary",
           "vehicle_errors"]

MATCH_IOU = 0.5  # a predicted vehicle stands for a labelled one from this mask IoU on


@dataclass
class DamageReport:
    """Damage percentages of one image.

    Attributes:
        vehicles: one dict per vehicle instance, in instance order: ``id`` (the vehicle's
            instance index), ``area_px``, ``damage_px``, ``damage_percent`` and ``by_class``
            (class name -> percent of the vehicle covered by that class's damage).
        damage_percent: image-level percentage over the union of all vehicles; None when no
            vehicle was found.
        note: why ``damage_percent`` is None, or a remark about damage outside every vehicle;
            None when there is nothing to say.
        assignment: instance index -> the instance index of its vehicle (a vehicle maps to
            itself), or None for damage that overlaps no vehicle.
        outside: damage overlapping no vehicle: dicts ``id``, ``class``, ``area_px``.
        vehicle_area_px: pixels of the union of all vehicles.
        damage_px: pixels of that union covered by assigned damage.
    """

    vehicles: list[dict[str, Any]] = field(default_factory=list)
    damage_percent: float | None = None
    note: str | None = None
    assignment: dict[int, int | None] = field(default_factory=dict)
    outside: list[dict[str, Any]] = field(default_factory=list)
    vehicle_area_px: int = 0
    damage_px: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (keys as strings for ``assignment``)."""
        return {
            "vehicles": [dict(v, by_class=dict(v["by_class"])) for v in self.vehicles],
            "damage_percent": self.damage_percent,
            "note": self.note,
            "assignment": {str(k): v for k, v in self.assignment.items()},
            "outside": [dict(o) for o in self.outside],
            "vehicle_area_px": self.vehicle_area_px,
            "damage_px": self.damage_px,
        }


def _percent(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole > 0 else 0.0


class BoxMask:
    """A boolean HxW mask stored as its box crop: ``crop`` at ``(x0, y0)`` in an ``shape`` frame.

    Per-instance full-frame masks cost H*W bytes each (63 instances on a 12 MP photo: 750 MB);
    a crop costs its box. Slicing (``m[y0:y1, x0:x1]``) returns that region without building the
    frame; ``np.asarray(m)`` (and the operators, ``sum``) materialise it only when asked.
    """

    __slots__ = ("crop", "x0", "y0", "shape")
    ndim = 2

    def __init__(self, crop: np.ndarray, x0: int, y0: int, shape: tuple[int, int]):
        self.crop = np.asarray(crop, bool)
        self.x0, self.y0, self.shape = int(x0), int(y0), (int(shape[0]), int(shape[1]))

    @property
    def extent(self) -> tuple[int, int, int, int]:
        return self.x0, self.y0, self.x0 + self.crop.shape[1], self.y0 + self.crop.shape[0]

    def __getitem__(self, key):
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, slice) for k in key)):
            return np.asarray(self)[key]
        (ys, ye, _), (xs, xe, _) = key[0].indices(self.shape[0]), key[1].indices(self.shape[1])
        out = np.zeros((max(ye - ys, 0), max(xe - xs, 0)), bool)
        bx0, by0, bx1, by1 = self.extent
        iy0, iy1, ix0, ix1 = max(ys, by0), min(ye, by1), max(xs, bx0), min(xe, bx1)
        if iy1 > iy0 and ix1 > ix0:
            out[iy0 - ys:iy1 - ys, ix0 - xs:ix1 - xs] = self.crop[iy0 - by0:iy1 - by0, ix0 - bx0:ix1 - bx0]
        return out

    def __array__(self, dtype=None, copy=None):
        full = np.zeros(self.shape, bool)
        x0, y0, x1, y1 = self.extent
        full[y0:y1, x0:x1] = self.crop
        return full if dtype is None else full.astype(dtype)

    def count(self) -> int:
        return int(np.count_nonzero(self.crop))

    def sum(self, *a, **kw):
        return self.count() if not a and not kw else np.asarray(self).sum(*a, **kw)

    def any(self, *a, **kw):
        return bool(self.crop.any()) if not a and not kw else np.asarray(self).any(*a, **kw)

    def astype(self, dtype, **kw):
        return np.asarray(self).astype(dtype, **kw)

    def __or__(self, o):
        return np.asarray(self) | np.asarray(o)

    def __and__(self, o):
        return np.asarray(self) & np.asarray(o)

    def __xor__(self, o):
        return np.asarray(self) ^ np.asarray(o)

    def __invert__(self):
        return ~np.asarray(self)

    __ror__, __rand__, __rxor__ = __or__, __and__, __xor__


def _count(m) -> int:
    return m.count() if isinstance(m, BoxMask) else int(np.count_nonzero(m))


def _check(masks: Sequence[np.ndarray], classes: Sequence[str]) -> list[np.ndarray]:
    if len(masks) != len(classes):
        raise ValueError(f"damage_report: {len(masks)} masks but {len(classes)} class names")
    out = [m if isinstance(m, BoxMask) else np.asarray(m).astype(bool, copy=False) for m in masks]
    shapes = {m.shape for m in out}
    if len(shapes) > 1:
        raise ValueError(f"damage_report: masks differ in size: {sorted(shapes)}")
    if out and out[0].ndim != 2:
        raise ValueError(f"damage_report: masks must be HxW, got shape {out[0].shape}")
    return out


def _extent(m: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the True pixels (end-exclusive); an empty mask gives an empty box."""
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    if not rows.size:
        return 0, 0, 0, 0
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


Box = tuple[int, int, int, int]


def _meet(a: Box, b: Box) -> Box | None:
    """The intersection of two extents, None when they do not meet."""
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _region(m, r: Box) -> np.ndarray:
    """``m[y0:y1, x0:x1]`` for region ``r``; a view of a ``BoxMask``'s crop (no frame, no copy) when
    the region lies inside its box, which is where the report looks (intersections of extents)."""
    x0, y0, x1, y1 = r
    if isinstance(m, BoxMask):
        bx0, by0, bx1, by1 = m.extent
        if bx0 <= x0 and by0 <= y0 and x1 <= bx1 and y1 <= by1:
            return m.crop[y0 - by0:y1 - by0, x0 - bx0:x1 - bx0]
    return m[y0:y1, x0:x1]


def _or_into(dst: np.ndarray, at: Box, m, ext: Box) -> None:
    """``dst`` (the frame's region ``at``) |= the pixels of ``m`` (extent ``ext``) that fall inside it."""
    r = _meet(at, ext)
    if r is not None:
        dst[r[1] - at[1]:r[3] - at[1], r[0] - at[0]:r[2] - at[0]] |= _region(m, r)


def damage_report(masks: Sequence[np.ndarray], classes: Sequence[str], vehicle_class: str = "vehicle",
                  boxes: Sequence[tuple[int, int, int, int]] | None = None) -> DamageReport:
    """Damage percentage per vehicle and for the whole image (definition in the module docstring).

    Args:
        masks: one boolean HxW mask per instance, all the same size (arrays or ``BoxMask``).
        classes: the class name of each instance.
        vehicle_class: the class name that marks vehicles.
        boxes: optional integer extents ``(x0, y0, x1, y1)`` (end-exclusive) that contain each
            mask's pixels; they only speed things up (work is limited to box intersections) and
            are computed from the masks when omitted.

    Returns:
        The report; ``damage_percent`` is None (with ``note``) when no vehicle is present.

    Raises:
        ValueError: masks and classes differ in length, or masks differ in size.
    """
    ms = _check(masks, classes)
    ext = [tuple(int(v) for v in b) for b in boxes] if boxes is not None else \
        [m.extent if isinstance(m, BoxMask) else _extent(m) for m in ms]
    if len(ext) != len(ms):
        raise ValueError(f"damage_report: {len(ms)} masks but {len(ext)} boxes")
    veh = [i for i, c in enumerate(classes) if c == vehicle_class]
    dmg = [i for i, c in enumerate(classes) if c != vehicle_class]
    rep = DamageReport()
    for i in veh:
        rep.assignment[i] = i

    # Assignment: overlap of every damage mask with every vehicle mask (only where boxes meet).
    for j in dmg:
        best, best_ov = None, 0
        for i in veh:
            r = _meet(ext[i], ext[j])
            ov = int(np.count_nonzero(_region(ms[i], r) & _region(ms[j], r))) if r else 0
            if ov > best_ov:  # strict: ties go to the vehicle listed first
                best, best_ov = i, ov
        rep.assignment[j] = best
        if best is None:
            rep.outside.append({"id": j, "class": str(classes[j]), "area_px": _count(ms[j])})

    for i in veh:
        v = _region(ms[i], ext[i])
        area = int(np.count_nonzero(v))
        union = np.zeros(v.shape, bool)
        by_cls_union: dict[str, np.ndarray] = {}
        for j in dmg:
            if rep.assignment[j] != i:
                continue
            c = str(classes[j])
            if c not in by_cls_union:
                by_cls_union[c] = np.zeros(v.shape, bool)
            _or_into(by_cls_union[c], ext[i], ms[j], ext[j])
        for u in by_cls_union.values():
            union |= u
        dpx = int(np.count_nonzero(union & v))
        rep.vehicles.append({
            "id": i,
            "area_px": area,
            "damage_px": dpx,
            "damage_percent": _percent(dpx, area),
            "by_class": {c: _percent(int(np.count_nonzero(u & v)), area) for c, u in sorted(by_cls_union.items())},
        })

    if not veh:
        rep.note = ("no vehicle detected: damage percentage undefined"
                    + (f" ({len(dmg)} damage instance(s) found)" if dmg else ""))
        return rep

    # image level, inside the box around all vehicles (nothing outside it can count)
    x0, y0 = min(ext[i][0] for i in veh), min(ext[i][1] for i in veh)
    x1, y1 = max(ext[i][2] for i in veh), max(ext[i][3] for i in veh)
    all_v = np.zeros((max(y1 - y0, 0), max(x1 - x0, 0)), bool)
    for i in veh:
        _or_into(all_v, (x0, y0, x1, y1), ms[i], ext[i])
    all_d = np.zeros_like(all_v)
    for j in dmg:
        if rep.assignment[j] is not None:
            _or_into(all_d, (x0, y0, x1, y1), ms[j], ext[j])
    rep.vehicle_area_px = int(np.count_nonzero(all_v))
    rep.damage_px = int(np.count_nonzero(all_d & all_v))
    rep.damage_percent = _percent(rep.damage_px, rep.vehicle_area_px)
    if rep.outside:
        px = sum(o["area_px"] for o in rep.outside)
        names = ", ".join(sorted({o["class"] for o in rep.outside}))
        rep.note = f"{len(rep.outside)} damage instance(s) ({names}, {px} px) overlap no vehicle: not counted"
    return rep


# ----------------------------------------------------------------------------- error against labels


@dataclass
class VehicleError:
    """One labelled vehicle: its labelled and predicted damage percentage (and per class).

    Attributes:
        truth: labelled damage percentage of the vehicle.
        pred: damage percentage of the matched predicted vehicle; 0 when none matched.
        by_class: class -> (labelled %, predicted %) for every class labelled or predicted on it.
        matched: whether a predicted vehicle matched (mask IoU >= ``MATCH_IOU``).
    """

    truth: float
    pred: float
    by_class: dict[str, tuple[float, float]]
    matched: bool

    @property
    def error(self) -> float:
        return abs(self.pred - self.truth)


@dataclass
class DamageMAE:
    """Mean absolute error of the per-vehicle damage percentage (percentage points).

    ``mae`` is NaN when no vehicle is labelled; ``by_class`` holds only classes that were
    labelled or predicted on some vehicle.
    """

    mae: float
    by_class: dict[str, float]
    vehicles: int


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int(np.count_nonzero(a | b))
    return int(np.count_nonzero(a & b)) / union if union else 0.0


def vehicle_errors(truth_masks: Sequence[np.ndarray], truth_classes: Sequence[str], pred_masks: Sequence[np.ndarray],
                   pred_classes: Sequence[str], vehicle_class: str = "vehicle",
                   match_iou: float = MATCH_IOU) -> list[VehicleError]:
    """Per labelled vehicle: labelled vs predicted damage percentage (rule in the module docstring).

    Example:
        >>> car = np.zeros((10, 10), bool); car[:, :5] = True       # 50 px vehicle
        >>> dent = np.zeros((10, 10), bool); dent[:2, :5] = True    # 10 px of it: 20 %
        >>> small = np.zeros((10, 10), bool); small[:1, :5] = True  # predicted 5 px: 10 %
        >>> [round(e.error, 1) for e in vehicle_errors([car, dent], ["vehicle", "dent"],
        ...                                            [car, small], ["vehicle", "dent"])]
        [10.0]
    """
    truth = damage_report(truth_masks, truth_classes, vehicle_class)
    pred = damage_report(pred_masks, pred_classes, vehicle_class)
    t_ms, p_ms = _check(truth_masks, truth_classes), _check(pred_masks, pred_classes)
    pairs = sorted(((_iou(t_ms[tv["id"]], p_ms[pv["id"]]), ti, pi) for ti, tv in enumerate(truth.vehicles)
                    for pi, pv in enumerate(pred.vehicles)), key=lambda x: (-x[0], x[1], x[2]))
    match: dict[int, int] = {}
    used: set[int] = set()
    for iou, ti, pi in pairs:
        if iou >= match_iou and ti not in match and pi not in used:
            match[ti] = pi
            used.add(pi)
    out = []
    for ti, tv in enumerate(truth.vehicles):
        pv = pred.vehicles[match[ti]] if ti in match else {"damage_percent": 0.0, "by_class": {}}
        classes = sorted(set(tv["by_class"]) | set(pv["by_class"]))
        out.append(VehicleError(tv["damage_percent"], pv["damage_percent"],
                                {c: (tv["by_class"].get(c, 0.0), pv["by_class"].get(c, 0.0)) for c in classes},
                                ti in match))
    return out


def mae_summary(errors: Sequence[VehicleError]) -> DamageMAE:
    """MAE over vehicles, and per class over the vehicles where the class is labelled or predicted.

    Example:
        >>> e = [VehicleError(20.0, 10.0, {"dent": (20.0, 10.0)}, True), VehicleError(0.0, 4.0, {"scratch": (0.0, 4.0)}, True)]
        >>> m = mae_summary(e); (m.mae, m.by_class, m.vehicles)
        (7.0, {'dent': 10.0, 'scratch': 4.0}, 2)
    """
    per_class: dict[str, list[float]] = {}
    for e in errors:
        for c, (t, p) in e.by_class.items():
            per_class.setdefault(c, []).append(abs(p - t))
    mae = float(np.mean([e.error for e in errors])) if errors else float("nan")
    return DamageMAE(mae, {c: float(np.mean(v)) for c, v in sorted(per_class.items())}, len(errors))
