"""Write-then-rename: a reader never sees a half-written file, a failed write leaves nothing.

Every temp-file-then-rename in the project goes through this module: single files
(``atomic_write`` and its text / bytes / JSON forms) and whole folders (``atomic_output_dir``).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import DatasetError


@functools.cache
def _file_mode() -> int:
    """The mode ``open()`` would give a new file under this process's umask (mkstemp makes 0600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(out: str | Path, write: Callable[[str], object], suffix: str | None = None) -> Path:
    """Call ``write(tmp_path)`` on a temp file beside ``out``, then rename it to ``out``.

    The temp file ends in ``suffix`` (default ``.tmp`` + ``out``'s own suffix, so writers that
    pick the format from the name still see it) and gets the permissions of an ordinarily
    created file.

    Example:
        >>> atomic_write("model.onnx", lambda tmp: onnx.save(model, tmp))
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.",
                               suffix=f".tmp{out.suffix}" if suffix is None else suffix)
    os.close(fd)
    try:
        write(tmp)
        if os.path.exists(tmp):
            os.chmod(tmp, _file_mode())
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def atomic_write_text(out: str | Path, text: str, suffix: str | None = None) -> Path:
    """Text file (UTF-8) written atomically (``suffix``: as for ``atomic_write``)."""
    return atomic_write(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), suffix)


def atomic_write_bytes(out: str | Path, data: bytes) -> Path:
    """Binary file written atomically."""
    return atomic_write(out, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_json(out: str | Path, obj: Any, indent: int | None = 2, sort_keys: bool = False,
                      suffix: str | None = None) -> Path:
    """JSON file (trailing newline) written atomically.

    ``ensure_ascii`` stays on, so odd file names survive as ``\\u`` escapes.
    """
    return atomic_write_text(out, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n", suffix)


@contextmanager
def atomic_output_dir(out: Path, replace_if: Callable[[Path], bool] | None = None,
                      overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``out``; on success it becomes ``out``, on error it is removed.

    Args:
        out: final folder. If it exists and is non-empty it is refused, unless ``overwrite``
            or ``replace_if(out)`` is true, in which case it is replaced only after success.
        replace_if: predicate saying an existing folder may be replaced (e.g. earlier synth output).
        overwrite: replace any existing folder.

    Raises:
        DatasetError: ``out`` is a file, or a non-empty folder that may not be replaced.
    """
    out = Path(out).expanduser().resolve()
    if out.exists():
        if not out.is_dir():
            raise DatasetError(f"{out}: output exists and is not a folder")
        if any(out.iterdir()) and not overwrite and not (replace_if and replace_if(out)):
            raise DatasetError(f"{out}: output folder exists and is not empty (choose a new folder)")
    created = []  # parents we create, removed again if the write fails
    p = out.parent
    while not p.exists():
        created.append(p)
        p = p.parent
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the result is an ordinary folder
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # innermost first
            try:
                d.rmdir()
            except OSError:
                break
        raise
