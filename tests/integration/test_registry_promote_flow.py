"""The promotion flow pauses after the gate and completes once an approver decided with their own login."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from conftest import fake_evaluate  # tests/integration/conftest.py

import damage.model_registry as mr

pytestmark = pytest.mark.integration


def _paused_run_id(run_name: str, timeout_s: float = 120):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_name])))
            if runs and runs[0].state and runs[0].state.is_paused():
                return runs[0].id
            time.sleep(0.5)
    raise AssertionError(f"flow run {run_name} never paused")


@pytest.fixture(scope="module")
def local_registry(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('promote-mlflow') / 'mlflow.db'}"
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.mark.parametrize("approve", [True, False])
def test_paused_flow_applies_the_approvers_answer(prefect_harness, local_registry, make_candidate, approve,
                                                  monkeypatch):
    import json

    # a local store without accounts: the decision is recorded under --by, not under an MLflow login
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)

    from prefect.flow_runs import resume_flow_run

    from damage.flows.promote import promote
    from tests.helpers import worker_config

    c = local_registry
    name = f"promote-{uuid.uuid4().hex[:8]}"
    # the worker's own config (not run parameters): its model, tracking URI, poll every second
    monkeypatch.setenv("DAMAGE_REGISTRY_CONFIG", json.dumps({"approval_poll_s": 1, "approval_timeout_s": 300,
                                                             "model_name": name}))
    version = make_candidate(c, name, mask=0.3, box=0.3)
    run_name = f"promote-{name}"
    results, errors = [], []

    def run():
        try:
            with worker_config([f"mlflow.tracking_uri={c.tracking_uri}"]):
                results.append(promote.with_options(flow_run_name=run_name)(name, version, evaluate_fn=fake_evaluate))
        except BaseException as e:  # surfaced in the main thread below
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    flow_run_id = _paused_run_id(run_name)
    # while paused: gated and staged, nothing in production yet
    assert mr.alias_version(c, name, mr.STAGING) == version
    assert mr.alias_version(c, name, mr.PRODUCTION) is None
    # the approver decides with their own login (here: a local store, no accounts), then resumes the run
    if approve:
        mr.approve(c, name, version, by="erin", reason="checked samples")
    else:
        mr.reject(c, name, version, by="erin", reason="checked samples")
    resume_flow_run(flow_run_id, run_input={"checked": True})
    t.join(timeout=120)
    assert not errors, errors
    out = results[0]
    assert out["gate"]["passed"] is True
    info = {v.version: v for v in mr.list_versions(c, name)}[version]
    if approve:
        assert out["decision"] == "approved" and mr.alias_version(c, name, mr.PRODUCTION) == version
        assert (info.tags["approved_by"], info.tags["reason"]) == ("erin", "checked samples")
    else:
        assert out["decision"] == "rejected" and mr.alias_version(c, name, mr.PRODUCTION) is None
        assert info.tags["rejected_by"] == "erin" and mr.alias_version(c, name, mr.STAGING) is None
