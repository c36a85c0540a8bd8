"""The one codec of an exported model's ONNX metadata (``metadata_props``).

Two families of keys share the file:
- Ultralytics' own (``names``, ``imgsz``, ``stride``, ``task``, ``args``, ...), written as Python literals;
- the pipeline's ``damage.*`` keys, each a JSON value (classes, image size, thresholds, lineage, variant,
  quantization, backend latencies).

Every reader (the predictor, the export and INT8 steps, the registry) decodes through ``decode``, and every
writer sets keys through ``set_props``, so a key reads the same wherever it is read. Torch-free and
onnx-free: the functions take plain dicts or any object with ``metadata_props``.
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..core.errors import DamageError

META_PREFIX = "damage."
# Ultralytics keys written as Python literals, and those written as plain integers.
_LITERAL_KEYS = frozenset({"names", "imgsz", "args", "end2end"})
_INT_KEYS = frozenset({"stride", "batch", "channels"})


def _literal(v: str) -> Any:
    try:
        return ast.literal_eval(v)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return v


def decode(raw: Mapping[str, str]) -> dict[str, Any]:
    """Decoded metadata: ``damage.*`` keys as JSON values (prefix kept), Ultralytics' literals parsed, and
    ``names`` (a list, the pipeline's ``damage.names`` first) and ``imgsz`` (``[h, w]``) normalised."""
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if k.startswith(META_PREFIX):
            try:
                out[k] = json.loads(v)
            except json.JSONDecodeError:
                out[k] = v
        elif k in _LITERAL_KEYS:
            out[k] = _literal(v)
        elif k in _INT_KEYS:
            try:
                out[k] = int(v)
            except ValueError:
                out[k] = v
        else:
            out[k] = v
    names = out.get(META_PREFIX + "names") or out.get("names")
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names, key=int)]
    out["names"] = list(names) if names else None
    imgsz = out.get("imgsz")
    if isinstance(imgsz, int):
        imgsz = [imgsz, imgsz]
    out["imgsz"] = list(imgsz) if isinstance(imgsz, (list, tuple)) and imgsz else None
    return out


def pipeline_keys(decoded: Mapping[str, Any]) -> dict[str, Any]:
    """The ``damage.*`` entries of ``decode``'s result, prefix removed."""
    return {k[len(META_PREFIX):]: v for k, v in decoded.items() if k.startswith(META_PREFIX)}


def raw_props(proto: Any) -> dict[str, str]:
    """``metadata_props`` of an ``onnx.ModelProto`` as a plain dict."""
    return {p.key: p.value for p in proto.metadata_props}


def encode(metadata: Mapping[str, Any]) -> dict[str, str]:
    """``damage.<key>`` -> JSON for each entry (a key may be given with or without the prefix)."""
    return {META_PREFIX + (k[len(META_PREFIX):] if k.startswith(META_PREFIX) else k): json.dumps(v, default=str)
            for k, v in metadata.items()}


def set_props(proto: Any, props: Mapping[str, str]) -> None:
    """Set ``metadata_props`` keys of an ``onnx.ModelProto`` in place (existing keys are replaced)."""
    have = {p.key: p for p in proto.metadata_props}
    for k, v in props.items():
        if k in have:
            have[k].value = v
        else:
            prop = proto.metadata_props.add()
            prop.key, prop.value = k, v
            have[k] = prop


# An input side above this (metadata or a fixed graph input) is refused: 60000 would cost 10.8 GB.
MAX_IMGSZ = 4096


def _number(meta: dict[str, Any], key: str, lo: float, hi: float, path: Path, integer: bool = False):
    """``meta[key]`` checked for type and range (None when absent); DamageError naming the key."""
    if key not in meta or meta[key] is None:
        return None
    v = meta[key]
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not (lo <= v <= hi) or (isinstance(v, float) and not math.isfinite(v)):
        kind = "an integer" if integer else "a number"
        raise DamageError(f"{path}: ONNX metadata '{key}' must be {kind} in [{lo:g}, {hi:g}], got {v!r}")
    return v


def validate(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """Check the types and ranges of the metadata keys the predictor uses; returns ``meta``.

    Raises:
        DamageError: a key has the wrong type or is out of range (the message names it).
    """
    _number(meta, "damage.conf", 0.0, 1.0, path)
    _number(meta, "damage.sliced_conf", 0.0, 1.0, path)
    _number(meta, "damage.iou", 0.0, 1.0, path)
    _number(meta, "damage.max_pixels", 1, 2**40, path, integer=True)
    _number(meta, "stride", 1, 256, path, integer=True)
    imgsz = meta.get("imgsz")
    if imgsz is not None:
        if not (isinstance(imgsz, list) and len(imgsz) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and 32 <= v <= MAX_IMGSZ for v in imgsz)):
            raise DamageError(f"{path}: ONNX metadata 'imgsz' must be two integers in [32, {MAX_IMGSZ}], got {imgsz!r}")
    names = meta.get("names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise DamageError(f"{path}: ONNX metadata 'names' must be a list of class names, got {type(names).__name__}")
    return meta
