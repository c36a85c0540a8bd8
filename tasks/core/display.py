"""How numbers are shown to people: one rule for every CLI table, Prefect artifact, model card, gate
reason and notification.

Metric values are shown with 3 decimals (``0.512``); times in milliseconds (keys ending in ``_ms``,
e.g. ``latency_ms``) with 1 (``12.3``). Only what is displayed is rounded: MLflow metrics, JSON
output (``--json``), CSV files and report.json keep full precision.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

DECIMALS = 3  # metric values as displayed
MS_DECIMALS = 1  # durations in milliseconds as displayed
MISSING = "–"  # a value that was not measured (None) or is undefined (NaN)


def decimals_for(key: str = "") -> int:
    """Decimals shown for the metric ``key`` (``latency_ms``, ``speed/inference_ms``: 1; any other: 3)."""
    return MS_DECIMALS if key.endswith("_ms") else DECIMALS


def round_metric(value: Any, key: str = "") -> Any:
    """``value`` rounded for display but kept a number (table artifacts sort numerically).

    Non-finite floats become None (shown as empty); ints, bools and non-numbers are returned as they are.

    Example:
        >>> round_metric(0.51249, "mask/mAP50"), round_metric(12.345, "latency_ms"), round_metric(7)
        (0.512, 12.3, 7)
    """
    if isinstance(value, bool) or isinstance(value, Integral) or not isinstance(value, Real):
        return value
    v = float(value)
    return round(v, decimals_for(key)) if math.isfinite(v) else None


def fmt_metric(value: Any, key: str = "", missing: str = MISSING) -> str:
    """``value`` as displayed text: 3 decimals (1 for ``*_ms`` keys); ints as they are; None/NaN as ``missing``.

    Example:
        >>> fmt_metric(0.5), fmt_metric(None), fmt_metric(float("nan"), missing="-"), fmt_metric(12, "images")
        ('0.500', '–', '-', '12')
    """
    if value is None:
        return missing
    if isinstance(value, bool) or isinstance(value, Integral) or not isinstance(value, Real):
        return str(value)
    v = float(value)
    if math.isnan(v):
        return missing
    return f"{v:.{decimals_for(key)}f}" if math.isfinite(v) else str(v)


# Numeric format of a registered artifact, by the kind of its variant (tasks/export/compress.py kinds).
_PRECISION_BY_KIND = {"fp16": "FP16"}


def artifact_precision(kind: str | None) -> str:
    """``INT8``, ``FP16`` or ``FP32``: the numeric format of a variant of ``kind``.

    Example:
        >>> artifact_precision("int8-static"), artifact_precision("fp16"), artifact_precision("trained")
        ('INT8', 'FP16', 'FP32')
    """
    kind = (kind or "trained").lower()
    return "INT8" if kind.startswith("int8") else _PRECISION_BY_KIND.get(kind, "FP32")
