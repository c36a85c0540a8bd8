"""Importing datasets into the YOLO-seg layout the pipeline trains on.

``import_dataset``: an Ultralytics YOLO-seg folder or a COCO instance-segmentation JSON (polygons or RLE, e.g.
CarDD) into a new YOLO-seg folder, with an explicit class mapping; every referenced image must resolve inside the
dataset (or ``images_dir``) and pass the pixel limit; the output is written to a temp folder, then renamed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from damage.tasks.core.atomic import atomic_output_dir
from damage.tasks.core.config import CLASSES
from damage.tasks.core.errors import DamageError, DatasetError
from damage.tasks.core.images import DEFAULT_MAX_PIXELS, check_image_file
from damage.tasks.data.dataset import (
    DATA_YAML_NAMES,
    IMAGE_EXTS,
    find_data_yaml,
    label_path,
    list_images,
    load_data_yaml,
)

IGNORE = "-"  # class_map target meaning "drop this source class on purpose"


def normalize_name(name: str) -> str:
    """Class-name key for matching: lower case, spaces/hyphens/underscores -> one underscore."""
    return re.sub(r"[\s_\-]+", "_", str(name).strip().lower())


@dataclass
class ImportReport:
    """What ``import_dataset`` wrote (or would have written) and what it could not map.

    Attributes:
        out: output folder. data_yaml: its data.yaml. format: "yolo" or "coco".
        images: split -> images written. instances: target class -> instances written.
        unknown: source class name -> instances with no target class (skipped if allowed).
        ignored: source class name -> instances dropped on purpose (class_map target "-").
        rle_converted: RLE masks converted to polygons. merged_segments: instances whose
        several polygons were joined into one. dropped_empty: annotations with no usable shape.
        mapping: source class name -> target class name (or "-"). images_dir: the COCO images folder used.
    """

    out: Path
    data_yaml: Path
    format: str
    images: dict[str, int] = field(default_factory=dict)
    instances: dict[str, int] = field(default_factory=dict)
    unknown: dict[str, int] = field(default_factory=dict)
    ignored: dict[str, int] = field(default_factory=dict)
    rle_converted: int = 0
    merged_segments: int = 0
    dropped_empty: int = 0
    images_dir: Path | None = None
    mapping: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # referenced path -> why it was not imported

    def summary(self) -> list[str]:
        """Human-readable lines for the CLI."""
        lines = [f"imported {self.format} dataset -> {self.out}",
                 "images: " + ", ".join(f"{k}={v}" for k, v in self.images.items()),
                 "instances: " + (", ".join(f"{k}={v}" for k, v in self.instances.items() if v) or "none"),
                 "class mapping: " + ", ".join(f"{k} -> {v}" for k, v in self.mapping.items())]
        if self.rle_converted:
            lines.append(f"RLE masks converted to polygons: {self.rle_converted}")
        if self.merged_segments:
            lines.append(f"multi-part instances joined into one polygon: {self.merged_segments}")
        if self.dropped_empty:
            lines.append(f"annotations without a usable shape dropped: {self.dropped_empty}")
        if self.ignored:
            lines.append("ignored (mapped to '-'): " + _fmt_counts(self.ignored))
        if self.unknown:
            lines.append("unknown classes SKIPPED: " + _fmt_counts(self.unknown))
        if self.refused:
            lines.append(f"REFUSED (not imported): {len(self.refused)} reference(s): "
                         + "; ".join(f"{k}: {v}" for k, v in list(self.refused.items())[:10])
                         + (" ..." if len(self.refused) > 10 else ""))
        lines.append(f"data.yaml: {self.data_yaml}")
        return lines


class UnknownClassesError(DatasetError):
    """Source classes with no target class; ``report`` holds the counts. Nothing was written."""

    def __init__(self, src: Path, report: ImportReport):
        self.report = report
        super().__init__(
            f"{src}: {len(report.unknown)} source class(es) not in the target classes: "
            f"{_fmt_counts(report.unknown)}; map them with --map SRC=DST (or SRC=- to drop) "
            "or pass --allow-unknown to skip them")


def _fmt_counts(d: dict[str, int]) -> str:
    return ", ".join(f"'{k}' ({v} instances)" for k, v in d.items())


def _resolve_mapping(source_names: list[str], class_map: dict[str, str] | None,
                     classes: list[str]) -> dict[str, int | None | str]:
    """Source name -> target id, IGNORE, or None (unknown). Explicit map first, then same name."""
    target = {normalize_name(c): i for i, c in enumerate(classes)}
    explicit = {}
    for k, v in (class_map or {}).items():
        v = str(v).strip()
        if v in (IGNORE, ""):
            explicit[normalize_name(k)] = IGNORE
        elif normalize_name(v) in target:
            explicit[normalize_name(k)] = target[normalize_name(v)]
        else:
            raise DatasetError(f"class map '{k}={v}': target '{v}' is not one of the classes ({', '.join(classes)})")
    unused = set(explicit) - {normalize_name(n) for n in source_names}
    if unused:
        raise DatasetError(f"class map names source class(es) {', '.join(sorted(unused))} that the dataset does "
                           f"not have (it has: {', '.join(sorted(set(source_names)))})")
    out: dict[str, int | None | str] = {}
    for n in source_names:
        key = normalize_name(n)
        out[n] = explicit[key] if key in explicit else target.get(key)
    return out


def _split_indices(n: int, val_fraction: float, seed: int) -> set[int]:
    """Indices that go to val: a seeded permutation, at least one each side when n >= 2."""
    if not 0 < val_fraction < 1:
        raise DatasetError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if n < 2:
        return set()
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return set(np.random.default_rng([seed, 104729]).permutation(n)[:n_val].tolist())


def _fmt_poly(cls: int, xy: np.ndarray) -> str:
    return f"{cls} " + " ".join(f"{v:.6f}" for v in np.clip(xy, 0.0, 1.0).reshape(-1))


def _refuse_reference(ref: str, path: Path, root: Path, max_pixels: int) -> str | None:
    """Why the image ``ref`` (resolved: ``path``) must not be imported, or None when it may.

    Every referenced file must resolve (symlinks included) inside ``root`` - the dataset root, or
    the COCO images folder - carry an image extension, and declare at most ``max_pixels`` pixels
    in its header. ``../../secret``, ``/etc/hostname`` or a list entry pointing elsewhere is a
    finding, never a copy.
    """
    real = path.resolve()
    if not real.is_relative_to(root.resolve()):
        return f"resolves outside {root}"
    if real.suffix.lower() not in IMAGE_EXTS:
        return f"not an image file extension ({real.suffix or 'none'})"
    if not real.exists():
        return None  # a missing image inside the dataset stays the caller's "not found" error
    if not real.is_file():
        return "not a regular file"
    try:
        check_image_file(real, max_pixels)
    except DamageError as e:
        return str(e).replace(f"{real}: ", "")
    return None


def _unique_name(name: str, used: set[str]) -> str:
    stem, suf = os.path.splitext(name)
    cand, k = name, 1
    while cand.lower() in used:
        cand, k = f"{stem}_{k}{suf}", k + 1
    used.add(cand.lower())
    return cand


# --- YOLO source


def _import_yolo(src_yaml: Path, tmp: Path | None, classes: list[str], class_map, val_fraction, seed,
                 report: ImportReport, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Plan (tmp=None: count only) or write the import of a YOLO dataset."""
    info = load_data_yaml(src_yaml)
    mapping = _resolve_mapping(info.names, class_map, classes)
    report.mapping = {n: (classes[t] if isinstance(t, int) else (IGNORE if t == IGNORE else "?")) for n, t in mapping.items()}
    by_id = [mapping[n] for n in info.names]
    items: list[tuple[str, Path]] = []
    for split, sources in info.splits.items():
        for s in sources:
            if not s.exists():
                raise DatasetError(f"{info.yaml_path}: {split} split {s} not found")
            for p in list_images(s):
                why = _refuse_reference(str(p), Path(p), info.root, max_pixels)
                if why is None:
                    lbl = label_path(Path(p))
                    if lbl.exists() and not lbl.resolve().is_relative_to(info.root.resolve()):
                        why = f"its label {lbl} resolves outside {info.root}"
                if why is not None:
                    report.refused[str(p)] = why
                    continue
                items.append((split, p))
    if not items:
        raise DatasetError(f"{info.yaml_path}: no importable images found in any split"
                           + (f" ({len(report.refused)} refused, e.g. {next(iter(report.refused.items()))})"
                              if report.refused else ""))
    # same image listed for train and val (a common quick-start yaml): split it ourselves
    if {p for sp, p in items if sp == "train"} == {p for sp, p in items if sp == "val"}:
        imgs = sorted({p for _, p in items})
        val = _split_indices(len(imgs), val_fraction, seed)
        items = [("val" if i in val else "train", p) for i, p in enumerate(imgs)]
    counts: Counter = Counter()
    unknown: Counter = Counter()
    ignored: Counter = Counter()
    used: dict[str, set[str]] = {}
    images: Counter = Counter()
    from damage.tasks.core.progress import iterate

    for split, img in iterate(items, "import", "import: images", artifact_every=64):
        lines = []
        lbl = label_path(img)
        if lbl.is_file():
            for n, line in enumerate(lbl.read_text().splitlines(), 1):
                parts = line.split()
                if not parts:
                    continue
                try:
                    cid = int(float(parts[0]))
                    vals = [float(v) for v in parts[1:]]
                except ValueError:
                    raise DatasetError(f"{lbl} line {n}: not numbers") from None
                if not 0 <= cid < len(by_id):
                    raise DatasetError(f"{lbl}: class id {cid} not in data.yaml names ({len(by_id)} classes)")
                t = by_id[cid]
                if t is None:
                    unknown[info.names[cid]] += 1
                    continue
                if t == IGNORE:
                    ignored[info.names[cid]] += 1
                    continue
                counts[t] += 1
                lines.append(f"{t} " + " ".join(parts[1:]) if vals else f"{t}")
        images[split] += 1
        if tmp is not None:
            name = _unique_name(img.name, used.setdefault(split, set()))
            shutil.copyfile(img, tmp / "images" / split / name)
            (tmp / "labels" / split / Path(name).with_suffix(".txt")).write_text(
                "\n".join(lines) + ("\n" if lines else ""))
    report.images = dict(images)
    report.instances = {c: counts.get(i, 0) for i, c in enumerate(classes)}
    report.unknown = dict(unknown)
    report.ignored = dict(ignored)


