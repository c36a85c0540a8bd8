"""Keep optional third-party runtimes offline and out of the home dir (standard library only).

OpenVINO imports its model-conversion tools at ``import openvino``; they start OpenVINO's telemetry,
which writes a client id under ``~/intel`` at once and sends usage data to Google Analytics by default
(NNCF does the same). The project keeps every file in its state dir and sends nothing, so the
telemetry package is made unimportable before either is imported: both then use their own no-op
stubs. Shipped with the registered model (the predictor's OpenVINO backend calls it).
"""

from __future__ import annotations

import sys

TELEMETRY_MODULE = "openvino_telemetry"


def quiet_openvino() -> bool:
    """Block ``openvino_telemetry`` for this process; True when blocked (False: it was imported already,
    by code that ran before, and cannot be taken back)."""
    if sys.modules.get(TELEMETRY_MODULE, None) is not None:
        return False
    sys.modules[TELEMETRY_MODULE] = None  # `import openvino_telemetry` now raises ImportError
    return True
