"""The runtime keeps optional libraries quiet too: OpenVINO's and NNCF's telemetry never start and
never write a client id into the home dir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _child(code: str, home: Path) -> str:
    # CI variables switch OpenVINO's telemetry off by themselves: the children run without them, as a user's would
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL", "NNCF_CI")}
    env.update(PYTHONPATH=str(ROOT), HOME=str(home))
    home.mkdir(parents=True, exist_ok=True)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_activate_blocks_openvino_and_nncf_telemetry(tmp_path):
    activate = f"from damage.tasks.core.runtime import activate; activate({str(tmp_path / 'state')!r})\n"
    probe = ("import openvino, nncf\nfrom nncf.telemetry.wrapper import telemetry\n"
             "print(type(telemetry).__name__)\n")
    assert _child(activate + probe, tmp_path / "home") != "NNCFTelemetry"  # NNCF's no-op stub
    assert not (tmp_path / "home" / "intel").exists()  # no client id / consent file in the home dir
    # the control: without the project's runtime both would start (and write ~/intel at import)
    assert _child(probe, tmp_path / "home2") == "NNCFTelemetry"
    assert (tmp_path / "home2" / "intel").exists()


def test_the_predictor_backend_blocks_it_too(tmp_path):
    """A process that only loads the predictor (served model, no runtime.activate) stays quiet as well."""
    code = "from damage.tasks.serving.backends import openvino_available\nprint(openvino_available())\n"
    assert _child(code, tmp_path / "home") == "True"
    assert not (tmp_path / "home" / "intel").exists()
