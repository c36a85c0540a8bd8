"""Plain-JSON values from metric dicts (MLflow ``log_dict``, Prefect artifacts, report files)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def json_safe(x: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, recursively (JSON and Prefect artifacts).

    Example:
        >>> json_safe({"map": np.float32(0.5), "ap": [float("nan")]})
        {'map': 0.5, 'ap': [None]}
    """
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x
