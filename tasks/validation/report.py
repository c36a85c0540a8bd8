"""The cleaned copy of a validated dataset and its ``quarantine.json``.

The copy keeps the dataset's layout and leaves out every sample (image + label) that carries
an error-level finding, plus the second member of each duplicate group. It is built in a
temporary sibling directory and renamed into place, so a half-written copy is never visible.
The input is only read (with ``O_NOATIME`` where allowed), never written, moved or touched.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from damage.tasks.core.errors import DatasetError
from damage.tasks.validation.scan import Inventory, Layout, Sample, read_bytes

QUARANTINE = "quarantine.json"
# Codes whose file is the second member of a duplicate group: the cleaned copy leaves it out
# whatever its severity ("keep one of each duplicate group").
DUPLICATE_CODES = ("duplicate_image", "near_duplicate", "split_leakage")


def _copy(src: str, dst: Path) -> None:
    """Copy bytes only (no metadata): reading with O_NOATIME keeps the source's atime too."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(read_bytes(src))


def _safe_rel(rel: str) -> Path:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        raise DatasetError(f"cannot clean: '{rel}' lies outside the dataset root")
    return p


def plan_clean(inv: Inventory, report: dict[str, Any]) -> tuple[list[Sample], dict[str, dict]]:
    """Decide what the cleaned copy keeps. Returns (kept samples, {left-out file: why})."""
    by_file: dict[str, list[dict]] = defaultdict(list)
    for f in report["findings"]:
        by_file[f["file"]].append(f)

    def blocking(rel: str | None) -> list[dict]:
        if rel is None:
            return []
        return [f for f in by_file.get(rel, []) if f["severity"] == "error"
                or f["code"] in DUPLICATE_CODES]

    kept: list[Sample] = []
    left_out: dict[str, dict] = {}
    for s in inv.samples:
        why = blocking(s.image_rel) + blocking(s.label_rel if s.label_exists else None)
        if not why:
            kept.append(s)
            continue
        entry = {"split": s.split, "codes": sorted({f["code"] for f in why}),
                 "reasons": [f"{f['file']}: {f['code']}: {f['detail']}" for f in why]}
        left_out[s.image_rel] = dict(entry, kind="image")
        if s.label_exists:
            left_out[s.label_rel] = dict(entry, kind="label")
    for split, rel in inv.orphan_labels:
        why = by_file.get(rel, [])
        left_out[rel] = {"split": split, "kind": "label", "codes": sorted({f["code"] for f in why}) or ["orphan_label"],
                         "reasons": [f"{rel}: {f['code']}: {f['detail']}" for f in why]}
    for link in inv.outside_links:
        rel = link["file"]
        why = by_file.get(rel, [])
        left_out.setdefault(rel, {"split": link["split"], "kind": link["kind"], "codes": ["symlink_outside"],
                                  "reasons": [f"{rel}: {f['code']}: {f['detail']}" for f in why]})
        if link.get("label"):
            left_out.setdefault(link["label"], {"split": link["split"], "kind": "label", "codes": ["symlink_outside"],
                                                "reasons": [f"{rel}: image is a symlink out of the dataset"]})
    return kept, left_out


def _clean_yaml(layout: Layout, out: Path) -> dict:
    data = dict(layout.yaml)
    data["path"] = str(out)
    for split in layout.splits:
        rels = [Path(os.path.relpath(d, layout.root)).as_posix() for d in [*split.image_dirs, *split.image_lists]]
        data[split.name] = rels if isinstance(layout.yaml.get(split.name), list) else rels[0]
    data["names"] = {i: n for i, n in enumerate(layout.names)}
    return data


def _write_list(tmp: Path, layout: Layout, lst: Path, kept: list[Sample]) -> None:
    """The cleaned copy of one ``.txt`` image list: the kept images, each relative to the list's folder."""
    out = tmp / _safe_rel(Path(os.path.relpath(lst, layout.root)).as_posix())
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [Path(os.path.relpath(tmp / _safe_rel(s.image_rel), out.parent)).as_posix() for s in kept]
    out.write_text("".join(f"{ln}\n" for ln in lines), encoding="utf-8")


def write_clean_copy(layout: Layout, inv: Inventory, report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write the cleaned copy to ``out`` (atomically) and return (data.yaml, quarantine.json).

    An existing ``out`` is replaced only if it is an earlier cleaned copy (has quarantine.json)
    or empty; anything else is refused rather than deleted.

    Raises:
        DatasetError: ``out`` exists and is not an earlier cleaned copy (or empty).
    """
    from damage.tasks.core.atomic import atomic_output_dir, atomic_write_json
    from damage.tasks.data.fingerprint import dataset_fingerprint

    out = Path(os.path.abspath(out))
    kept, left_out = plan_clean(inv, report)
    with atomic_output_dir(out, replace_if=lambda p: (p / QUARANTINE).is_file()) as tmp:
        out = tmp.parent / out.name  # atomic_output_dir resolves symlinks in the parent
        labels = 0
        for s in kept:
            _copy(s.image, tmp / _safe_rel(s.image_rel))
            if s.label:
                _copy(s.label, tmp / _safe_rel(s.label_rel))
                labels += 1
        data_yaml = tmp / "data.yaml"
        data_yaml.write_text(yaml.safe_dump(_clean_yaml(layout, out), sort_keys=False, allow_unicode=True),
                             encoding="utf-8")
        for split in layout.splits:  # keep empty split dirs so data.yaml stays loadable
            for d in split.image_dirs:
                (tmp / _safe_rel(Path(os.path.relpath(d, layout.root)).as_posix())).mkdir(parents=True, exist_ok=True)
            for lst in split.image_lists:  # each list again, naming the images it kept (relative to itself)
                _write_list(tmp, layout, lst, [s for s in kept if s.list_file == str(lst)])
        quarantine = {
            "source": str(layout.root),
            "source_fingerprint": report["fingerprint"],
            "output": str(out),
            "fingerprint": dataset_fingerprint(tmp),
            "kept": {"images": len(kept), "labels": labels},
            "left_out": [dict(file=f, **v) for f, v in sorted(left_out.items())],
        }
        atomic_write_json(tmp / QUARANTINE, quarantine)
    return out / "data.yaml", out / QUARANTINE
