"""Model families the pipeline builds: YOLOv8, YOLO11 and YOLO26 instance segmentation.

One table (``FAMILIES``) says what differs between them where a pipeline step cares:

* the CSP block the backbone and neck are made of (``C2f`` in YOLOv8, ``C3k2`` in YOLO11/26),
  which structured pruning swaps for a split-free twin;
* whether the head has an NMS-free one-to-one branch (YOLO26), which the export may select and
  the predictor then decodes without NMS.

``model_source`` turns a ``train.model`` value into what ``YOLO(...)`` loads; ``family_of``
names the family of a built or loaded model. Standard library only (the config and the
torch-free predictor's callers import it).

Example:
    >>> model_source("yolo11s-seg")
    'yolo11s-seg.yaml'
    >>> model_source("m")  # bare sizes keep meaning YOLOv8
    'yolov8m-seg.yaml'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from damage.tasks.core.errors import DamageError

SIZES = ("n", "s", "m", "l", "x")


@dataclass(frozen=True)
class Family:
    """What a pipeline step needs to know about one model family.

    Attributes:
        name: family prefix of the Ultralytics model YAMLs (``yolo11`` -> ``yolo11n-seg.yaml``).
        csp_block: class name of its CSP block (swapped for a split-free twin before pruning).
        nms_free_head: the head has a one-to-one (NMS-free, end-to-end) branch besides the
            one-to-many branch that NMS decodes.
    """

    name: str
    csp_block: str
    nms_free_head: bool

    def yaml(self, size: str) -> str:
        """Ultralytics model YAML of this family at ``size`` (``n``..``x``)."""
        return f"{self.name}{size}-seg.yaml"


FAMILIES: dict[str, Family] = {
    "yolov8": Family("yolov8", "C2f", nms_free_head=False),
    "yolo11": Family("yolo11", "C3k2", nms_free_head=False),
    "yolo26": Family("yolo26", "C3k2", nms_free_head=True),
}
DEFAULT_FAMILY = "yolov8"  # what a bare size means (compatibility with train.model: n..x)

_NAME = re.compile(r"^(?P<family>" + "|".join(FAMILIES) + r")(?P<size>[nsmlx])-seg(?:\.ya?ml)?$")


def valid_names() -> list[str]:
    """Every accepted model name: the bare sizes, then ``<family><size>-seg`` for each family."""
    return [*SIZES, *(f.yaml(s)[:-5] for f in FAMILIES.values() for s in SIZES)]


def _unknown(model: str, key: str) -> DamageError:
    fams = ", ".join(FAMILIES)
    return DamageError(
        f"{key} '{model}': unknown model. Valid names: {', '.join(valid_names())} "
        f"(families {fams}; sizes {'/'.join(SIZES)}; a bare size means {DEFAULT_FAMILY}), "
        f"or a path to a .yaml model definition or a .pt checkpoint")


def parse_name(model: str) -> tuple[Family, str] | None:
    """``(family, size)`` of a model name (``yolo26m-seg``, ``yolo26m-seg.yaml``, ``m``), None for paths."""
    if model in SIZES:
        return FAMILIES[DEFAULT_FAMILY], model
    m = _NAME.match(model)
    return (FAMILIES[m["family"]], m["size"]) if m else None


def is_path_like(model: str) -> bool:
    """A ``.pt``/``.yaml``/``.yml`` value that is not one of the family names."""
    return parse_name(model) is None and Path(model).suffix in {".pt", ".yaml", ".yml"}


def check_model_name(model: str, key: str = "train.model") -> str:
    """Validate the syntax of a model value (no file access); returns it unchanged.

    Raises:
        DamageError: neither a known family/size name nor a ``.pt``/``.yaml`` path; the message
            lists the valid names.
    """
    if parse_name(model) is None and not is_path_like(model):
        raise _unknown(model, key)
    return model


def model_source(model: str, key: str = "train.model") -> str:
    """What ``YOLO(...)`` should load for a model value.

    Args:
        model: ``n``..``x`` (YOLOv8), ``<family><size>-seg`` (``yolov8n-seg``, ``yolo11s-seg``,
            ``yolo26m-seg``, with or without ``.yaml``), or a path to a ``.yaml``/``.pt``.
        key: config key named in errors.

    Returns:
        The Ultralytics YAML name (built from scratch, no download) or the absolute file path.

    Raises:
        DamageError: unknown name (the valid ones are listed) or a path that does not exist.
    """
    parsed = parse_name(model)
    if parsed is not None:
        fam, size = parsed
        return fam.yaml(size)
    if not is_path_like(model):
        raise _unknown(model, key)
    p = Path(model).expanduser()
    if not p.is_file():
        raise DamageError(f"{key} '{model}': file not found")
    return str(p.resolve())


def family_of(model: Any) -> Family | None:
    """The family of an Ultralytics model (``DetectionModel``/``SegmentationModel`` or ``YOLO``).

    Read from the YAML it was built from (``yolo11n-seg.yaml``); for models built from a custom
    YAML or rebuilt modules (pruned checkpoints), from its layers: a one-to-one head is YOLO26,
    C3k2 blocks YOLO11, C2f blocks (or their pruning twins) YOLOv8. None when nothing matches.
    """
    inner = getattr(model, "model", model)
    inner = inner if hasattr(inner, "modules") else model
    cfg = getattr(inner, "yaml", None)
    if isinstance(cfg, dict):
        m = re.match(r"^(" + "|".join(FAMILIES) + r")", Path(str(cfg.get("yaml_file", ""))).name)
        if m:
            return FAMILIES[m[1]]
    types = {type(x).__name__ for x in inner.modules()} if hasattr(inner, "modules") else set()
    head = getattr(getattr(inner, "model", [None])[-1], "one2one_cv2", None) if hasattr(inner, "model") else None
    if head is not None or "Segment26" in types:
        return FAMILIES["yolo26"]
    if "C3k2" in types or "C2PSA" in types or "C2PSA_v2" in types:  # C2PSA_v2: a pruned YOLO11
        return FAMILIES["yolo11"]
    if "C2f" in types or "C2f_v2" in types:
        return FAMILIES["yolov8"]
    return None


def family_name(model: Any) -> str:
    """``family_of(model).name``, or ``"unknown family"`` for error messages."""
    fam = family_of(model)
    return fam.name if fam else "unknown family"