# --- COCO source


def _find_images_dir(js: Path, first_file: str | None, images_dir: Path | None) -> Path:
    if images_dir is not None:
        images_dir = Path(images_dir).expanduser()
        if not images_dir.is_dir():
            raise DatasetError(f"{images_dir}: images folder not found")
        return images_dir
    cands = [js.parent, js.parent / "images", js.parent.parent / "images"]
    stem = js.stem
    if stem.startswith("instances_"):  # COCO/CarDD: annotations/instances_train2017.json + train2017/
        split_dir = stem[len("instances_"):]
        cands += [js.parent.parent / split_dir, js.parent.parent / "images" / split_dir, js.parent / split_dir]
    cands.append(js.parent.parent)
    if first_file is None:
        return js.parent
    for c in cands:
        if (c / first_file).is_file():
            return c
    raise DatasetError(f"{js}: cannot find the image folder for '{first_file}' "
                       f"(looked in {', '.join(str(c) for c in cands)}); pass --images-dir")


def _rle_to_polygons(seg, h: int, w: int) -> list[np.ndarray]:
    """RLE (compressed or uncompressed) -> outer contours in pixel coordinates."""
    import cv2
    from pycocotools import mask as mask_utils

    if isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        counts = seg["counts"]
        rle = {"size": seg["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
    with warnings.catch_warnings():  # pycocotools' numpy-2 "copy keyword" deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        m = mask_utils.decode(rle)
    if m.ndim == 3:
        m = m.max(axis=2)
    cnts, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1, 2).astype(np.float64) for c in cnts if len(c) >= 3]


