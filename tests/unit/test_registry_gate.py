"""The gate rule, decisions and the approver check, without any server."""

from __future__ import annotations

import pytest

import damage.model_registry as mr
from damage.model_registry.gate import BOX, LATENCY, MASK, class_floors, failed_classes
from damage.model_registry.registry import AliasMove, check_approver
from damage.tasks.core.errors import GateFailed


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


# ----------------------------------------------------------------------------- per-class floors and regressions

CLASSES = ("vehicle", "dent", "scratch")
FLOORS = {c: 0.1 for c in CLASSES}


def mc(mask=0.3, box=0.3, **ap50):
    """Aggregates plus per-class mask AP50 (``mask_ap50/<class>``), all classes 0.5 unless given."""
    return {**m(mask, box), **{f"mask_ap50/{c}": ap50.get(c, 0.5) for c in CLASSES}}


def test_gate_refuses_a_class_under_its_floor_and_names_it():
    # aggregates far above every aggregate floor: only the per-class floor can refuse it
    ok, reasons = mr.compare(mc(0.6, 0.6, dent=0.04), None, **KW, min_class_ap50=FLOORS)
    assert not ok
    assert "class dent: mask AP50 0.040 < floor 0.100" in reasons
    assert not any("scratch" in r and "<" in r for r in reasons)
    assert failed_classes(mc(0.6, 0.6, dent=0.04), None, FLOORS, 0.02) == ["dent"]


def test_gate_refuses_a_per_class_regression_against_production():
    prod = mc(0.3, 0.3, scratch=0.6)
    cand = mc(0.35, 0.35, scratch=0.5)  # better aggregates, one class 0.1 worse than production
    ok, reasons = mr.compare(cand, prod, **KW, min_class_ap50=FLOORS)
    assert not ok
    assert any(r.startswith("class scratch: mask AP50 0.500 vs production 0.600: dropped 0.100") for r in reasons)
    assert failed_classes(cand, prod, FLOORS, 0.02) == ["scratch"]
    # a dedicated per-class tolerance that allows the drop lets it pass
    assert mr.compare(cand, prod, **KW, min_class_ap50=FLOORS, class_tolerance=0.15)[0]


def test_gate_passes_a_good_candidate():
    ok, reasons = mr.compare(mc(0.32, 0.31, dent=0.52), mc(0.3, 0.3), **KW, min_class_ap50=FLOORS)
    assert ok, reasons
    assert reasons[-1].startswith("per-class mask AP50 ok: vehicle 0.500 (production 0.500), dent 0.520")


def test_gate_fails_closed_without_per_class_figures_or_labels():
    ok, reasons = mr.compare(m(0.9, 0.9), None, **KW, min_class_ap50={})
    assert not ok and "aggregate metrics alone never stage a model" in reasons[-1]
    nan = float("nan")
    ok, reasons = mr.compare(mc(dent=nan), None, **KW, min_class_ap50=FLOORS)
    assert not ok and "class dent: no labelled instance in the gate's data, floor 0.100 cannot be checked" in reasons
    assert mr.compare(mc(dent=nan), None, **KW, min_class_ap50={**FLOORS, "dent": 0.0})[0]


def test_class_floors_spec():
    assert class_floors(0.2, list(CLASSES)) == {"vehicle": 0.2, "dent": 0.2, "scratch": 0.2}
    assert class_floors({"dent": 0.3}, list(CLASSES)) == {"vehicle": 0.1, "dent": 0.3, "scratch": 0.1}
    with pytest.raises(mr.RegistryError, match="names dnet, not a class of the model"):
        class_floors({"dnet": 0.3}, list(CLASSES))


def test_config_min_class_ap50():
    from damage.tasks.core.config import ConfigError
    from damage.tasks.core.config_load import load_config

    assert load_config().registry.min_class_ap50 == 0.1
    cfg = load_config(overrides=["registry.min_class_ap50={dent: 0.3, scratch: 0.2}"])
    assert cfg.registry.min_class_ap50 == {"dent": 0.3, "scratch": 0.2}
    with pytest.raises(ConfigError, match="min_class_ap50"):
        load_config(overrides=["registry.min_class_ap50=1.5"])


def test_gate_doctests():
    import doctest

    import damage.model_registry.gate as gate

    res = doctest.testmod(gate)
    assert res.attempted >= 4 and res.failed == 0
