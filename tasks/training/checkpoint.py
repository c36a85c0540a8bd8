"""The one way a ``.pt`` checkpoint is opened: vetted first, then loaded with ``weights_only=True``.

A PyTorch checkpoint is a pickle, and unpickling runs whatever callables the file names
(``__reduce__``). Checkpoints reach this project from places it does not control: the registry
(``artifact.pt``, which the pipeline account can change), S3-synced folders, the CLI. So no
checkpoint is ever fully unpickled:

1. ``vet_checkpoint`` lists the globals the pickle references *without executing it*
   (``torch.serialization.get_unsafe_globals_in_checkpoint`` reads the opcodes) and refuses any
   name outside the allowlist, naming the file. Nothing from the file has run at that point.
2. ``load_checkpoint_dict`` then loads it with ``torch.load(weights_only=True)`` (torch's
   restricted unpickler) with the allowlisted classes registered.
3. ``ultralytics_safe_load()`` is the context every Ultralytics loader runs under (``YOLO(path)``,
   ``AutoBackend``, ``load_checkpoint``): Ultralytics' own ``torch_safe_load`` falls back to a full
   ``weights_only=False`` unpickle unless its ``SAFE_LOAD`` switch is on; inside the context it is on.

The allowlist: ``torch.nn`` modules, Ultralytics' modules and model classes and the data globals
of its checkpoints (Ultralytics' own ``_SafeLoad`` rules, ``ultralytics.nn.tasks``), plus this
project's pruned blocks (``damage.tasks.training.prune.C2f_v2``/``C2PSA_v2``). A plain state dict
(tensors only) needs no class at all.

Example:
    >>> ckpt = load_checkpoint_dict("best.pt")  # doctest: +SKIP
    >>> with ultralytics_safe_load(): model = YOLO(vet_checkpoint("best.pt"))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from damage.tasks.core.errors import DamageError

# Globals a checkpoint may name besides classes: torch's tensor rebuilders are allowed by torch's
# restricted unpickler itself and never reported by the scan; these are the rest.
_DATA_GLOBALS = {
    "collections.OrderedDict", "builtins.set", "builtins.frozenset", "builtins.slice", "builtins.getattr",
    "numpy.dtype", "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray",
    "numpy.dtypes.Float64DType", "numpy.dtypes.Float32DType", "numpy.dtypes.Int64DType",
    "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib._local.PosixPath", "pathlib._local.WindowsPath",
    "ultralytics.utils.IterableSimpleNamespace", "ultralytics.yolo.utils.IterableSimpleNamespace",
    "torch.float16", "torch.float32", "torch.bfloat16", "torch.int64", "torch.device", "torch.Size",
}
# Module prefixes whose nn.Module classes may be rebuilt (Ultralytics' _SafeLoad uses the same).
_CLASS_MODULES = ("torch.nn.modules.", "ultralytics.nn.modules.", "ultralytics.nn.tasks.",
                  "ultralytics.utils.loss.", "ultralytics.utils.tal.")
# This project's own layer classes that a pruned checkpoint pickles.
_PROJECT_CLASSES = ("damage.tasks.training.prune.C2f_v2", "damage.tasks.training.prune.C2PSA_v2")
_lock = threading.Lock()


class UnsafeCheckpoint(DamageError):
    """A checkpoint that references code outside the allowlist, or is not a torch zip archive."""


class UnreadableCheckpoint(UnsafeCheckpoint):
    """Not a ``torch.save`` zip archive (garbage, truncated, a legacy pickle): refused unread."""


def _allowed(name: str) -> bool:
    return name in _DATA_GLOBALS or name in _PROJECT_CLASSES or name.startswith(_CLASS_MODULES)


def vet_checkpoint(path: str | Path) -> Path:
    """Refuse a checkpoint that names anything outside the allowlist, before any of it is unpickled.

    Args:
        path: the ``.pt`` file.

    Returns:
        The path (for chaining into a loader).

    Raises:
        UnsafeCheckpoint: missing file, not a ``torch.save`` zip archive, or a global outside the
            allowlist (the message names the file and the first refused names).
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise UnreadableCheckpoint(f"{p}: checkpoint not found")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(p))
    except Exception as e:  # not a zip archive (legacy or hand-made pickle), truncated, garbage
        raise UnreadableCheckpoint(f"{p}: refused: not a torch.save zip checkpoint that can be vetted ({e}); "
                               f"nothing in it was run") from None
    refused = sorted(n for n in set(names) if not _allowed(n))
    if refused:
        raise UnsafeCheckpoint(f"{p}: refused: the checkpoint references {', '.join(refused[:5])}, outside the "
                               f"allowlist of torch/Ultralytics model classes; nothing in it was run")
    return p


def _register_project_classes() -> None:
    """Make this project's pruned blocks known to torch's restricted unpickler (process-wide, as Ultralytics does).

    Resolved from the fixed ``_PROJECT_CLASSES`` table (never from a name in a file or a parameter), by
    name because ``damage.tasks.training.prune`` itself loads checkpoints through this module.
    """
    import importlib

    import torch

    classes = []
    for dotted in _PROJECT_CLASSES:
        module, _, attr = dotted.rpartition(".")
        classes.append(getattr(importlib.import_module(module), attr))
    torch.serialization.add_safe_globals(classes)


@contextlib.contextmanager
def ultralytics_safe_load() -> Iterator[None]:
    """Run Ultralytics' loaders in their restricted mode (``weights_only=True`` + allowlist).

    Ultralytics' ``torch_safe_load`` reads the module-level ``SAFE_LOAD`` switch at call time and,
    with it off, unpickles everything; it is switched on for the duration of the block (and left
    on if another thread is inside one too).
    """
    import ultralytics.nn.tasks as ult

    _register_project_classes()
    with _lock:
        before = ult.SAFE_LOAD
        ult.SAFE_LOAD = True
    try:
        yield
    finally:
        with _lock:
            ult.SAFE_LOAD = before


def load_checkpoint_dict(path: str | Path) -> dict[str, Any]:
    """Vet, then load a checkpoint with ``weights_only=True``; an Ultralytics checkpoint or a plain state dict.

    Raises:
        UnsafeCheckpoint: see ``vet_checkpoint``; also a file the restricted unpickler refuses or
            that is not a dict.
    """
    p = vet_checkpoint(path)
    with ultralytics_safe_load():
        from ultralytics.nn.tasks import torch_safe_load

        try:  # Ultralytics' restricted mode: torch.load(weights_only=True) with its allowlist registered
            ckpt, _ = torch_safe_load(str(p), safe_only=True)
        except Exception as e:
            raise UnsafeCheckpoint(f"{p}: refused by the restricted loader ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict):
        raise UnsafeCheckpoint(f"{p}: not a checkpoint dict (got {type(ckpt).__name__})")
    return ckpt


def load_ultralytics_checkpoint(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """``ultralytics.nn.tasks.load_checkpoint`` of a vetted file in restricted mode: ``(FP32 model, ckpt)``.

    Raises:
        UnsafeCheckpoint: see ``vet_checkpoint``.
    """
    from ultralytics.nn.tasks import load_checkpoint

    p = vet_checkpoint(path)
    with ultralytics_safe_load():
        return load_checkpoint(str(p), device="cpu")


def vetted_model_path(path: str | Path) -> str:
    """``path`` as a string for an Ultralytics loader, vetted when it is a ``.pt`` (ONNX files are not pickles).

    Call the loader inside ``ultralytics_safe_load()``.
    """
    p = Path(path)
    return str(vet_checkpoint(p) if p.suffix == ".pt" else p)
