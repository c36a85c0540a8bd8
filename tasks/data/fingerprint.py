"""Content fingerprints: the identity of a dataset, a config and the code (cache keys, lineage)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from damage.tasks.data.dataset import DATA_YAML_NAMES, IMAGE_EXTS

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


PACKAGES = ("flows", "tasks", "model_registry", "expectations")
CODE_SUFFIXES = {".py", ".json", ".yaml", ".yml"}


def package_files_hash(roots: list[Path] | None = None) -> str:
    """sha256 (12 hex) over the relative path and bytes of every code/config file of the package.

    Used when git cannot say what code is running (git missing, the checkout owned by another
    user, an installed wheel): any edit to a file changes it, so skip-if-unchanged never misses
    a code change.
    """
    if roots is None:
        base = Path(__file__).resolve().parents[2]
        roots = [base / name for name in PACKAGES] + [base / "configs"]
    h = hashlib.sha256()
    for root in roots:
        if not root.is_dir():
            continue
        for f in sorted(p for p in root.rglob("*") if p.suffix in CODE_SUFFIXES and p.is_file()
                        and "__pycache__" not in p.parts):
            h.update(f"{root.name}/{f.relative_to(root).as_posix()}\0".encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:12]


def code_version() -> str:
    """What code is running, and from which source.

    ``<sha>`` / ``<sha>+dirty``: the git commit of this checkout (only when git's top level is
    this package's own checkout). ``files-<hash>``: git is missing or refuses the repository
    (e.g. "dubious ownership"), or the package is installed without its repository: the hash
    of the package's files (``package_files_hash``). Never a constant.
    """
    repo = Path(__file__).resolve().parents[2]
    try:
        top = subprocess.run(["git", "-C", str(repo), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        if Path(top).resolve() != repo:
            raise RuntimeError(f"git top level {top} is not the package checkout {repo}")
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception as e:  # git absent, refusing the repo, or no repository here
        import logging

        logging.getLogger(__name__).info("code version from the package's file hashes (git unavailable: %s)",
                                         str(e).strip()[:200])
        return "files-" + package_files_hash()
