"""The gate rule, decisions and the approver check, without any server."""

from __future__ import annotations

import pytest

import model_registry as mr
from model_registry.gate import BOX, LATENCY, MASK
from model_registry.registry import AliasMove, check_approver
from tasks.core.errors import GateFailed


def m(mask, box, lat=10.0):
    return {MASK: mask, BOX: box, LATENCY: lat}


KW = dict(tolerance=0.02, latency_budget_ms=None, floor_mask_map=0.1)


@pytest.mark.parametrize("cand,prod,passed", [
    (m(0.30, 0.30), None, True),  # first model above the floor
    (m(0.05, 0.30), None, False),  # first model below the floor
    (m(0.29, 0.29), m(0.30, 0.30), True),  # slightly worse, within tolerance
    (m(0.27, 0.30), m(0.30, 0.30), False),  # mask worse than tolerance
    (m(0.30, 0.27), m(0.30, 0.30), False),  # box worse than tolerance
    (m(0.40, 0.40), m(0.30, 0.30), True),  # better
])
def test_compare_accuracy(cand, prod, passed):
    ok, reasons = mr.compare(cand, prod, **KW)
    assert ok is passed
    assert len(reasons) == (1 if prod is None else 2)


def test_compare_latency_budget():
    kw = {**KW, "latency_budget_ms": 20.0}
    assert mr.compare(m(0.4, 0.4, 19.0), None, **kw)[0]
    ok, reasons = mr.compare(m(0.4, 0.4, 21.0), m(0.3, 0.3), **kw)
    assert not ok and "budget" in reasons[-1] and ">" in reasons[-1]


def test_decision_figures_and_raise():
    d = mr.GateDecision("m", "3", False, ["mask worse"], m(0.2, 0.2), m(0.3, 0.3), "2")
    f = d.figures()
    assert f["gate.passed"] == 0.0 and f[f"gate.production.{MASK}"] == 0.3 and f[f"gate.candidate.{BOX}"] == 0.2
    with pytest.raises(GateFailed, match="version 3 failed the promotion gate: mask worse"):
        d.raise_if_failed()
    mr.GateDecision("m", "4", True, [], m(0.3, 0.3)).raise_if_failed()


def test_alias_move_roundtrip():
    a = AliasMove(7, "production", "2", None, "approve", "alice", "approver", "2026-01-01T00:00:00", "ok")
    assert AliasMove.from_json(a.to_json()) == a


def test_check_approver(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.setenv("HOME", "/nonexistent")  # no ~/.mlflow/credentials
    assert check_approver("m", [], "approve") is None  # no list: local use, no check
    with pytest.raises(mr.AccessDenied, match="'\\(anonymous\\)' may not approve 'm'"):
        check_approver("m", ["approver"], "approve")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "pipeline")
    with pytest.raises(mr.AccessDenied, match="only approver may move the 'production' alias"):
        check_approver("m", ["approver"], "approve")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "approver")
    assert check_approver("m", ["approver"], "approve") == "approver"
