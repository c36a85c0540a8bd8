"""Issue 13, items 1-3 and 5: who may move ``production``, config-only gates, idempotent registration,
tags before alias. Local SQLite registry (no server) unless stated."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import yaml

import damage.model_registry as mr
from damage.tasks.core.config import CLASSES, ConfigError, RegistryConfig
from tests.helpers import LINEAGE, sqlite_client

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    d = tmp_path_factory.mktemp("reg13")
    c = sqlite_client(d)
    c.create_experiment("t", artifact_location=(d / "artifacts").as_uri())
    return c


@pytest.fixture(autouse=True)
def anonymous(monkeypatch):
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "DAMAGE_REGISTRY_CONFIG", "DAMAGE_CONFIG"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", "/nonexistent-home-for-mlflow-credentials")


def _candidate(client, tmp_path, name: str, scores: dict, run_id: str | None = None) -> str:
    exp = client.get_experiment_by_name("t")
    run_id = run_id or client.create_run(exp.experiment_id).info.run_id
    f = tmp_path / f"{run_id}.onnx"
    f.write_text(json.dumps(scores))
    return mr.register_candidate(client, name, run_id, f, None, scores, {}, LINEAGE).version


def _eval(onnx: Path) -> dict:
    return json.loads(Path(onnx).read_text())


# per-class figures too: the gate never stages on aggregate metrics alone
GOOD = {"mask/mAP50-95": 0.5, "box/mAP50-95": 0.5, "latency_ms": 1.0,
        **{f"mask_ap50/{c}": 0.5 for c in CLASSES}}
BAD = {"mask/mAP50-95": 0.01, "box/mAP50-95": 0.01, "latency_ms": 1.0}


# ---- item 1 ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("action", ["approve", "reject", "rollback"])
def test_13_01_no_approvers_refused_on_a_tracking_server(action):
    """Against http(s) an empty approver list refuses before any request (port 1 is never contacted)."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri="http://user:pw@127.0.0.1:1", registry_uri="http://user:pw@127.0.0.1:1")
    call = {"approve": lambda: mr.approve(c, "m", "1", by="x", reason="r", approvers=[]),
            "reject": lambda: mr.reject(c, "m", "1", by="x", reason="r", approvers=None),
            "rollback": lambda: mr.rollback(c, "m", by="x", reason="r", approvers=[])}[action]
    with pytest.raises(mr.AccessDenied, match=r"no approvers are configured") as e:
        call()
    assert "pw" not in str(e.value) and "http://127.0.0.1:1" in str(e.value)


def test_13_01_identity_not_on_the_list_refused(monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "pipeline")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "x")
    c = MlflowClient(tracking_uri="https://127.0.0.1:1", registry_uri="https://127.0.0.1:1")
    with pytest.raises(mr.AccessDenied, match="'pipeline' may not approve .* only approver may move"):
        mr.approve(c, "m", "1", by="pipeline", reason="r", approvers=["approver"])


def test_13_01_compose_has_auth_accounts_and_loopback_ports():
    spec = yaml.safe_load((REPO / "infra" / "docker-compose.yml").read_text())
    svc = spec["services"]
    mlflow_cmd = svc["mlflow"]["command"]
    assert "--app-name" in mlflow_cmd and mlflow_cmd[mlflow_cmd.index("--app-name") + 1] == "basic-auth"
    text = (REPO / "infra" / "docker-compose.yml").read_text()
    for var in ("MLFLOW_ADMIN_PASSWORD", "MLFLOW_PIPELINE_PASSWORD", "MLFLOW_APPROVER_PASSWORD",
                "MLFLOW_FLASK_SECRET_KEY"):
        assert f"${{{var}:?" in text, f"{var} must be required (${{{var}:?...}}), no default password"
    for name, s in svc.items():
        for port in s.get("ports", []):
            assert str(port).startswith("${BIND_ADDRESS:-127.0.0.1}:"), f"{name} publishes {port} on every interface"
    assert svc["worker"]["environment"]["MLFLOW_TRACKING_USERNAME"]
    assert "MLFLOW_TRACKING_PASSWORD" in svc["worker"]["environment"]
    assert any("damage.model_registry.auth" in " ".join(map(str, s.get("command", []))) for s in svc.values())


# ---- item 2 ------------------------------------------------------------------------------------------

def test_13_02_failed_version_is_never_regated(client, tmp_path):
    v = _candidate(client, tmp_path, "m2", BAD)
    d = mr.gate_candidate(client, "m2", v, _eval, RegistryConfig(floor_mask_map=0.3))
    assert not d.passed
    with pytest.raises(mr.PromotionRefused, match=r"already failed the gate .* register a new version"):
        mr.gate_candidate(client, "m2", v, _eval, RegistryConfig(tolerance=1e9, floor_mask_map=0.0))
    assert mr.alias_version(client, "m2", mr.STAGING) is None


