"""The streaming part of the data gate: find a dataset's files and measure each one once.

Layout discovery (``resolve_layout``) reads ``data.yaml`` and maps every split to its image and
label directories, for both Ultralytics layouts (``images/{split}`` + ``labels/{split}`` and
``{split}/images`` + ``{split}/labels``), and ``.txt`` image lists (read by the project's one
reader, ``damage.tasks.data.dataset.list_images``: every listed path must resolve inside the dataset
root). ``enumerate_samples`` walks those directories without following symlinks out of the dataset.
``scan_chunk`` measures images (and parses their label files) and returns compact rows;
``damage.tasks.validation.scanner.Scanner`` runs it in worker processes or on Ray, so no pixel data
leaves a worker and 100k images cost a few tens of MB in the parent.

Each file is read exactly once: the same bytes give the SHA-256, the header-only size check
(PNG IHDR, JPEG SOF, else Pillow's lazy header read) that refuses decompression bombs without
decoding, and the ``cv2.imdecode`` call. Nothing here imports Great Expectations or Prefect, so
worker processes start fast.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from damage.tasks.core.errors import DatasetError
from damage.tasks.core.images import image_header, pixel_problem
from damage.tasks.data.dataset import IMAGE_EXTS, is_image_list, label_path, list_images, load_data_yaml
from damage.tasks.data.polygons import polygon_self_intersects
from damage.tasks.validation.measures import (  # GREY_SIDE: side of the measured grey copy
    GREY_SIDE,
    grey_measures,
)

# Fields of one image row as returned by a worker (the parent adds path, split, label info).
IMAGE_FIELDS = ("decodes", "error", "format", "width", "height", "channels", "bytes", "sha256",
                "phash", "blur", "brightness", "contrast", "mtime_ns", "thumb")
# Side of the grey thumbnail that confirms a near-duplicate hash match (THUMB_SIDE**2 bytes/image).
THUMB_SIDE = 8
# Fields of one annotation row (one line of a label file).
ANNOTATION_FIELDS = ("line", "parse_ok", "error", "class_id", "n_points", "coord_min", "coord_max",
                     "xmin", "ymin", "xmax", "ymax", "area", "self_intersects")


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------


@dataclass
class Split:
    """One split: where its images and labels live (absolute), and how data.yaml named it."""

    name: str
    image_dirs: list[Path]
    label_dirs: list[Path]
    declared: str
    image_lists: list[Path] = field(default_factory=list)  # .txt lists (labels: Ultralytics' images->labels rule)


@dataclass
class Layout:
    """A dataset on disk as described by its data.yaml."""

    root: Path
    yaml_path: Path
    yaml: dict
    names: list[str]
    splits: list[Split] = field(default_factory=list)

    def rel(self, path: str | os.PathLike) -> str:
        """Path relative to the dataset root, POSIX style (the report's ``file`` field)."""
        try:
            return Path(os.path.relpath(path, self.root)).as_posix()
        except ValueError:  # other drive (Windows) - keep absolute
            return Path(path).as_posix()


def _label_dir_for(image_dir: Path) -> Path:
    """Ultralytics' rule: the last path component named 'images' becomes 'labels'."""
    parts = list(image_dir.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts)
    return image_dir  # labels next to images (Ultralytics does the same)


def resolve_layout(data: str | os.PathLike) -> Layout:
    """Read ``data.yaml`` and map each declared split to image and label directories.

    Args:
        data: dataset root (containing data.yaml) or the data.yaml file.

    Raises:
        DatasetError: missing path, no data.yaml, unreadable YAML, no class names, no splits.
    """
    info = load_data_yaml(data, required=())
    layout = Layout(root=info.root, yaml_path=info.yaml_path, yaml=info.raw, names=info.names)
    root_real = os.path.realpath(info.root)
    for split, sources in info.splits.items():
        image_dirs, image_lists = [], []
        for p in sources:
            if is_image_list(p):
                if not _inside(os.path.realpath(p), root_real):
                    raise DatasetError(f"{info.yaml_path}: split '{split}' list {p} lies outside the dataset root "
                                       f"{info.root}")
                image_lists.append(Path(os.path.abspath(p)))
            else:
                image_dirs.append(Path(os.path.abspath(p)))
        declared = info.raw[split]
        layout.splits.append(Split(split, image_dirs, [_label_dir_for(d) for d in image_dirs],
                                   ", ".join(str(e) for e in (declared if isinstance(declared, list) else [declared])),
                                   image_lists))
    if not layout.splits:
        raise DatasetError(f"{info.yaml_path}: declares no split (train/val/test)")
    return layout


# --------------------------------------------------------------------------------------------
# Enumeration
# --------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One image (maybe with a label) to scan. Paths are absolute strings; rel ones for reports."""

    split: str
    image: str
    image_rel: str
    label: str | None  # file to parse; None: no label file, or a label link out of the dataset
    label_rel: str  # the label's path relative to the root (where Ultralytics looks for it)
    label_exists: bool
    list_file: str | None = None  # the .txt image list that named this image (None: found in a folder)


@dataclass
class Inventory:
    """Everything found on disk before any file is read."""

    samples: list[Sample] = field(default_factory=list)
    orphan_labels: list[tuple[str, str]] = field(default_factory=list)  # (split, rel)
    # Symlinks out of the dataset: {"split", "file", "target", "kind" (image|label|dir), "label"}
    outside_links: list[dict] = field(default_factory=list)
    split_images: dict[str, int] = field(default_factory=dict)
    missing_dirs: list[tuple[str, str]] = field(default_factory=list)  # (split, rel dir)


def _inside(path: str, root_real: str) -> bool:
    return path == root_real or path.startswith(root_real.rstrip(os.sep) + os.sep)


def _link(split: str, rel: str, path: str | os.PathLike, kind: str, label: str | None = None) -> dict:
    return {"split": split, "file": rel, "target": os.path.realpath(path), "kind": kind, "label": label}


def _walk(top: Path, exts: set[str] | None) -> Iterator[tuple[str, bool]]:
    """Yield (path, is_symlink) of files under ``top``; never descends into symlinked dirs."""
    stack = [str(top)]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue  # .cache files, editor swap files, macOS metadata
            link = e.is_symlink()
            if e.is_dir(follow_symlinks=False):
                subdirs.append(e.path)
            elif link and os.path.isdir(e.path):
                yield e.path, True  # symlinked directory: reported if it leaves the dataset
            elif exts is None or os.path.splitext(e.name)[1].lower() in exts:
                yield e.path, link
        stack.extend(reversed(subdirs))


def enumerate_samples(layout: Layout) -> Inventory:
    """List images and labels per split, pairing them by relative stem. Reads no file contents.

    Symlinks whose target lies outside the dataset root are recorded in ``outside_links`` and
    never read; symlinks inside the dataset are followed like regular files.
    """
    inv = Inventory()
    root_real = os.path.realpath(layout.root)
    seen_images: set[str] = set()
    for split in layout.splits:
        count = 0
        for img_dir, lbl_dir in zip(split.image_dirs, split.label_dirs, strict=True):
            if os.path.islink(img_dir) and not _inside(os.path.realpath(img_dir), root_real):
                inv.outside_links.append(_link(split.name, layout.rel(img_dir), img_dir, "dir"))
                continue
            if not img_dir.is_dir():
                inv.missing_dirs.append((split.name, layout.rel(img_dir)))
                continue
            labels: dict[str, tuple[str, bool]] = {}
            if lbl_dir != img_dir and lbl_dir.is_dir():
                for p, link in _walk(lbl_dir, {".txt"}):
                    key = os.path.splitext(os.path.relpath(p, lbl_dir))[0]
                    labels[key] = (p, link)
            same_dir = lbl_dir == img_dir
            for p, link in _walk(img_dir, IMAGE_EXTS):
                rel = layout.rel(p)
                if link and not _inside(os.path.realpath(p), root_real):
                    lbl = labels.pop(os.path.splitext(os.path.relpath(p, img_dir))[0], None)
                    kind = "dir" if os.path.isdir(p) else "image"
                    inv.outside_links.append(_link(split.name, rel, p, kind, layout.rel(lbl[0]) if lbl else None))
                    continue
                if link and os.path.isdir(p):
                    continue  # symlinked dir inside the dataset: not followed (loops)
                if p in seen_images:
                    continue  # two splits pointing at the same directory
                seen_images.add(p)
                key = os.path.splitext(os.path.relpath(p, img_dir))[0]
                lbl = labels.pop(key, None)
                if same_dir and lbl is None:
                    cand = os.path.splitext(p)[0] + ".txt"
                    lbl = (cand, os.path.islink(cand)) if os.path.lexists(cand) else None
                label = None
                if lbl is not None:
                    label_rel = layout.rel(lbl[0])
                    if lbl[1] and not _inside(os.path.realpath(lbl[0]), root_real):
                        inv.outside_links.append(_link(split.name, label_rel, lbl[0], "label"))
                    else:
                        label = lbl[0]
                else:
                    label_rel = layout.rel(os.path.join(lbl_dir, key + ".txt"))
                inv.samples.append(Sample(split.name, p, rel, label, label_rel, lbl is not None))
                count += 1
            for p, link in labels.values():
                if link and not _inside(os.path.realpath(p), root_real):
                    inv.outside_links.append(_link(split.name, layout.rel(p), p, "label"))
                else:
                    inv.orphan_labels.append((split.name, layout.rel(p)))
        for lst in split.image_lists:
            count += _enumerate_list(layout, split.name, lst, root_real, seen_images, inv)
        inv.split_images[split.name] = inv.split_images.get(split.name, 0) + count
    return inv


def _enumerate_list(layout: Layout, split: str, lst: Path, root_real: str, seen: set[str], inv: Inventory) -> int:
    """Samples of one ``.txt`` image list (the one reader's rule; a line leaving the root is refused).

    A listed image that does not exist is kept: reading it fails, and the gate reports it as unreadable.
    Returns the number of images added.
    """
    count = 0
    for img in list_images(lst, layout.root):
        p = os.path.abspath(img)
        if p in seen:
            continue
        seen.add(p)
        lbl = label_path(Path(p))
        exists = os.path.lexists(lbl)
        label = None
        if exists and os.path.islink(lbl) and not _inside(os.path.realpath(lbl), root_real):
            inv.outside_links.append(_link(split, layout.rel(lbl), lbl, "label"))
        elif exists:
            label = str(lbl)
        inv.samples.append(Sample(split, p, layout.rel(p), label, layout.rel(lbl), exists, str(lst)))
        count += 1
    return count


# --------------------------------------------------------------------------------------------
# Reading and measuring one file
# --------------------------------------------------------------------------------------------

_NOATIME = getattr(os, "O_NOATIME", 0)


def read_bytes(path: str, with_stat: bool = False):
    """Read a regular file without following it into a FIFO/device and, where allowed, without
    updating its access time (the input dataset must not change, not even its timestamps).

    Returns:
        The bytes, or (bytes, os.stat_result) with ``with_stat``.
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(f"not a regular file (mode {stat.filemode(st.st_mode)})")
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | _NOATIME)
    except PermissionError:  # O_NOATIME needs file ownership
        fd = os.open(path, flags)
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    return (data, st) if with_stat else data


def truncation_error(fmt: str, data: bytes) -> str | None:
    """JPEG must end with EOI (FFD9), PNG must contain IEND: cv2 silently decodes truncated
    files into partially grey images, so the end marker is the reliable signal."""
    if fmt == "jpeg" and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return "truncated JPEG (no end-of-image marker)"
    if fmt == "png" and data.rfind(b"IEND", max(0, len(data) - 64)) < 0:
        return "truncated PNG (no IEND chunk)"
    return None


def _reduce_flag(w: int, h: int) -> int:
    """Decode JPEGs at 1/2, 1/4 or 1/8 scale (libjpeg scales in the DCT domain, still decoding
    every coefficient, so corruption is still caught) while keeping the long side >= GREY_SIDE."""
    import cv2

    side = max(w, h)
    for factor, flag in ((8, cv2.IMREAD_REDUCED_GRAYSCALE_8), (4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
                         (2, cv2.IMREAD_REDUCED_GRAYSCALE_2)):
        if side // factor >= GREY_SIDE:
            return flag
    return cv2.IMREAD_GRAYSCALE


def dhash(grey: np.ndarray) -> int:
    """64-bit difference hash: sign of horizontal gradients on a 9x8 area-resampled copy."""
    import cv2

    small = cv2.resize(grey, (9, 8), interpolation=cv2.INTER_AREA).astype(np.int16)
    bits = (small[:, 1:] > small[:, :-1]).ravel()
    return int(np.packbits(bits).view(">u8")[0])


def thumbnail(grey: np.ndarray) -> bytes:
    """THUMB_SIDE x THUMB_SIDE area-averaged grey copy: confirms hash matches.

    dHash encodes only the signs of horizontal gradients, so all flat or smoothly shaded images
    (plain backgrounds, gradients) share nearly the same hash; the thumbnail tells them apart.
    """
    import cv2

    return cv2.resize(grey, (THUMB_SIDE, THUMB_SIDE), interpolation=cv2.INTER_AREA).astype(np.uint8).tobytes()


def measure_image(path: str, max_pixels: int) -> tuple:
    """Read, hash, header-check, decode and measure one image. Never raises.

    Returns:
        A tuple in ``IMAGE_FIELDS`` order. On failure ``decodes`` is False and ``error`` says why.
    """
    import cv2

    fmt, w, h, c = "", math.nan, math.nan, math.nan
    try:
        data, st = read_bytes(path, with_stat=True)
    except OSError as e:
        return (False, f"unreadable: {e.strerror or e}", fmt, w, h, c, 0, "", "", math.nan, math.nan, math.nan, 0,
                b"")
    sha = hashlib.sha256(data).hexdigest()
    nbytes = len(data)

    def bad(msg: str) -> tuple:
        return (False, msg, fmt, w, h, c, nbytes, sha, "", math.nan, math.nan, math.nan, st.st_mtime_ns, b"")

    if not data:
        return bad("empty file (0 bytes)")
    try:
        fmt, w, h, c = image_header(data)
    except ValueError as e:
        return bad(str(e))
    problem = pixel_problem(w, h, max_pixels)
    if problem is not None:
        return bad(problem)
    trunc = truncation_error(fmt, data)
    if trunc:
        return bad(trunc)
    flag = (_reduce_flag(w, h) if fmt == "jpeg" else cv2.IMREAD_GRAYSCALE) | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        grey = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    except cv2.error as e:
        return bad(f"decoder error: {str(e).strip().splitlines()[-1][:200]}")
    if grey is None or grey.size == 0:
        return bad(f"{fmt.upper()} data does not decode")
    grey, blur, brightness, contrast = grey_measures(grey)
    return (True, "", fmt, w, h, c, nbytes, sha, f"{dhash(grey):016x}", blur, brightness, contrast,
            st.st_mtime_ns, thumbnail(grey))


def _nan_row(line: int, error: str, class_id: float = math.nan) -> tuple:
    """An unparseable line: geometry is unknown (NaN), so only ``parse_ok`` fails on it."""
    nan = math.nan
    return (line, False, error, class_id, nan, nan, nan, nan, nan, nan, nan, nan, False)


def parse_label_line(line_no: int, text: str) -> tuple:
    """One ``class x1 y1 x2 y2 ...`` line -> a row in ``ANNOTATION_FIELDS`` order. Never raises."""
    tokens = text.split()
    try:
        values = [float(t) for t in tokens]
    except ValueError:
        bad = next(t for t in tokens if not _is_float(t))
        return _nan_row(line_no, f"line {line_no}: not a number: {bad[:40]!r}")
    if not all(math.isfinite(v) for v in values):
        return _nan_row(line_no, f"line {line_no}: non-finite value (NaN/inf)")
    class_id, coords = values[0], values[1:]
    if len(coords) % 2:
        return _nan_row(line_no, f"line {line_no}: odd number of coordinates ({len(coords)})", class_id)
    if not coords:
        return (line_no, True, "", class_id, 0) + (math.nan,) * 7 + (False,)
    pts = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    x, y = pts[:, 0], pts[:, 1]
    area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    return (line_no, True, "", class_id, len(pts), float(pts.min()), float(pts.max()),
            float(x.min()), float(y.min()), float(x.max()), float(y.max()), area, polygon_self_intersects(pts))


def _is_float(t: str) -> bool:
    try:
        float(t)
        return True
    except ValueError:
        return False


def parse_label(path: str) -> list[tuple]:
    """Parse a YOLO-seg label file (CRLF, BOM and trailing blanks tolerated). Never raises."""
    try:
        data = read_bytes(path)
    except OSError as e:
        return [_nan_row(0, f"unreadable: {e.strerror or e}")]
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return [_nan_row(0, "not UTF-8 text")]
    if "\x00" in text:
        return [_nan_row(0, "binary data (NUL bytes) in a label file")]
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            rows.append(parse_label_line(n, line))
    return rows


def scan_chunk(args: tuple[list[tuple[int, str, str | None]], int]) -> list[tuple[int, tuple, list[tuple]]]:
    """Worker entry point: measure a chunk of (index, image path, label path) items."""
    items, max_pixels = args
    out = []
    for idx, image, label in items:
        row = measure_image(image, max_pixels)
        anns = parse_label(label) if label else []
        out.append((idx, row, anns))
    return out
