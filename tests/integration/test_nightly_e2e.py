"""End to end: the nightly flow on a tiny synthetic set, offline, under the Prefect harness."""

from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path

import pytest

_AUDIT = {"on": False, "attempts": []}


def _is_loopback(host) -> bool:
    if host in (None, "", "localhost") or (isinstance(host, str) and host.startswith("/")):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return str(host) == socket.gethostname()


def _audit(event: str, args) -> None:
    if not _AUDIT["on"]:
        return
    if event == "socket.connect":
        addr = args[1]
        if isinstance(addr, tuple) and not _is_loopback(addr[0]):
            _AUDIT["attempts"].append((event, addr))
    elif event == "socket.getaddrinfo":
        if not _is_loopback(args[0]):
            _AUDIT["attempts"].append((event, args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed; the flag scopes it to the test

TINY = [
    "data.synth.images=24", "data.synth.imgsz=96", "data.synth.val_fraction=0.25",
    "train.epochs=1", "train.imgsz=96", "train.batch=8",
    "explain.samples=1", "export.parity_images=2", "compress.enabled=false",
]


@pytest.fixture(scope="module")
def nightly_summary(prefect_harness, state_paths):
    import os

    from flows.nightly import nightly

    _AUDIT["attempts"].clear()
    _AUDIT["on"] = True
    # the registry section is the worker's (issue 13): pinned in the environment, not a run override
    old = os.environ.get("DAMAGE_REGISTRY_CONFIG")
    os.environ["DAMAGE_REGISTRY_CONFIG"] = '{"floor_mask_map": 0.0}'
    try:
        summary = nightly(overrides=TINY, force=True)
    finally:
        _AUDIT["on"] = False
        if old is None:
            os.environ.pop("DAMAGE_REGISTRY_CONFIG", None)
        else:
            os.environ["DAMAGE_REGISTRY_CONFIG"] = old
    return summary


def test_nightly_runs_offline(nightly_summary):
    assert _AUDIT["attempts"] == [], f"outbound network attempts: {_AUDIT['attempts'][:5]}"


def test_nightly_logs_runs_metrics_and_version(nightly_summary):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(nightly_summary["tracking_uri"])
    parent = c.get_run(nightly_summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.epochs"] == "1"
    children = c.search_runs([parent.info.experiment_id],
                             filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    steps = {r.data.tags.get("damage.step") for r in children}
    assert {"validate", "train", "evaluate", "sweep", "export"} <= steps
    train = next(r for r in children if r.data.tags.get("damage.step") == "train")
    hist = c.get_metric_history(train.info.run_id, "train/box_loss")
    assert len(hist) == 1 and hist[0].step == 0
    assert "mask/mAP50-95" in train.data.metrics or "final/mask/mAP50-95" in train.data.metrics
    arts = {a.path for a in c.list_artifacts(train.info.run_id)}
    assert {"results", "weights"} <= arts
    # registered candidate carries the ONNX
    name, version = nightly_summary["registered_model"], nightly_summary["registered_version"]
    mv = c.get_model_version(name, str(version))
    assert mv.run_id
    assert mv.tags["artifact.onnx"].endswith(".onnx") and mv.tags["validation_status"] in {"passed", "failed"}
    files = {a.path for a in c.list_artifacts(mv.run_id, "model")}
    assert {"model/MLmodel", "model/model.pt"} <= files  # the version is a pyfunc with the .pt beside it
    onnx_rel = mv.tags["artifact.onnx"].split("/model/", 1)[1]
    assert any(a.path.endswith(".onnx") for a in c.list_artifacts(mv.run_id, f"model/{Path(onnx_rel).parent}"))
    for k in ("box/mAP50", "box/mAP50-95", "mask/mAP50", "mask/mAP50-95"):
        assert 0.0 <= nightly_summary["metrics"][k] <= 1.0
