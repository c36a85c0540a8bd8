"""Planted label errors: how well does label-issue mining find errors we put there ourselves?

A copy of a labelled dataset gets four kinds of errors, at fixed rates and with a fixed seed, and
the miner's ranking is scored by **precision at K**, K = the number planted:

==================  ==========================================================================
kind                what is planted (default rate, of the annotation count)
==================  ==========================================================================
``missing_label``   an annotation is deleted (5 %)
``wrong_class``     an annotation's class is swapped for a random other class (5 %)
``bad_outline``     an outline is shrunk to 70 % about its centre and shifted by 30 % of its box
                    size along each axis, random signs (5 %)
``spurious_label``  a square box of a random damage class, placed at random inside the image,
                    its side that of a random damage annotation of the set (2 %)
==================  ==========================================================================

Per kind, the top K rows *of that kind* are counted; overall, the top sum(K) rows of any kind.
A row hits when it names a planted error of its own kind: the same image and annotation index
(in the label file as planted), or, for a missing label, a predicted box (``pred_box``) whose IoU
with the deleted annotation's box is at least ``MISSING_HIT_IOU`` (each deleted annotation counts
once, whatever the predicted class: the row shows the reviewer where the object is; boxes, so a
box-only method is judged by the same rule). A shuffled
ranking of the same rows is the control: it must stay far below the real one.

The vehicle-damage set comes from the project's generator (``damage.tasks.data.synth``), close-ups and
scenes mixed as in the demo. ``bench/bench_label_issues.py`` and the label-issue tests share this
module, so the figures in the bench and the test are the same measurement.

Example:
    >>> data_yaml = make_damage_set(Path("/tmp/li"), images=160, seed=2929)
    >>> planted = plant_errors(data_yaml, seed=1)
    >>> res = mine_label_issues(data_yaml, cfg, model="best.pt", trained_splits=())
    >>> precision_at_k(res.rows, planted)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from damage.tasks.core.atomic import atomic_write_text
from damage.tasks.core.errors import DatasetError

KINDS = ("missing_label", "wrong_class", "bad_outline", "spurious_label")
RATES = {"missing_label": 0.05, "wrong_class": 0.05, "bad_outline": 0.05, "spurious_label": 0.02}
MISSING_HIT_IOU = 0.3
SHIFT, SHRINK = 0.3, 0.7


@dataclass
class Planted:
    """What ``plant_errors`` did.

    Attributes:
        keys: kind -> set of (image path relative to the dataset root, annotation index in the
            planted label file); empty for ``missing_label`` (see ``deleted``).
        deleted: (image rel path, class id, polygon in image pixels, (h, w)) per deleted annotation.
        annotations: annotation count before planting.
    """

    keys: dict[str, set[tuple[str, int]]] = field(default_factory=lambda: {k: set() for k in KINDS})
    deleted: list[tuple[str, int, np.ndarray, tuple[int, int]]] = field(default_factory=list)
    annotations: int = 0

    def counts(self) -> dict[str, int]:
        return {k: (len(self.deleted) if k == "missing_label" else len(self.keys[k])) for k in KINDS}


def make_damage_set(out: Path, images: int = 160, seed: int = 2929, imgsz: int = 160,
                    closeup_fraction: float = 0.65) -> Path:
    """A fresh synthetic vehicle-damage set (the demo's mix of close-ups and scenes); its data.yaml."""
    from damage.tasks.data.synth import generate_dataset

    return generate_dataset(Path(out), images=images, seed=seed, imgsz=imgsz, val_fraction=0.5,
                            closeup_fraction=closeup_fraction)


def _read_labels(path: Path, w: int, h: int) -> list[tuple[int, np.ndarray]]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        v = line.split()
        if not v:
            continue
        if len(v) < 7 or len(v) % 2 == 0:
            raise DatasetError(f"{path}:{n}: not a YOLO-seg polygon line")
        out.append((int(v[0]), np.array(v[1:], float).reshape(-1, 2) * (w, h)))
    return out


def _line(c: int, poly: np.ndarray, w: int, h: int) -> str:
    xy = (np.clip(poly, 0, (w, h)) / (w, h)).ravel()
    return f"{c} " + " ".join(f"{v:.6f}" for v in xy)


def plant_errors(data_yaml: str | Path, seed: int, rates: dict[str, float] | None = None,
                 damage_classes: tuple[int, ...] | None = None) -> Planted:
    """Rewrite the label files of ``data_yaml`` (every split) with planted errors, in place.

    Run it on a copy: the dataset is changed. Deleted, swapped and re-outlined annotations are
    drawn without overlap from all annotations (vehicles too); spurious boxes take a damage class
    (``damage_classes``; default every class but ``vehicle``).

    Raises:
        DatasetError: unreadable labels or fewer annotations than the rates need.
    """
    from damage.tasks.core.config import CLASSES
    from damage.tasks.data.dataset import label_path, load_data_yaml, split_images

    rates = {**RATES, **(rates or {})}
    info = load_data_yaml(data_yaml)
    root = Path(info.root).resolve()
    dmg = damage_classes or tuple(i for i, n in enumerate(info.names) if n != "vehicle" and n in CLASSES)
    rng = np.random.default_rng(seed)
    files: list[tuple[str, Path, int, int, list[tuple[int, np.ndarray]]]] = []
    for split in ("train", "val"):
        for img in split_images(data_yaml, split):
            h, w = cv2.imread(str(img), cv2.IMREAD_UNCHANGED).shape[:2]
            lbl = label_path(img)
            files.append((Path(img).resolve().relative_to(root).as_posix(), lbl, w, h,
                          _read_labels(lbl, w, h) if lbl.is_file() else []))
    objs = [(f, k) for f in range(len(files)) for k in range(len(files[f][4]))]
    n = len(objs)
    q = {kind: round(rates[kind] * n) for kind in KINDS}
    if sum(q[k] for k in KINDS[:3]) > n or q["spurious_label"] > len(files):
        raise DatasetError(f"{data_yaml}: {n} annotations are too few for the planted rates {rates}")
    order = rng.permutation(n)
    cut = np.cumsum([0, q["missing_label"], q["wrong_class"], q["bad_outline"]])
    pick = {kind: {objs[i] for i in order[cut[j]:cut[j + 1]]} for j, kind in enumerate(KINDS[:3])}
    sides = [np.sqrt(cv2.contourArea(p.astype(np.float32))) for _, _, _, _, a in files for c, p in a if c in dmg]
    spurious_files = set(rng.choice(len(files), q["spurious_label"], replace=False).tolist())
    planted = Planted(annotations=n)
    for f, (rel, lbl, w, h, anns) in enumerate(files):
        lines = []
        for k, (c, poly) in enumerate(anns):
            if (f, k) in pick["missing_label"]:
                planted.deleted.append((rel, c, poly, (h, w)))
                continue
            if (f, k) in pick["wrong_class"]:
                c = int((c + rng.integers(1, len(info.names))) % len(info.names))
                planted.keys["wrong_class"].add((rel, len(lines)))
            elif (f, k) in pick["bad_outline"]:
                size = poly.max(0) - poly.min(0)
                centre = (poly.max(0) + poly.min(0)) / 2
                poly = centre + SHRINK * (poly - centre) + SHIFT * size * rng.choice([-1, 1], 2)
                planted.keys["bad_outline"].add((rel, len(lines)))
            lines.append(_line(c, poly, w, h))
        if f in spurious_files:
            s = float(np.clip(rng.choice(sides) if sides else 0.1 * min(w, h), 4, min(w, h) - 2))
            x, y = rng.uniform(0, w - s), rng.uniform(0, h - s)
            planted.keys["spurious_label"].add((rel, len(lines)))
            lines.append(_line(int(rng.choice(dmg)), np.array([[x, y], [x + s, y], [x + s, y + s], [x, y + s]]),
                               w, h))
        atomic_write_text(lbl, "".join(x + "\n" for x in lines))
    for cache in root.rglob("*.cache"):  # Ultralytics' label caches describe the old labels
        cache.unlink()
    return planted


def _box(value: Any) -> np.ndarray | None:
    if isinstance(value, str):
        value = json.loads(value) if value else None
    return np.asarray(value, float).reshape(4) if value is not None and len(value) == 4 else None


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def hits(rows: list[dict[str, Any]], planted: Planted) -> list[bool]:
    """Per row: does it name a planted error of its own kind (see the module docstring)?
    A deleted annotation is found once; later rows pointing at it are not hits."""
    deleted: dict[str, list[int]] = {}
    for i, (rel, _, _, _) in enumerate(planted.deleted):
        deleted.setdefault(rel, []).append(i)
    found: set[int] = set()
    out = []
    for r in rows:
        kind = r["kind"]
        if kind != "missing_label":
            out.append((r["image"], int(r["annotation"])) in planted.keys[kind])
            continue
        hit = False
        pred = _box(r.get("pred_box"))
        for i in deleted.get(r["image"], []) if pred is not None else []:
            poly = planted.deleted[i][2]
            if i not in found and _box_iou(pred, np.r_[poly.min(0), poly.max(0)]) >= MISSING_HIT_IOU:
                found.add(i)
                hit = True
                break
        out.append(hit)
    return out


def precision_at_k(rows: list[dict[str, Any]], planted: Planted) -> dict[str, float]:
    """Per kind: hits among that kind's top K_kind rows; ``overall``: among the top sum(K) rows."""
    counts = planted.counts()
    out = {}
    for kind in KINDS:
        top = [r for r in rows if r["kind"] == kind][:counts[kind]]
        out[kind] = sum(hits(top, planted)) / counts[kind] if counts[kind] else float("nan")
    total = sum(counts.values())
    out["overall"] = sum(hits(rows[:total], planted)) / total if total else float("nan")
    return out


def shuffled_control(rows: list[dict[str, Any]], planted: Planted, seed: int = 0) -> dict[str, float]:
    """``precision_at_k`` of the same rows in a random order (what ranking by chance gives)."""
    order = np.random.default_rng(seed).permutation(len(rows))
    return precision_at_k([rows[i] for i in order], planted)


def format_table(p: dict[str, float], counts: dict[str, int], control: dict[str, float] | None = None) -> str:
    """Markdown table: kind, planted, precision at K (and the shuffled control)."""
    head = "| kind | planted | precision at K |" + (" shuffled |" if control else "")
    lines = [head, "|---|---|---|" + ("---|" if control else "")]
    for kind in (*KINDS, "overall"):
        k = sum(counts.values()) if kind == "overall" else counts[kind]
        lines.append(f"| {kind} | {k} | {p[kind]:.2f} |" + (f" {control[kind]:.2f} |" if control else ""))
    return "\n".join(lines)


__all__ = ["KINDS", "MISSING_HIT_IOU", "RATES", "Planted", "format_table", "hits", "make_damage_set", "plant_errors",
           "precision_at_k", "shuffled_control"]
