"""Registered versions of tiny constant-output ONNX models for the serving tests (no training)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np

from tests.unit.test_issue13_serving import fake_onnx


def png_b64(value: int = 120, side: int = 64, seed: int = 0) -> str:
    """A small noisy PNG of mean grey ``value``, base64."""
    import cv2

    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal(value, 12, (side, side, 3)), 0, 255).astype(np.uint8)
    ok, png = cv2.imencode(".png", img)
    return base64.b64encode(png.tobytes()).decode()


def request_body(b64: str) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[b64]]}}).encode()


def register(client, name: str, onnx: Path, tmp: Path) -> str:
    """Log ``onnx`` as the pyfunc in a new run and register it; returns the version."""
    from damage.tasks.core import tracking
    from damage.tasks.serving.pyfunc import log_pyfunc

    exp = tracking.ensure_experiment(client, "serving-tests")
    run_id = tracking.start_run(client, exp, f"reg-{onnx.stem}")
    uri = log_pyfunc(client, onnx, run_id=run_id)
    tracking.end_run(client, run_id)
    try:
        client.create_registered_model(name)
    except Exception:
        pass
    mv = client.create_model_version(name, uri, run_id=run_id)
    return str(mv.version)


def versions(client, name: str, tmp: Path) -> dict[str, str]:
    """v1: one dent box; v2: two dent boxes; v3: one vehicle box; broken: an ONNX file that does not load."""
    out = {}
    out["one"] = register(client, name, fake_onnx(tmp / "one.onnx", [(100, 100, 300, 300)]), tmp)
    out["two"] = register(client, name, fake_onnx(tmp / "two.onnx", [(100, 100, 300, 300), (350, 350, 500, 500)]),
                          tmp)
    out["vehicle"] = register(client, name, fake_onnx(tmp / "veh.onnx", [(90, 90, 320, 320)], cls=0), tmp)
    bad = tmp / "broken.onnx"
    bad.write_bytes(b"not an onnx model")
    out["broken"] = register(client, name, bad, tmp)
    return out


def move_production(client, name: str, version: str, by: str = "approver") -> None:
    """Move ``production`` as an approval does (issue 31): freeze the version into its approval record, then move
    both aliases; serving verifies against that record. (The approver's login and the staging rule are tested
    with the registry; here only the record matters.)"""
    from damage.model_registry.frozen import approved_name, freeze_version

    record = freeze_version(client, name, version, by, "serving test")
    client.set_registered_model_alias(name, "production", version)
    client.set_registered_model_alias(approved_name(name), "production", record)
