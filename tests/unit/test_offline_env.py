"""The runtime keeps optional libraries quiet too: NNCF's OpenVINO telemetry is stubbed out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_activate_stubs_nncf_telemetry(tmp_path):
    # a child without pytest in sys.modules (NNCF stubs itself under pytest) and without NNCF_CI
    env = {k: v for k, v in os.environ.items() if k != "NNCF_CI"}
    env.update(PYTHONPATH=str(ROOT), HOME=str(tmp_path / "home"))
    (tmp_path / "home").mkdir()

    def telemetry_type(activate: bool) -> str:
        code = ("from tasks.core.runtime import activate; activate(%r)\n" % str(tmp_path / "state") if activate
                else "") + "from nncf.telemetry.wrapper import telemetry\nprint(type(telemetry).__name__)\n"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.strip().splitlines()[-1]

    assert telemetry_type(activate=True) != "NNCFTelemetry"  # stubbed (NNCF's stub is a mock object)
    assert not (tmp_path / "home" / "intel").exists()  # no consent file written to the home dir
    assert telemetry_type(activate=False) == "NNCFTelemetry"  # the control: without it NNCF would report