def test_13_02_gate_config_is_not_a_run_parameter(monkeypatch, tmp_path):
    from damage.flows.deploy import build_deployments
    from damage.flows.promote import promote
    from damage.tasks.core.config_load import (
        apply_worker_registry,
        load_config,
        pin_worker_registry,
        worker_registry_config,
    )
    from damage.tasks.nightly.pipeline import prepare_state

    assert "registry" not in inspect.signature(promote.fn).parameters
    cfg = load_config(overrides=["registry.approvers=[alice]", "registry.tolerance=0.02"])
    deps = {d.name: d for d in build_deployments(cfg, schedule=False)}
    assert "registry" not in deps["promote"].parameters
    pin_worker_registry(cfg)
    assert worker_registry_config() == cfg.registry
    with pytest.raises(ConfigError, match=r"'registry.tolerance' is not allowed"):
        prepare_state(None, ["registry.tolerance=1e9"])
    # a config file given as a run parameter does not bring its own registry section either
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "s"), "registry": {"tolerance": 5.0}}))
    got = apply_worker_registry(load_config(other), [])
    assert got.registry.tolerance == 0.02 and got.registry.approvers == ["alice"]


def test_13_02_by_must_match_the_authenticated_identity(client, tmp_path, monkeypatch):
    v = _candidate(client, tmp_path, "m2b", GOOD)
    assert mr.gate_candidate(client, "m2b", v, _eval, RegistryConfig()).passed
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "x")
    with pytest.raises(mr.AccessDenied, match=r"--by 'bob' does not match the authenticated MLflow user 'alice'"):
        mr.approve(client, "m2b", v, by="bob", reason="r", approvers=["alice"])
    assert mr.alias_version(client, "m2b", mr.PRODUCTION) is None
    info = mr.approve(client, "m2b", v, by="alice", reason="r", approvers=["alice"])
    assert info.tags["approved_via"] == "alice" and info.tags["approved_by"] == "alice"


# ---- item 3 ------------------------------------------------------------------------------------------

def test_13_03_registration_is_idempotent_per_source_run(client, tmp_path, monkeypatch):
    run_id = client.create_run(client.get_experiment_by_name("t").experiment_id).info.run_id
    real = client.create_model_version
    calls = []

    def flaky(*a, **kw):  # the server creates the version, then the reply is lost
        calls.append(1)
        real(*a, **kw)
        if len(calls) == 1:
            raise ConnectionError("connection reset after create_model_version")
        raise AssertionError("a second create_model_version must not happen")

    monkeypatch.setattr(client, "create_model_version", flaky)
    f = tmp_path / "a.onnx"
    f.write_text(json.dumps(GOOD))
    with pytest.raises(ConnectionError):
        mr.register_candidate(client, "m3", run_id, f, None, GOOD, {}, LINEAGE)
    again = mr.register_candidate(client, "m3", run_id, f, None, GOOD, {}, LINEAGE)  # the task's retry
    versions = client.search_model_versions("name='m3'")
    assert len(versions) == 1 and again.version == str(versions[0].version) and len(calls) == 1


# ---- item 5 ------------------------------------------------------------------------------------------

def test_13_05_approval_tags_before_alias(client, tmp_path, monkeypatch):
    v = _candidate(client, tmp_path, "m5", GOOD)
    assert mr.gate_candidate(client, "m5", v, _eval, RegistryConfig()).passed

    def crash(*a, **kw):
        raise RuntimeError("process killed")

    # crash while writing the approval tags: production must not have moved
    monkeypatch.setattr(client, "set_model_version_tag", crash)
    with pytest.raises(RuntimeError):
        mr.approve(client, "m5", v, by="a", reason="r")
    assert mr.alias_version(client, "m5", mr.PRODUCTION) is None
    monkeypatch.undo()
    # crash right after the tags: the version is approved but still staged; approving again finishes it
    import damage.model_registry.moves as moves

    real_move = moves.move_alias
    monkeypatch.setattr(moves, "move_alias", lambda c, n, alias, *a: crash() if alias == mr.PRODUCTION
                        else real_move(c, n, alias, *a))
    with pytest.raises(RuntimeError):
        mr.approve(client, "m5", v, by="a", reason="r")
    assert mr.alias_version(client, "m5", mr.PRODUCTION) is None
    assert mr.alias_version(client, "m5", mr.STAGING) == v
    monkeypatch.undo()
    info = mr.approve(client, "m5", v, by="a", reason="r")
    assert mr.alias_version(client, "m5", mr.PRODUCTION) == v and info.approval == "approved"
    assert int(info.tags["approval_seq"]) == mr.history(client, "m5")[-2].seq
