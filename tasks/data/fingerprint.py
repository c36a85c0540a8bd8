"""Content fingerprints: the identity of a dataset, a config and the code (cache keys, lineage)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from tasks.data.dataset import DATA_YAML_NAMES, IMAGE_EXTS

_CHUNK = 1 << 20


_NOATIME = getattr(os, "O_NOATIME", 0)


def open_noatime(path: Path):
    """Open for reading without updating the access time where allowed (inputs stay untouched)."""
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | _NOATIME)
    except PermissionError:  # O_NOATIME needs file ownership
        fd = os.open(path, flags)
    return os.fdopen(fd, "rb")


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open_noatime(path) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def dataset_fingerprint(root: str | Path) -> str:
    """Content hash of a dataset's images, labels and data.yaml (names + bytes, sorted).

    Renaming, adding, removing or editing any image or label changes it; timestamps do not.
    Symlinks are hashed by their target path, never followed out of the dataset.
    """
    root = Path(root)
    h = hashlib.sha256()
    files = sorted(
        p for p in root.rglob("*")
        if (p.is_file() or p.is_symlink())
        and (p.suffix.lower() in IMAGE_EXTS or p.suffix.lower() == ".txt" or p.name in DATA_YAML_NAMES)
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    for p in files:
        rel = p.relative_to(root).as_posix()
        h.update(rel.encode() + b"\0")
        if p.is_symlink():
            h.update(b"link:" + str(p.readlink()).encode())
        else:
            h.update(file_sha256(p).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def code_version() -> str:
    """Git commit of the checkout (with '+dirty' if modified), else the package version."""
    repo = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:
        from importlib.metadata import version

        try:
            return "pkg-" + version("damage")
        except Exception:
            return "unknown"
