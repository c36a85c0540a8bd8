"""The pyfunc model logged to MLflow answers a real HTTP request from ``mlflow models serve``."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SCHEMA_TOP = {"image", "width", "height", "model", "conf", "iou", "instances", "vehicles", "damage_percent", "note"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _export(tiny_model: Path) -> Path:
    from damage.tasks.export.onnx import export_onnx

    out = tiny_model.with_suffix(".onnx")  # what export_step writes (tests/model/test_export_predictor.py)
    if not out.exists():
        export_onnx(tiny_model, out, 96, metadata={"conf": 0.4, "iou": 0.55, "objective": "mask_f1",
                                                   "dataset_fingerprint": "fp-test", "source_run_id": "run-test"})
    return out


def test_pyfunc_in_process_and_served_over_http(tiny_model, tiny_dataset, state_paths, tmp_path):
    import mlflow
    import pandas as pd

    from damage.tasks.core import tracking
    from damage.tasks.serving.pyfunc import log_pyfunc

    onnx_path = _export(tiny_model)
    c = tracking.client()
    exp = tracking.ensure_experiment(c, "serving-test")
    run_id = tracking.start_run(c, exp, "serving")
    uri = log_pyfunc(run_id, onnx_path)
    tracking.end_run(c, run_id)
    assert uri == f"runs:/{run_id}/pyfunc"

    img = sorted((tiny_dataset.parent / "images" / "val").glob("*.png"))[0]
    b64 = base64.b64encode(img.read_bytes()).decode()

    # in process: base64 row, path row, and a bad row that becomes an error entry; path input is
    # off unless the server names the one folder it may read (issue 13)
    os.environ["DAMAGE_SERVING_PATH_ROOT"] = str(img.parent)
    model = mlflow.pyfunc.load_model(uri)
    out = model.predict(pd.DataFrame({"image": [b64, None, "!!notbase64"], "path": [None, str(img), None]}))
    assert set(out[0]) == SCHEMA_TOP and out[0]["width"] == 96 and out[0]["conf"] == pytest.approx(0.4)
    assert out[1]["instances"] == out[0]["instances"]
    assert "error" in out[2]
    os.environ.pop("DAMAGE_SERVING_PATH_ROOT")
    low = model.predict(pd.DataFrame({"image": [b64]}), params={"conf": 0.0001})
    assert low[0]["conf"] == 0.0001 and len(low[0]["instances"]) >= len(out[0]["instances"])

    # over HTTP, the way the registry's production model is served
    port = _free_port()
    # the server execs `uvicorn`: the venv's bin must be on PATH even when the venv is not activated
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    proc = subprocess.Popen([mlflow_bin, "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1",
                             "-p", str(port), "-w", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.time() + 240
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log = proc.stdout.read().decode(errors="replace") if proc.poll() is not None else ""
                pytest.fail(f"server did not come up (rc {proc.poll()}): {log[-3000:]}")
            time.sleep(1)
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[b64]]},
                           "params": {"conf": 0.0001}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            reply = json.loads(r.read())
        preds = reply["predictions"]
        assert len(preds) == 1 and set(preds[0]) == SCHEMA_TOP
        assert preds[0]["model"] == onnx_path.name and preds[0]["conf"] == pytest.approx(0.0001)
        assert preds[0]["instances"] == low[0]["instances"]
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
