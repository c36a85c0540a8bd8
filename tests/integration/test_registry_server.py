"""Registry lifecycle against a real ``mlflow server`` (SQLite, and PostgreSQL when reachable)."""

from __future__ import annotations

import uuid

import pytest
from conftest import fake_evaluate  # tests/integration/conftest.py (first on sys.path here)

import damage.model_registry as mr
from damage.tasks.core.config import RegistryConfig

pytestmark = pytest.mark.integration


APPROVERS = ["alice", "bob", "carol", "dave"]


def _act(fn, *args, by: str, **kw):
    """Call approve/reject/rollback as the MLflow account ``by``. This server has no auth (the lifecycle on
    SQLite/PostgreSQL is what is tested): against such a server approvals are refused (issue 31 item 13,
    ``test_issue31_more.py``), so the server's confirmation of the account is stood in for here."""
    import os

    import damage.model_registry.registry as reg

    old, confirm = os.environ.get("MLFLOW_TRACKING_USERNAME"), reg.confirmed_identity
    os.environ["MLFLOW_TRACKING_USERNAME"] = by
    reg.confirmed_identity = lambda _uri: by
    try:
        return fn(*args, by=by, approvers=APPROVERS, **kw)
    finally:
        reg.confirmed_identity = confirm
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_USERNAME", None)
        else:
            os.environ["MLFLOW_TRACKING_USERNAME"] = old


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_register_gate_approve_rollback(registry_server, make_candidate, tmp_path):
    c = _client(registry_server)
    name = f"damage-{uuid.uuid4().hex[:8]}"
    cfg = RegistryConfig(tolerance=0.02, floor_mask_map=0.1, latency_budget_ms=50)
    evaluated = []

    def evaluate(p):
        evaluated.append(p.name)
        return fake_evaluate(p)

    # v1: first candidate, no production -> judged against the floor, staged, approved.
    v1 = make_candidate(c, name, mask=0.30, box=0.35,
                        lineage={"source_run_id": "src-run", "parent_version": ""})
    info = mr.list_versions(c, name)[0]
    assert info.tags["validation_status"] == "pending" and info.approval == "pending"
    assert info.tags["dataset_fingerprint"] == "ds0" and info.tags["source_run_id"] == "src-run"
    assert info.metrics["mask/mAP50-95"] == pytest.approx(0.30)
    assert info.tags["threshold.conf"] == "0.4"
    assert info.tags["artifact.onnx"].endswith("/model/model.onnx")
    run_files = {f.path for f in c.list_artifacts(info.run_id, "model")}
    assert run_files == {"model/model.onnx", "model/model.pt"}

    with pytest.raises(mr.PromotionRefused, match="not passed the gate"):
        _act(mr.approve, c, name, v1, by="alice", reason="too early")
    d1 = mr.gate_candidate(c, name, v1, evaluate, cfg)
    assert d1.passed and d1.production is None and "floor" in d1.reasons[0]
    assert mr.alias_version(c, name, mr.STAGING) == v1
    _act(mr.approve, c, name, v1, by="alice", reason="first model")
    assert mr.alias_version(c, name, mr.PRODUCTION) == v1
    assert mr.alias_version(c, name, mr.STAGING) is None
    t1 = mr.list_versions(c, name)[0].tags
    assert (t1["approval"], t1["approved_by"], t1["reason"]) == ("approved", "alice", "first model")
    assert t1["approved_at"]

    # v2: worse than production beyond tolerance -> gate fails, stays off staging, cannot be approved.
    evaluated.clear()
    v2 = make_candidate(c, name, mask=0.20, box=0.35)
    d2 = mr.gate_candidate(c, name, v2, evaluate, cfg)
    assert not d2.passed and d2.production_version == v1
    assert d2.production == fake_evaluate_from(c, name, v1, tmp_path)  # production re-scored now
    assert len(evaluated) == 2  # candidate and production in the same call
    tags2 = {v.version: v for v in mr.list_versions(c, name)}[v2].tags
    assert tags2["validation_status"] == "failed" and tags2["gate.decision"] == "failed"
    assert float(tags2["gate.production.mask/mAP50-95"]) == pytest.approx(0.30)
    with pytest.raises(mr.PromotionRefused, match="not passed the gate"):
        _act(mr.approve, c, name, v2, by="alice", reason="override")
    with pytest.raises(Exception, match="failed the promotion gate"):
        d2.raise_if_failed()

    # v3: passes, then rejected -> can never be approved.
    v3 = make_candidate(c, name, mask=0.31, box=0.34)
    assert mr.gate_candidate(c, name, v3, evaluate, cfg).passed
    _act(mr.reject, c, name, v3, by="bob", reason="artefacts on glass")
    assert mr.alias_version(c, name, mr.STAGING) is None
    with pytest.raises(mr.PromotionRefused, match="rejected"):
        _act(mr.approve, c, name, v3, by="alice", reason="changed my mind")

    # v4: over the latency budget -> fails even though accuracy is fine.
    v4 = make_candidate(c, name, mask=0.40, box=0.40, latency_ms=80)
    assert not mr.gate_candidate(c, name, v4, evaluate, cfg).passed

    # v5: better -> staged -> approved; staging is not enough for a version staged earlier.
    v5 = make_candidate(c, name, mask=0.33, box=0.36)
    assert mr.gate_candidate(c, name, v5, evaluate, cfg).passed
    _act(mr.approve, c, name, v5, by="carol", reason="better masks")
    assert mr.alias_version(c, name, mr.PRODUCTION) == v5

    # rollback -> back to v1; a second rollback has nowhere to go.
    move = _act(mr.rollback, c, name, by="dave", reason="customer complaints")
    assert (move.version_from, move.version_to) == (v5, v1)
    assert mr.alias_version(c, name, mr.PRODUCTION) == v1
    with pytest.raises(mr.RegistryError, match="no earlier approved version"):
        _act(mr.rollback, c, name, by="dave", reason="again")

    hist = mr.history(c, name)
    prod = [(h.action, h.version_from, h.version_to, h.by) for h in hist if h.alias == mr.PRODUCTION]
    assert prod == [("approve", None, v1, "alice"), ("approve", v1, v5, "carol"), ("rollback", v5, v1, "dave")]
    assert [h.seq for h in hist] == sorted(h.seq for h in hist)
    assert all(h.at and h.reason for h in hist)
    staging = [(h.action, h.version_to) for h in hist if h.alias == mr.STAGING]
    assert staging == [("gate", v1), ("approve", None), ("gate", v3), ("reject", None), ("gate", v5), ("approve", None)]


def fake_evaluate_from(client, name, version, tmp_path):
    return fake_evaluate(mr.download_onnx(client, name, version, tmp_path / f"dl-{version}"))


def test_gate_refuses_decided_versions(registry_server, make_candidate):
    c = _client(registry_server)
    name = f"damage-{uuid.uuid4().hex[:8]}"
    v = make_candidate(c, name, mask=0.3, box=0.3)
    _act(mr.reject, c, name, v, by="bob", reason="no")
    with pytest.raises(mr.PromotionRefused, match="already rejected"):
        mr.gate_candidate(c, name, v, fake_evaluate, RegistryConfig())