def merge_segments(segments: list[np.ndarray]) -> np.ndarray:
    """Join several polygons of one instance into one (YOLO-seg has one polygon per instance).

    Ultralytics' own ``merge_multi_segment`` (thin two-way bridges between nearest points), so
    imported COCO labels match what Ultralytics' converter writes; ``cv2.fillPoly`` of the result
    covers every part. Ultralytics is imported only for multi-part instances.
    """
    segs = [np.asarray(s, dtype=np.float64).reshape(-1, 2) for s in segments]
    if len(segs) == 1:  # merge_multi_segment needs two or more
        return segs[0]
    from ultralytics.data.converter import merge_multi_segment

    return np.concatenate(merge_multi_segment(segs), axis=0)


def _coco_instance(ann: dict, h: int, w: int, report: ImportReport) -> np.ndarray | None:
    """One COCO annotation -> one normalised (N, 2) polygon, or None if it has no usable shape."""
    seg = ann.get("segmentation")
    polys: list[np.ndarray] = []
    if isinstance(seg, list):
        polys = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in seg
                 if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
    elif isinstance(seg, dict) and "counts" in seg:
        polys = _rle_to_polygons(seg, h, w)
        report.rle_converted += 1
    if not polys:
        return None
    if len(polys) > 1:
        report.merged_segments += 1
    xy = merge_segments(polys)
    return xy / np.array([w, h], dtype=np.float64)


