"""Write-then-rename: a reader never sees a half-written file, a failed write leaves nothing."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(out: str | Path, write: Callable[[str], object], suffix: str = ".tmp") -> Path:
    """Call ``write(tmp_path)`` on a temp file beside ``out``, then rename it to ``out``.

    Example:
        >>> atomic_write("model.onnx", lambda tmp: onnx.save(model, tmp))
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def atomic_write_text(out: str | Path, text: str) -> Path:
    """Text file written atomically."""
    return atomic_write(out, lambda tmp: Path(tmp).write_text(text))
