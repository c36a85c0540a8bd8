"""``damage ui`` starts the MLflow and Prefect UIs on one state dir, prints both URLs, and Ctrl-C
stops both (no server left listening)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.integration.conftest import free_port


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status == 200
    except Exception:
        return False


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_damage_ui_starts_both_and_ctrl_c_stops_both(tmp_path):
    state = tmp_path / "state"
    mp, pp = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFECT_HOME")}
    env.update(DAMAGE_STATE_DIR=str(state), PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    out = tmp_path / "ui.out"
    with open(out, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "damage.flows.cli", "ui", "--mlflow-port", str(mp),
                                 "--prefect-port", str(pp)], env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 400  # the Prefect server is slow to start on a loaded 2-core box
        while time.monotonic() < deadline and not (_up(f"http://127.0.0.1:{mp}/health")
                                                   and _up(f"http://127.0.0.1:{pp}/api/health")):
            assert proc.poll() is None, out.read_text()[-3000:]
            time.sleep(0.5)
        assert _up(f"http://127.0.0.1:{mp}/health") and _up(f"http://127.0.0.1:{pp}/api/health"), out.read_text()
        text = out.read_text()
        assert f"MLflow UI : http://127.0.0.1:{mp}" in text and f"Prefect UI: http://127.0.0.1:{pp}" in text
        assert (state / "mlflow.db").exists() and (state / "prefect").is_dir()  # both on the same state dir
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert proc.wait(timeout=60) == 0, out.read_text()[-3000:]
        time.sleep(1)
        assert not _listening(mp) and not _listening(pp)
    finally:
        if proc.poll() is None:  # stop it the way a user would, so it stops its servers too
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