def _load_coco(js: Path) -> dict:
    try:
        data = json.loads(js.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{js}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{js}: not valid JSON: {e}") from None
    if not isinstance(data, dict) or not all(k in data for k in ("images", "annotations", "categories")):
        raise DatasetError(f"{js}: not a COCO instances file (needs 'images', 'annotations', 'categories')")
    return data


def _safe_name(name: str) -> bool:
    """A relative file name without '..' (used to pick the file that locates the images folder)."""
    parts = name.replace("\\", "/").split("/")
    return bool(name) and not os.path.isabs(name) and ".." not in parts and ":" not in parts[0]


def _import_coco(js: Path, images_dir: Path | None, tmp: Path | None, classes: list[str], class_map,
                 val_fraction, seed, report: ImportReport, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Plan (tmp=None: count and check only) or write the import of a COCO instances JSON."""
    data = _load_coco(js)
    cats = {int(c["id"]): str(c["name"]) for c in data["categories"]}
    mapping = _resolve_mapping(sorted(set(cats.values()), key=list(cats.values()).index), class_map, classes)
    report.mapping = {n: (classes[t] if isinstance(t, int) else (IGNORE if t == IGNORE else "?")) for n, t in mapping.items()}
    imgs = sorted(data["images"], key=lambda im: (str(im["file_name"]), int(im["id"])))
    first = next((str(im["file_name"]) for im in imgs if _safe_name(str(im["file_name"]))), None)
    img_dir = report.images_dir = _find_images_dir(js, first, images_dir)
    refused: set[int] = set()
    for im in imgs:
        why = _refuse_reference(str(im["file_name"]), img_dir / str(im["file_name"]), img_dir, max_pixels)
        if why is not None:
            report.refused[str(im["file_name"])] = why
            refused.add(int(im["id"]))
    imgs = [im for im in imgs if int(im["id"]) not in refused]
    anns: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        anns.setdefault(int(a["image_id"]), []).append(a)
    val = _split_indices(len(imgs), val_fraction, seed)
    counts: Counter = Counter()
    unknown: Counter = Counter()
    ignored: Counter = Counter()
    images: Counter = Counter()
    used: dict[str, set[str]] = {}
    from damage.tasks.core.progress import iterate

    for i, im in iterate(list(enumerate(imgs)), "import", "import: images", artifact_every=64):
        split = "val" if i in val else "train"
        path = img_dir / str(im["file_name"])
        if not path.is_file():
            raise DatasetError(f"{js}: image '{im['file_name']}' not found in {img_dir}")
        # the real size from the file's header, not the JSON's claim: RLE sizes are checked against it
        w, h = check_image_file(path, max_pixels)
        if (int(im.get("height", h)), int(im.get("width", w))) != (h, w):
            raise DatasetError(f"{js}: image '{im['file_name']}' is {w}x{h} but the JSON says "
                               f"{im.get('width')}x{im.get('height')}")
        lines = []
        for a in anns.get(int(im["id"]), []):
            name = cats.get(int(a["category_id"]))
            if name is None:
                raise DatasetError(f"{js}: annotation {a.get('id')} has category_id {a['category_id']} "
                                   "not in 'categories'")
            t = mapping[name]
            if t is None:
                unknown[name] += 1
                continue
            if t == IGNORE:
                ignored[name] += 1
                continue
            seg = a.get("segmentation")
            if isinstance(seg, dict) and [int(v) for v in seg.get("size", [])[:2]] != [h, w]:
                raise DatasetError(f"{js}: annotation {a.get('id')} of '{im['file_name']}': RLE size "
                                   f"{seg.get('size')} does not match the image's {h}x{w} (height x width); "
                                   f"refused before decoding")
            xy = _coco_instance(a, h, w, report)
            if xy is None:
                report.dropped_empty += 1
                continue
            counts[t] += 1
            lines.append(_fmt_poly(t, xy))
        images[split] += 1
        if tmp is not None:
            name = _unique_name(Path(str(im["file_name"])).name, used.setdefault(split, set()))
            shutil.copyfile(path, tmp / "images" / split / name)
            (tmp / "labels" / split / Path(name).with_suffix(".txt")).write_text(
                "\n".join(lines) + ("\n" if lines else ""))
    if not imgs:
        raise DatasetError(f"{js}: no importable images listed"
                           + (f" ({len(report.refused)} refused, e.g. {next(iter(report.refused.items()))})"
                              if report.refused else ""))
    report.images = dict(images)
    report.instances = {c: counts.get(i, 0) for i, c in enumerate(classes)}
    report.unknown = dict(unknown)
    report.ignored = dict(ignored)


def import_dataset(src: Path, out: Path, class_map: dict[str, str] | None = None,
                   classes: list[str] | None = None, val_fraction: float = 0.2, seed: int = 0,
                   images_dir: Path | None = None, allow_unknown: bool = False,
                   overwrite: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImportReport:
    """Import a YOLO-seg folder or a COCO instance-segmentation JSON into ``out`` (YOLO-seg).

    Source class names are matched to ``classes`` by normalised name (case, spaces, hyphens and
    underscores do not matter: CarDD's "glass shatter" -> ``glass_shatter``); ``class_map``
    renames first (``{"car": "vehicle", "person": "-"}``, "-" drops a class on purpose).
    COCO polygons are kept (several parts joined into one polygon), RLE masks are converted to
    polygons. A COCO JSON is split into train/val by ``val_fraction`` with ``seed``; a YOLO
    folder keeps its splits.

    Args:
        src: YOLO dataset folder or data.yaml, or a COCO ``instances*.json``. out: output folder (new or empty).
        class_map: source name -> target name (or "-").
        classes: target class names in id order; None = ``damage.tasks.core.config.CLASSES``.
        val_fraction: val share when the import makes the split. seed: split seed.
        images_dir: COCO image folder; None = search beside the JSON (``images/``, CarDD's ``train2017/``).
        allow_unknown: skip (and report) unknown source classes instead of refusing.
        overwrite: replace a non-empty ``out`` (never one that holds the source or its images).
        max_pixels: largest image (width x height, from its header) that is imported.

    Returns: ImportReport (counts per split and class, unknown/ignored classes, conversions).

    Raises:
        UnknownClassesError: unknown classes and not ``allow_unknown`` (nothing written).
        DatasetError: missing or invalid source, bad class map, ``out`` not empty.
    """
    src = Path(src).expanduser().resolve()
    out = Path(out).expanduser().resolve()
    classes = list(classes or CLASSES)
    if not src.exists():
        raise DatasetError(f"{src}: source not found")
    if out == src or src in out.parents:
        raise DatasetError(f"{out}: output must not be inside the source {src} (the source is never modified)")
    def guard(what: str, p: Path) -> None:  # replacing `out` must never delete the source, its images or their folder
        if out == p or out in p.parents:
            raise DatasetError(f"{out}: output folder is or contains the {what} {p}; choose an output outside it "
                               f"(--overwrite would delete it)")
    guard("source", src)
    if images_dir:
        guard("images folder", Path(images_dir).expanduser().resolve())
    if out.exists() and out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DatasetError(f"{out}: output folder exists and is not empty (choose a new folder or --overwrite)")
    is_coco = src.is_file() and src.suffix.lower() == ".json"
    if src.is_dir() and not any((src / n).is_file() for n in DATA_YAML_NAMES):
        raise DatasetError(f"{src}: no data.yaml in this folder (for COCO data pass the annotations .json file)")
    fmt = "coco" if is_coco else "yolo"
    report = ImportReport(out=out, data_yaml=out / "data.yaml", format=fmt)

    def run(tmp: Path | None) -> None:
        report.rle_converted = report.merged_segments = report.dropped_empty = 0
        report.refused = {}
        if is_coco:
            _import_coco(src, images_dir, tmp, classes, class_map, val_fraction, seed, report, max_pixels)
        else:
            _import_yolo(find_data_yaml(src), tmp, classes, class_map, val_fraction, seed, report, max_pixels)

    run(None)  # dry pass: every check and the unknown-class count before anything is written
    if report.images_dir is not None:  # the images folder found beside a COCO JSON is guarded too (issue 31)
        guard("images folder", Path(report.images_dir).resolve())
    if report.unknown and not allow_unknown:
        raise UnknownClassesError(src, report)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        for split in report.images:
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "labels" / split).mkdir(parents=True)
        run(tmp)
        splits = {s: f"images/{s}" for s in report.images}
        if "val" not in splits:  # Ultralytics needs a val split; a train-only source validates on train
            splits["val"] = splits["train"]
        data = {"path": str(out), **splits, "names": dict(enumerate(classes))}
        (tmp / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        (tmp / "import_report.json").write_text(json.dumps(
            {"source": str(src), "format": fmt, "images": report.images, "instances": report.instances,
             "unknown": report.unknown, "ignored": report.ignored, "mapping": report.mapping,
             "rle_converted": report.rle_converted, "merged_segments": report.merged_segments,
             "dropped_empty": report.dropped_empty, "refused": report.refused}, indent=2) + "\n")
    return report
