"""The nightly's training data: ``data.source`` plus the labelled batches of ``data.batches``.

``build_union`` materialises their union as one YOLO-seg dataset under the state dir, so every
later step (skip-unchanged, the data gate, training, evaluation) reads one data.yaml whose
fingerprint covers every source:

* the folder is keyed by the sources' fingerprints in order (``union-<key>``): the same sources
  give the same folder, which is reused; any changed source gives a new one;
* files are hard links where the file system allows (copies elsewhere): no image is duplicated;
* per split, the base dataset's images keep their names; a batch adds its split's images (a
  batch from Label Studio has ``train`` only, so the val split, which the promotion gate compares
  candidate and production on, stays the base's);
* the same image name in two batches: the later batch wins (a re-review corrects an earlier one);
  a batch image named like a base image is an error (it would replace a base label silently).

``log_sources`` records the base and every batch as MLflow dataset inputs of the pipeline run
(the registered version's source run), so a version's lineage names the batches it learned from.

Example:
    >>> union = build_union(Path("base/data.yaml"), expand_batches([".state/reviewed"]), paths.datasets)
    >>> union.data_yaml, [s.name for s in union.sources]
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from damage.tasks.core.atomic import atomic_output_dir
from damage.tasks.core.errors import DatasetError
from damage.tasks.data.dataset import find_data_yaml, label_path, list_images, load_data_yaml
from damage.tasks.data.fingerprint import dataset_fingerprint
from damage.tasks.data.label_studio import batch_dirs

SOURCES_FILE = "sources.json"  # what the union was built from (not part of its fingerprint)


@dataclass(frozen=True)
class Source:
    """One dataset of the union."""

    name: str
    data_yaml: Path
    fingerprint: str
    kind: str  # "base" | "batch"


@dataclass(frozen=True)
class Union:
    """The union's data.yaml and what it was built from (base first)."""

    data_yaml: Path
    sources: list[Source]


def expand_batches(entries: list[str] | list[Path]) -> list[Path]:
    """``data.batches`` entries -> batch data.yaml files: a dataset folder / data.yaml is itself, a
    folder of batches (``damage data import``'s output) is every batch in it, oldest first.

    Raises:
        DatasetError: an entry that does not exist or holds no dataset (names the entry).
    """
    out: list[Path] = []
    for e in entries:
        p = Path(e).expanduser().resolve()
        if not p.exists():
            raise DatasetError(f"{p}: labelled batch not found (data.batches)")
        inner = batch_dirs(p) if p.is_dir() else []
        if inner:
            out += [find_data_yaml(d) for d in inner]
        elif p.is_dir() and not any(p.iterdir()):
            continue  # an empty batches folder: nothing reviewed yet
        else:
            out.append(find_data_yaml(p))
    return out


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed: copy
        shutil.copy2(src, dst)


def _split_files(info, split: str) -> list[tuple[str, Path]]:
    """(name inside the split folder, image path) of one split: a name relative to the split's folder."""
    files = []
    for src in info.splits.get(split, []):
        if not src.exists():
            raise DatasetError(f"{info.yaml_path}: {split} images not found at {src}")
        for im in list_images(src, info.root):
            rel = im.relative_to(src).as_posix() if src.is_dir() and im.is_relative_to(src) else im.name
            files.append((rel, im))
    return files


def union_key(sources: list[Source]) -> str:
    """The union folder's key: the sources' fingerprints, in order."""
    return hashlib.sha256("\n".join(f"{s.kind}:{s.fingerprint}" for s in sources).encode()).hexdigest()[:16]


def build_union(base_yaml: Path, batches: list[Path], datasets_root: Path) -> Union:
    """The union of the base dataset and ``batches`` (data.yaml files) as one YOLO-seg dataset.

    No batches: the base data.yaml itself (nothing is built or hashed).

    Raises:
        DatasetError: a batch whose class names differ from the base's, or that names an image
            like a base image (both named).
    """
    if not batches:
        return Union(Path(base_yaml), [])
    base = load_data_yaml(base_yaml)
    sources = [Source(base.root.name, Path(base_yaml), dataset_fingerprint(base.root), "base")]
    infos = []
    for b in batches:
        info = load_data_yaml(b, required=())
        if info.names != base.names:
            raise DatasetError(f"{info.yaml_path}: class names {info.names} differ from the base dataset's "
                               f"{base.names} ({base.yaml_path})")
        infos.append(info)
        sources.append(Source(info.root.name, info.yaml_path, dataset_fingerprint(info.root), "batch"))
    out = Path(datasets_root) / f"union-{union_key(sources)}"
    if (out / "data.yaml").is_file():
        return Union(out / "data.yaml", sources)
    splits = [s for s in ("train", "val", "test") if s in base.splits]
    with atomic_output_dir(out, overwrite=True) as tmp:
        for split in splits:
            files = {name: im for name, im in _split_files(base, split)}
            base_names = set(files)
            for info in infos:
                for name, im in _split_files(info, split):
                    if name in base_names:
                        raise DatasetError(f"{im}: a batch image named like the base image {files[name]}")
                    files[name] = im  # a later batch replaces an earlier one's image
            for name, im in sorted(files.items()):
                _link(im, tmp / "images" / split / name)
                lbl = label_path(im)
                if lbl.is_file():
                    _link(lbl, label_path(tmp / "images" / split / name))
        (tmp / "data.yaml").write_text(yaml.safe_dump(
            {"path": str(out), **{s: f"images/{s}" for s in splits}, "names": dict(enumerate(base.names))},
            sort_keys=False))
        (tmp / SOURCES_FILE).write_text(json.dumps([{**s.__dict__, "data_yaml": str(s.data_yaml)}
                                                    for s in sources], indent=1))
    return Union(out / "data.yaml", sources)


def log_sources(tracking_uri: str, run_id: str, sources: list[Source]) -> None:
    """Each source as an MLflow dataset input of ``run_id`` (context ``source`` / ``labelled-batch``)."""
    if not sources:
        return
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from damage.tasks.core import tracking
    from damage.tasks.data.mlflow_input import dataset_entity

    c = tracking.client(tracking_uri)
    inputs = [DatasetInput(dataset_entity(s.data_yaml, s.fingerprint, name=s.name),
                           tags=[InputTag(MLFLOW_DATASET_CONTEXT, "source" if s.kind == "base" else "labelled-batch")])
              for s in sources]
    c.log_inputs(run_id, datasets=inputs)
    tracking.set_tags(c, run_id, {"data.batches": ",".join(s.name for s in sources if s.kind == "batch")[:4000]})


def union_step(data_yaml: Path, batches: list[str], datasets_root: Path, tracking_uri: str, run_id: str) -> Path:
    """The nightly step: the union of ``data_yaml`` and ``data.batches``, its sources logged; its data.yaml."""
    union = build_union(data_yaml, expand_batches(batches), datasets_root)
    log_sources(tracking_uri, run_id, union.sources)
    return union.data_yaml
