"""Issue 31: a run parameter or the pipeline account never reaches production, runs code or reads a password;
what was approved is what is served.

Against the production stack's loopback MLflow server with basic auth (``pipeline`` EDIT, ``approver``
MANAGE, as ``infra/docker-compose.yml`` provisions them) and artifacts on moto S3. Each test is
named after the item of the issue it reproduces. Item 4 (checkpoints) is in
``test_issue31_checkpoints.py``; the medium and low items in ``test_issue31_more.py``.
"""

from __future__ import annotations

import http.server
import inspect
import json
import threading
from pathlib import Path

import pytest
from conftest import MLFLOW_ACCOUNTS, S3_BUCKET, S3_ENV, fake_evaluate, mlflow_user

import damage.model_registry as mr
from damage.tasks.core.config import ConfigError, RegistryConfig

pytestmark = pytest.mark.integration

NAME = "damage-seg-trust"


class _Listener(http.server.BaseHTTPRequestHandler):
    seen: list[str] = []

    def do_GET(self):  # noqa: N802
        type(self).seen.append(self.headers.get("Authorization") or "<none>")
        self.send_response(404)
        self.end_headers()

    do_POST = do_GET  # noqa: N815

    def log_message(self, *a):
        pass


@pytest.fixture
def listener():
    """An HTTP server on 127.0.0.1 that records every Authorization header it is sent (the attacker's)."""
    _Listener.seen = []
    srv = http.server.HTTPServer(("127.0.0.1", 0), _Listener)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_port}", _Listener.seen
    srv.shutdown()


@pytest.fixture(scope="module")
def trust_server(mlflow_s3_server) -> str:
    """The stack's server, with a model of its own (``damage-seg-trust`` + its ``-approved`` records)."""
    from damage.model_registry.auth import provision

    with mlflow_user("admin"):
        provision(mlflow_s3_server, NAME, pipeline=MLFLOW_ACCOUNTS["pipeline"],
                  approvers=[MLFLOW_ACCOUNTS["approver"]])
    return mlflow_s3_server


@pytest.fixture(autouse=True)
def _reader():
    """Reads outside an explicit account (the tests' own assertions) authenticate as the approver."""
    with mlflow_user("approver"):
        yield


@pytest.fixture
def client(trust_server):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=trust_server, registry_uri=trust_server)


APPROVERS = ["approver"]


def _staged(c, make_candidate, mask=0.3) -> str:
    """A candidate registered, gated and staged by the pipeline account."""
    with mlflow_user("pipeline"):
        v = make_candidate(c, NAME, mask=mask, box=0.3)
        cfg = RegistryConfig(model_name=NAME, approvers=APPROVERS, floor_mask_map=0.0, min_class_ap50=0.0, tolerance=1.0)
        assert mr.gate_candidate(c, NAME, v, fake_evaluate, cfg).passed
    return v


def _approved(c, make_candidate) -> str:
    v = _staged(c, make_candidate)
    with mlflow_user("approver"):
        mr.approve(c, NAME, v, by="approver", reason="reviewed", approvers=APPROVERS)
    return v


# --- item 1: a run parameter points the pipeline at any server -----------------------------------

def test_item1_run_parameter_cannot_redirect_tracking_uri(listener, monkeypatch):
    from damage.flows.promote import promote
    from damage.tasks.nightly.pipeline import prepare_state

    url, seen = listener
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "approver")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "approver-password")
    # the nightly's override list and the promote flow's parameters: refused before any request
    with pytest.raises(ConfigError, match="'mlflow.tracking_uri' is not allowed"):
        prepare_state(None, [f"mlflow.tracking_uri={url}"])
    assert "tracking_uri" not in inspect.signature(promote.fn).parameters
    with pytest.raises(TypeError):
        promote.fn(model_name="damage-seg", version="1", tracking_uri=url)
    assert seen == []  # the listener never got a header, let alone a password


