"""Plain-JSON values from metric dicts (MLflow ``log_dict``, Prefect artifacts, report files, ``--json``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def json_safe(x: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, paths and other objects -> str, recursively.

    The one conversion for every JSON the project writes (reports, MLflow dicts, Prefect artifacts and
    the CLI's ``--json``), so a value reads the same wherever it is shown.

    Example:
        >>> json_safe({"map": np.float32(0.5), "ap": [float("nan")], "n": np.int64(3)})
        {'map': 0.5, 'ap': [None], 'n': 3}
    """
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.generic):
        return json_safe(x.item())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)
