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
from collections.abc import Mapping
from typing import Any

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