def test_item1_production_stack_refuses_run_with_tracking_uri(listener):
    """The deployment's parameter schema has no tracking URI; an override naming it is refused."""
    from damage.flows.deploy import build_deployments
    from damage.tasks.core.config_load import load_config

    deps = {d.name: d for d in build_deployments(load_config(), schedule=False)}
    assert "tracking_uri" not in deps["promote"].parameters
    from prefect.utilities.callables import parameter_schema

    from damage.flows.promote import promote

    assert not {"tracking_uri", "evaluator", "registry"} & set(parameter_schema(promote).properties)
    from damage.tasks.core.run_params import run_config

    for key in ("mlflow.tracking_uri", "mlflow.artifact_location", "notify.urls", "state_dir"):
        with pytest.raises(ConfigError, match=f"'{key}' is not allowed"):
            run_config(None, [f"{key}={listener[0]}"])


# --- item 2: a run parameter names code to import and run ----------------------------------------

def test_item2_run_parameter_cannot_name_code(tmp_path):
    from damage.flows.promote import promote

    marker = tmp_path / "RAN"
    script = tmp_path / "model.py"
    script.write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    assert "evaluator" not in inspect.signature(promote.fn).parameters
    with pytest.raises(TypeError):
        promote.fn(model_name="damage-seg", version="1", evaluator="runpy:run_path")
    src = Path(inspect.getsourcefile(promote.fn)).read_text()
    assert "importlib" not in src and "import_module" not in src
    assert not marker.exists()


# --- item 3: the approval form approves in the worker's name -------------------------------------

def test_item3_approval_form_carries_no_credentials(client, make_candidate, monkeypatch):
    """A resume with a forged "approve as approver" answer approves nothing; the human's own
    ``damage registry approve`` does, and the flow reports who."""
    import damage.flows.promote as P
    from damage.model_registry.tasks import recorded_decision

    assert set(P.ApprovalCheck.model_fields) == {"checked"}  # no approve/approver/reason fields
    v = _staged(client, make_candidate)
    forms, calls = [], []

    def fake_pause(wait_for_input, timeout, poll_interval, key):
        forms.append(wait_for_input)
        calls.append(key)
        if len(calls) == 1:  # someone resumes with a forged answer: the form has nowhere to put it
            assert mr.alias_version(client, NAME, mr.PRODUCTION) != v
            return {"approve": True, "approver": "approver"}
        with mlflow_user("approver"):  # the approver, with their own login
            mr.approve(client, NAME, v, by="approver", reason="looked at the samples", approvers=APPROVERS)
        return P.ApprovalCheck(checked=True)

    monkeypatch.setattr(P, "pause_flow_run", fake_pause)
    monkeypatch.setattr(P, "decision_task", recorded_decision)
    cfg = RegistryConfig(model_name=NAME, approvers=APPROVERS, approval_timeout_s=600, approval_poll_s=1)
    with mlflow_user("pipeline"):  # the worker holds only the pipeline's credentials
        out = P.await_approval(NAME, v, client.tracking_uri, cfg, ["gate passed"])
    assert len(calls) == 2
    assert "damage registry approve" in forms[0]._description  # the text Prefect shows above the form
    assert out["decision"] == "approved" and out["by"] == "approver" and out["via"] == "approver"
    assert mr.alias_version(client, NAME, mr.PRODUCTION) == v


def test_item3_pipeline_written_approval_tags_do_not_count(client, make_candidate):
    from damage.model_registry.tasks import recorded_decision

    v = _staged(client, make_candidate)
    with mlflow_user("pipeline"):
        for k, val in {"approval": "approved", "approved_by": "approver", "approved_via": "approver"}.items():
            client.set_model_version_tag(NAME, v, k, val)
        assert recorded_decision(client, NAME, v, APPROVERS) is None


# --- item 5: what was approved is what is served --------------------------------------------------

@pytest.fixture
def s3_client(moto_s3):
    import boto3

    return boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1",
                        aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"])


