"""End to end: the nightly flow on a tiny synthetic set, offline, under the Prefect harness."""

from __future__ import annotations

import ipaddress
import socket
import sys
import uuid
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
# A model name of its own: no production version exists for it, so with floor 0 the gate must pass.
MODEL = f"damage-seg-e2e-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def nightly_summary(prefect_harness, state_paths):
    from flows.nightly import nightly

    _AUDIT["attempts"].clear()
    _AUDIT["on"] = True
    try:
        summary = nightly(overrides=TINY + ["registry.floor_mask_map=0.0", f"registry.model_name={MODEL}"],
                          force=True)
    finally:
        _AUDIT["on"] = False
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
    assert name == MODEL
    mv = c.get_model_version(name, str(version))
    assert mv.run_id
    assert mv.tags["artifact.onnx"].endswith(".onnx")
    files = {a.path for a in c.list_artifacts(mv.run_id, "model")}
    assert {"model/MLmodel", "model/model.pt"} <= files  # the version is a pyfunc with the .pt beside it
    onnx_rel = mv.tags["artifact.onnx"].split("/model/", 1)[1]
    assert any(a.path.endswith(".onnx") for a in c.list_artifacts(mv.run_id, f"model/{Path(onnx_rel).parent}"))
    for k in ("box/mAP50", "box/mAP50-95", "mask/mAP50", "mask/mAP50-95"):
        assert 0.0 <= nightly_summary["metrics"][k] <= 1.0


def test_gate_passes_and_stages_the_new_version(nightly_summary):
    """The setup implies the outcome: a model name with no production version and floor 0.0, so the gate
    passes on the floor rule and ``staging`` points at tonight's version (production stays unset)."""
    from mlflow.tracking import MlflowClient

    import model_registry as mr

    c = MlflowClient(nightly_summary["tracking_uri"])
    name, version = nightly_summary["registered_model"], str(nightly_summary["registered_version"])
    mv = c.get_model_version(name, version)
    assert mv.tags["validation_status"] == "passed", mv.tags.get("gate.reasons")
    assert mv.tags["gate.decision"] == "passed" and mv.tags["gate.production_version"] == "none"
    assert "floor" in mv.tags["gate.reasons"] and "no production version" in mv.tags["gate.reasons"]
    assert mr.alias_version(c, name, mr.STAGING) == version
    assert mr.alias_version(c, name, mr.PRODUCTION) is None
    parent = c.get_run(nightly_summary["mlflow_run_id"])
    assert parent.data.tags["gate.decision"] == "passed"
