"""Reading and checking YOLO-seg datasets: the one data.yaml reader (importing is ``tasks.data.importer``).

* ``load_data_yaml`` / ``check_structure``: what the nightly flow's data step calls before
  training (data.yaml readable, splits present and non-empty, labels consistent with names).
* ``import_dataset``: an Ultralytics YOLO-seg folder or a COCO instance-segmentation JSON
  (polygons, compressed or uncompressed RLE) -> the YOLO-seg layout the pipeline reads, with an
  explicit class-name mapping. Unknown source classes are reported, never dropped silently.

Everything writes atomically (temp folder beside the output, then rename); sources are only read.
No torch or prefect imports here (Ultralytics only to merge multi-part polygons).

Example:
    >>> report = import_dataset(Path("CarDD_COCO/annotations/instances_train2017.json"), Path("data/cardd"))
    >>> print(report.summary())
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from damage.tasks.core.errors import DatasetError
from damage.tasks.data.root_check import check_dataset_paths

# The image suffixes every reader of the project accepts (Ultralytics' common ones).
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
DATA_YAML_NAMES = ("data.yaml", "dataset.yaml")
SPLITS = ("train", "val", "test")


# ----------------------------------------------------------------------------- reading


@dataclass
class DatasetInfo:
    """A YOLO dataset as described by its data.yaml.

    Attributes:
        yaml_path: the data.yaml file.
        root: dataset root (``path:`` resolved; default the yaml's folder).
        names: class names in id order.
        splits: split name -> image sources (folders, list files or image files).
        images: split -> number of images (filled by ``check_structure``).
        instances: class name -> number of labelled instances (filled by ``check_structure``).
        raw: the parsed YAML as written.
    """

    yaml_path: Path
    root: Path
    names: list[str]
    splits: dict[str, list[Path]]
    images: dict[str, int] = field(default_factory=dict)
    instances: dict[str, int] = field(default_factory=dict)
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def nc(self) -> int:
        return len(self.names)


def find_data_yaml(path: Path) -> Path:
    """The data.yaml of ``path``: the file itself, else ``data.yaml`` / ``dataset.yaml`` (or the
    only ``*.yaml``) inside the folder.

    Raises:
        DatasetError: no such path, a file that is not YAML, or a folder without a data.yaml.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        for n in DATA_YAML_NAMES:
            if (path / n).is_file():
                return path / n
        yamls = sorted(path.glob("*.yaml")) + sorted(path.glob("*.yml"))
        if len(yamls) == 1:
            return yamls[0]
        raise DatasetError(f"{path}: no data.yaml in this folder")
    if not path.exists():
        raise DatasetError(f"{path}: not found")
    if path.suffix.lower() not in {".yaml", ".yml"}:
        raise DatasetError(f"{path}: not a dataset (expected a folder or its data.yaml)")
    return path


def _parse_names(raw: dict, yaml_path: Path) -> list[str]:
    if "names" not in raw:
        nc = raw.get("nc")
        if isinstance(nc, int) and nc > 0:  # Ultralytics accepts nc alone: classes are named by id
            return [str(i) for i in range(nc)]
        raise DatasetError(f"{yaml_path}: no 'names' key (class names)")
    names = raw["names"]
    if isinstance(names, list):
        return [str(n) for n in names]
    if isinstance(names, dict):
        try:
            ids = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            raise DatasetError(f"{yaml_path}: 'names' keys must be class ids 0..N-1") from None
        if ids != list(range(len(ids))):
            raise DatasetError(f"{yaml_path}: 'names' ids must be 0..{len(ids) - 1} without gaps, got {', '.join(map(str, ids))}")
        return [str(names[k] if k in names else names[str(k)]) for k in ids]
    raise DatasetError(f"{yaml_path}: 'names' must be a list or a mapping id -> name")


def load_data_yaml(path: str | Path, required: tuple[str, ...] = ("train", "val")) -> DatasetInfo:
    """Read an Ultralytics data.yaml (file or the folder holding it): the project's one reader.

    Rules (the same for every caller: training, the data gate, quantization, explain, import):

    * Root: ``path:`` if absolute; a relative ``path:`` is resolved against the yaml's folder,
      and if no such folder exists the yaml's folder is the root (Ultralytics would look in its
      own datasets dir, which a dataset handed to us directly does not use). No ``path:``: the
      yaml's folder.
    * Splits (``train``/``val``/``test``): a folder, a ``.txt`` list of images, or a list of
      either, relative to the root. A list file's relative lines are relative to the list's own
      folder (Ultralytics' rule for ``./`` lines), and must resolve inside the root; see
      ``list_images``.
    * Classes: ``names`` as a list or an ``{id: name}`` mapping with ids 0..N-1; ``nc`` alone
      names the classes by id.

    Args: path: the data.yaml or its folder. required: splits that must be declared.

    Raises:
        DatasetError: missing file, invalid YAML, missing ``names`` or a required split, a path outside the root.
    """
    yaml_path = find_data_yaml(Path(path)).resolve()
    try:
        raw = yaml.safe_load(yaml_path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{yaml_path}: cannot read: {e}") from None
    except yaml.YAMLError as e:
        raise DatasetError(f"{yaml_path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{yaml_path}: top level must be a mapping with path/train/val/names")
    names = _parse_names(raw, yaml_path)
    if not names:
        raise DatasetError(f"{yaml_path}: 'names' is empty")
    if "nc" in raw and int(raw["nc"]) != len(names):
        raise DatasetError(f"{yaml_path}: nc={raw['nc']} but {len(names)} names")
    root = yaml_path.parent
    if raw.get("path"):
        p = Path(str(raw["path"])).expanduser()
        cand = p if p.is_absolute() else (yaml_path.parent / p).resolve()
        if p.is_absolute() or cand.is_dir():
            root = cand
    splits: dict[str, list[Path]] = {}
    for split in SPLITS:
        entry = raw.get(split)
        if entry in (None, ""):
            if split in required:
                raise DatasetError(f"{yaml_path}: no '{split}' split")
            continue
        entries = entry if isinstance(entry, list) else [entry]
        splits[split] = [p if p.is_absolute() else root / p for p in (Path(str(e)) for e in entries)]
    check_dataset_paths(yaml_path, root, splits)  # root not above the yaml's folder, every split inside the root
    return DatasetInfo(yaml_path, root, names, splits, raw=raw)


def is_image_list(source: Path) -> bool:
    """Whether a split source is a ``.txt`` list of images (an existing file)."""
    return source.suffix.lower() == ".txt" and source.is_file()


def list_images(source: Path, root: Path | None = None) -> list[Path]:
    """Images of one split source: a folder (recursive, sorted), a ``.txt`` list, or one image file.

    A list file names one image per line; a relative line is relative to the list file's folder
    (``./images/a.jpg`` and ``images/a.jpg`` alike), an absolute line is taken as is.

    Args:
        source: folder, list file or image file.
        root: the dataset root. Given, every line of a list file must resolve (symlinks followed)
            inside it: a list is text anyone can write, and must not make a reader open files
            elsewhere on the machine.

    Raises:
        DatasetError: a list line resolving outside ``root`` (names the list file and the line).
    """
    source = Path(source)
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if is_image_list(source):
        base, inside = source.parent, (Path(os.path.realpath(root)) if root is not None else None)
        out = []
        for n, line in enumerate(source.read_text(encoding="utf-8-sig").splitlines(), 1):
            if not line.strip():
                continue
            p = Path(line.strip())
            p = p if p.is_absolute() else (base / p).resolve()
            if inside is not None and not Path(os.path.realpath(p)).is_relative_to(inside):
                raise DatasetError(f"{source} line {n}: '{line.strip()}' resolves outside the dataset root {root}")
            out.append(p)
        return out
    if source.suffix.lower() in IMAGE_EXTS and source.is_file():
        return [source]
    return []


def split_images(data_yaml: str | Path, split: str) -> list[Path]:
    """Every image of ``split`` (all its sources, ``list_images`` rule), sorted and de-duplicated.

    Raises:
        DatasetError: unreadable data.yaml, no such split, or a source that does not exist.
    """
    info = load_data_yaml(data_yaml, required=(split,))
    files: set[Path] = set()
    for src in info.splits[split]:
        if not src.exists():
            raise DatasetError(f"{info.yaml_path}: {split} images not found at {src}")
        files.update(list_images(src, info.root))
    return sorted(files)


def label_path(image: Path) -> Path:
    """Ultralytics' rule: the last ``/images/`` in the path becomes ``/labels/``, suffix ``.txt``."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    s = str(image)
    if sa in s:
        s = sb.join(s.rsplit(sa, 1))
    return Path(s).with_suffix(".txt")


def _rel(p: Path, root: Path) -> str:
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return str(p)


def _check_label(lbl: Path, nc: int, root: Path, counts: Counter) -> str | None:
    """First problem of one label file (None if fine); counts instances per class id."""
    try:
        text = lbl.read_text()
    except (OSError, UnicodeDecodeError) as e:
        return f"{_rel(lbl, root)}: cannot read: {e}"
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            vals = [float(v) for v in parts]
        except ValueError:
            return f"{_rel(lbl, root)} line {n}: not numbers"
        cls = vals[0]
        if cls != int(cls) or cls < 0:
            return f"{_rel(lbl, root)} line {n}: class id {parts[0]} is not a non-negative integer"
        if int(cls) >= nc:
            return f"{_rel(lbl, root)}: class id {int(cls)} not in data.yaml names ({nc} classes)"
        coords = vals[1:]
        if not (len(coords) == 4 or (len(coords) >= 6 and len(coords) % 2 == 0)):
            return f"{_rel(lbl, root)} line {n}: expected 4 box values or >= 3 polygon points, got {len(coords)} values"
        if min(coords) < -1e-6 or max(coords) > 1 + 1e-6:
            return f"{_rel(lbl, root)} line {n}: coordinates outside [0, 1] (labels must be normalised)"
        counts[int(cls)] += 1
    return None


def check_structure(data_yaml: str | Path, splits: tuple[str, ...] = ("train", "val")) -> DatasetInfo:
    """Basic structure check: data.yaml readable, splits exist and hold images, labels valid.

    Args:
        data_yaml: the data.yaml (or its folder).
        splits: splits that must exist and be non-empty.

    Returns:
        DatasetInfo with per-split image counts and per-class instance counts filled in.

    Raises:
        DatasetError: naming the file and the problem, e.g.
            ``labels/train/x.txt: class id 5 not in data.yaml names (3 classes)``.
    """
    info = load_data_yaml(data_yaml)
    counts: Counter = Counter()
    problems: list[str] = []
    for split in splits:
        sources = info.splits.get(split)
        if not sources:
            raise DatasetError(f"{info.yaml_path}: no '{split}' split")
        imgs: list[Path] = []
        for src in sources:
            if not src.exists():
                raise DatasetError(f"{info.yaml_path}: {split} split {_rel(src, info.root)} not found ({src})")
            imgs += list_images(src, info.root)
        if not imgs:
            raise DatasetError(f"{info.yaml_path}: {split} split has no images ({', '.join(map(str, sources))})")
        info.images[split] = len(imgs)
        labelled = 0
        for img in imgs:
            lbl = label_path(img)
            if not lbl.is_file():
                continue  # Ultralytics reads a missing label as a background image
            labelled += 1
            problem = _check_label(lbl, info.nc, info.root, counts)
            if problem:
                problems.append(problem)
        if labelled == 0:
            raise DatasetError(f"{info.yaml_path}: {split} split has no label files "
                               f"(expected e.g. {label_path(imgs[0])})")
    if problems:
        more = f" (and {len(problems) - 1} more label problems)" if len(problems) > 1 else ""
        raise DatasetError(problems[0] + more)
    info.instances = {info.names[i]: counts.get(i, 0) for i in range(info.nc)}
    return info