def test_item5_artifact_swap_after_approval_is_not_served(client, make_candidate, tmp_path, s3_client):
    from damage.model_registry.frozen import approved_file, approved_name, fetch_approved

    v = _approved(client, make_candidate)
    with mlflow_user("approver"):
        approved_bytes = approved_file(fetch_approved(client, NAME, "production", tmp_path / "a"), ".onnx").read_bytes()
    # the pipeline replaces the version's ONNX in its own run: the approved copy does not change
    info = {x.version: x for x in mr.list_versions(client, NAME)}[v]
    swap = tmp_path / "swap" / "model.onnx"
    swap.parent.mkdir()
    swap.write_text(json.dumps({"mask/mAP50-95": 0.99, "swapped": True}))
    with mlflow_user("pipeline"):
        client.log_artifact(info.run_id, str(swap), "model")
        local = fetch_approved(client, NAME, "production", tmp_path / "b")
        assert approved_file(local, ".onnx").read_bytes() == approved_bytes
        # ... and it cannot write into the approved copy: the server refuses
        rec = client.get_model_version(approved_name(NAME), mr.alias_version(client, approved_name(NAME), "production"))
        with pytest.raises(Exception, match="403|PERMISSION_DENIED|Permission denied"):
            client.log_artifact(rec.run_id, str(swap), "model")
    # someone with raw storage access swaps the approved copy itself: refused at serve time, naming the file
    key = f"mlartifacts/{rec.source.split('mlflow-artifacts:/', 1)[1]}/model.onnx"
    s3_client.put_object(Bucket=S3_BUCKET, Key=key, Body=swap.read_bytes())
    try:
        with pytest.raises(mr.ApprovalMismatch, match=r"model\.onnx: differs from what was approved"):
            fetch_approved(client, NAME, "production", tmp_path / "c")
    finally:  # put the approved bytes back: other tests gate against this production version
        s3_client.put_object(Bucket=S3_BUCKET, Key=key, Body=approved_bytes)


def test_item5_served_code_comes_from_the_installed_package(tmp_path):
    """``damage serve`` writes the pyfunc folder from this package around the verified ONNX; nothing of
    the artifact store's code is used (the stored ``pyfunc_code.py`` is never read)."""
    from damage.flows.commands.serve import _approved_pyfunc
    from damage.tasks.serving.pyfunc import MODEL_CODE

    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"not read here")
    folder = _approved_pyfunc(str(onnx), tmp_path / "work")
    assert (folder / "MLmodel").is_file() and str(folder).startswith(str(tmp_path / "work"))
    shipped = list(folder.rglob(MODEL_CODE.name))
    assert shipped and all(p.read_text() == MODEL_CODE.read_text() for p in shipped)


# --- item 6: the pipeline account can move production itself ------------------------------------

def test_item6_pipeline_cannot_move_production(client, make_candidate, tmp_path):
    from damage.model_registry.frozen import approved_name, check_production, fetch_approved, freeze_version

    good = _approved(client, make_candidate)
    bad = _staged(client, make_candidate, mask=0.01)
    notes = []
    with mlflow_user("pipeline"):
        # the approval record is the approvers' own: the server refuses the pipeline (HTTP 403)
        with pytest.raises(mr.AccessDenied, match="refused to let user 'pipeline'"):
            freeze_version(client, NAME, bad, "approver", "self-approval")
        with pytest.raises(Exception, match="403|PERMISSION_DENIED"):
            client.set_registered_model_alias(approved_name(NAME), "production", "1")
        # it can still move damage-seg@production (EDIT) and forge tags: every reader detects it
        client.set_model_version_tag(NAME, bad, "approval", "approved")
        client.set_model_version_tag(NAME, bad, "approved_by", "approver")
        client.set_registered_model_alias(NAME, "production", bad)
        with pytest.raises(mr.ApprovalMismatch, match=f"is version {bad} but the last approval record"):
            check_production(client, NAME, notify=notes.append)
        with pytest.raises(mr.ApprovalMismatch):
            fetch_approved(client, NAME, "production", tmp_path / "x")
    assert len(notes) == 1 and NAME in notes[0]
    with mlflow_user("admin"):  # restore for the other tests
        client.set_registered_model_alias(NAME, "production", good)


def test_item6_cli_approvers_never_from_set(trust_server, client, make_candidate, tmp_path):
    from typer.testing import CliRunner

    from damage.flows.cli import app

    v = _staged(client, make_candidate)
    before = mr.alias_version(client, NAME, mr.PRODUCTION)
    with mlflow_user("pipeline"):
        r = CliRunner().invoke(app, ["--state-dir", str(tmp_path / "s"), "--set", "registry.approvers=[pipeline]",
                                     "registry", "approve", NAME, v, "--by", "pipeline", "--reason", "mine",
                                     "--tracking-uri", trust_server])
    assert r.exit_code != 0
    assert "registry.approvers is not allowed" in r.output
    assert mr.alias_version(client, NAME, mr.PRODUCTION) == before
