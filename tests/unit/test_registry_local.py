"""Registry functions against a local SQLite store (no server): input errors and the lock."""

from __future__ import annotations

import time

import pytest
from mlflow.exceptions import MlflowException

import damage.model_registry as mr
from damage.model_registry.lock import TAG_HOLDER, TAG_OWNER, TAG_TTL, lock_name
from tests.helpers import LINEAGE, sqlite_client


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    return sqlite_client(tmp_path_factory.mktemp("reg-unit"))


@pytest.fixture(scope="module")
def run_id(client):
    return client.create_run(client.create_experiment("unit")).info.run_id


def test_register_names_missing_file(client, run_id, tmp_path):
    with pytest.raises(mr.RegistryError, match=r"missing\.onnx: model file not found"):
        mr.register_candidate(client, "unit-m", run_id, tmp_path / "missing.onnx", None, {}, {}, LINEAGE)


def test_register_requires_lineage(client, run_id, tmp_path):
    f = tmp_path / "a.onnx"
    f.write_bytes(b"x")
    with pytest.raises(mr.RegistryError, match="lacks config_hash, code_version"):
        mr.register_candidate(client, "unit-m", run_id, f, None, {}, {}, {"dataset_fingerprint": "d"})


def test_register_sets_pending_tags_and_parent(client, run_id, tmp_path):
    f = tmp_path / "a.onnx"
    f.write_bytes(b"x")
    v = mr.register_candidate(client, "unit-m", run_id, f, None, {"mask/mAP50-95": 0.25}, {"conf": 0.3},
                              {**LINEAGE, "parent_version": "4"})
    assert (v.approval, v.validation_status, v.tags["parent_version"]) == ("pending", "pending", "4")
    assert v.tags["source_run_id"] == run_id and "artifact.pt" not in v.tags
    assert v.metrics == {"mask/mAP50-95": 0.25}
    with pytest.raises(mr.PromotionRefused, match="not at 'staging'|has not passed the gate"):
        mr.approve(client, "unit-m", v.version, by="a", reason="r")
    with pytest.raises(mr.RegistryError, match="approver name"):
        mr.approve(client, "unit-m", v.version, by=" ", reason="r")
    with pytest.raises(mr.RegistryError, match="has no version 999"):
        mr.approve(client, "unit-m", "999", by="a", reason="r")


def test_lock_times_out_naming_holder_and_breaks_stale(client):
    client.create_registered_model("unit-lock")
    with mr.registry_lock(client, "unit-lock", holder="first"):
        with pytest.raises(mr.RegistryLockTimeout, match="held by 'first'"):
            with mr.registry_lock(client, "unit-lock", holder="second", timeout_s=0.3):
                pass
    # a holder that died: its lease ran out (server time), so the next caller breaks the lock
    client.create_registered_model(lock_name("unit-lock"), tags={TAG_OWNER: "dead", TAG_HOLDER: "dead",
                                                                 TAG_TTL: "0.2"})
    time.sleep(0.3)
    with mr.registry_lock(client, "unit-lock", holder="third", timeout_s=5):
        assert client.get_registered_model(lock_name("unit-lock")).tags[TAG_HOLDER] == "third"
    with pytest.raises(MlflowException) as gone:  # released
        client.get_registered_model(lock_name("unit-lock"))
    assert gone.value.error_code == "RESOURCE_DOES_NOT_EXIST"


def test_lock_retries_when_the_holder_released_during_create(client):
    """MLflow's SQL store reads the existing model after a name clash; released in between, the create
    fails with RESOURCE_DOES_NOT_EXIST (seen with two processes on PostgreSQL): that is contention, not an error."""
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    calls = []

    class Racing:
        def __getattr__(self, attr):
            return getattr(client, attr)

        def create_registered_model(self, name, **kw):
            calls.append(name)
            if len(calls) == 1:
                raise MlflowException(f"Registered Model with name={name} not found", RESOURCE_DOES_NOT_EXIST)
            return client.create_registered_model(name, **kw)

    with mr.registry_lock(Racing(), "race-m", holder="me", timeout_s=5, poll_s=0.01):
        assert client.get_registered_model(lock_name("race-m")).tags[TAG_HOLDER] == "me"
    assert calls == [lock_name("race-m")] * 2
    with pytest.raises(MlflowException, match="RESOURCE_DOES_NOT_EXIST|not found"):
        client.get_registered_model(lock_name("race-m"))  # released


def test_gate_tags_failed_classes_on_the_version(client, run_id, tmp_path):
    """A blind candidate (great aggregates, one class at 0) is refused; the class is named in the tags."""
    import json

    from damage.tasks.core.config import RegistryConfig

    scores = {"mask/mAP50-95": 0.5, "box/mAP50-95": 0.5, "latency_ms": 5.0,
              "mask_ap50/vehicle": 0.99, "mask_ap50/dent": 0.0, "mask_ap50/scratch": float("nan")}
    f = tmp_path / "blind.onnx"
    f.write_text(json.dumps(scores))
    v = mr.register_candidate(client, "unit-gate", run_id, f, None, {}, {}, LINEAGE)
    d = mr.gate_candidate(client, "unit-gate", v.version, lambda p: json.loads(p.read_text()),
                          RegistryConfig(min_class_ap50={"scratch": 0.0}), work_dir=tmp_path)
    assert not d.passed and d.failed_classes == ["dent"]
    tags = mr.list_versions(client, "unit-gate")[0].tags
    assert tags["gate.failed_classes"] == "dent" and tags["validation_status"] == "failed"
    assert "class dent: mask AP50 0.000 < floor 0.100" in tags["gate.reasons"]
    assert mr.alias_version(client, "unit-gate", mr.STAGING) is None
