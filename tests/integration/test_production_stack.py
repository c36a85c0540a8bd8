"""Production mode on loopback: Prefect server (PostgreSQL), MLflow server (PostgreSQL + S3 artifacts
on moto_server, basic-auth on), the nightly deployment served by ``damage schedule`` as the ``pipeline``
account, a run triggered through the Prefect API on a tiny dataset that lives in the bucket; then the
pipeline account is refused ``production`` and the approver account moves it.

Same roles, commands and variable names as ``infra/docker-compose.yml`` (checked below too).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import (  # tests/integration/conftest.py
    IN_CI,
    MLFLOW_ACCOUNTS,
    PRODUCTION_MODEL,
    S3_BUCKET,
    S3_ENV,
    STACK_BACKENDS,
    clean_env,
    mlflow_user,
    pg_rows,
    run_process,
)

from tests.helpers import NO_FIGURES

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "infra" / "docker-compose.yml"
DATASET_URI = f"s3://{S3_BUCKET}/datasets/tiny"
EXPERIMENT = "production-test"
TINY = ["train.epochs=1", "train.imgsz=64", *NO_FIGURES, "train.batch=8", "sweep.conf=[0.3]", "sweep.iou=[0.5]",
        "explain.enabled=false", "explain.samples=0", "export.parity_images=1", "compress.enabled=false",
        "registry.floor_mask_map=0.0", "registry.min_class_ap50=0.0", "registry.approvers=[approver]", "validate.workers=1",
        f"mlflow.experiment={EXPERIMENT}"]


def _s3(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing")


@pytest.fixture(scope="module")
def s3_dataset(moto_s3, state_paths, tmp_path_factory) -> str:
    """16 synthetic images at 64 px uploaded to the bucket (data.yaml without ``path:``)."""
    from damage.tasks.data.storage import upload_dir
    from damage.tasks.data.synth import generate_dataset

    data_yaml = generate_dataset(tmp_path_factory.mktemp("s3-ds") / "ds", images=16, seed=1, imgsz=64,
                                 val_fraction=0.25)
    meta = yaml.safe_load(data_yaml.read_text())
    # An uploaded dataset must not point at the uploader's disk. No `path:` = the yaml's folder for both
    # the data gate and Ultralytics (a relative `path:` means the cwd to Ultralytics).
    meta.pop("path", None)
    data_yaml.write_text(yaml.safe_dump(meta))
    n = upload_dir(data_yaml.parent, DATASET_URI, client=_s3(moto_s3))
    assert n >= 16 * 2
    return DATASET_URI


@pytest.fixture(scope="module")
def served(prefect_server, mlflow_s3_server, moto_s3, s3_dataset, tmp_path_factory):
    """``damage schedule`` serving the deployments (what the compose ``worker`` service runs)."""
    state = tmp_path_factory.mktemp("worker-state")
    user, password = MLFLOW_ACCOUNTS["pipeline"]  # the compose worker's account
    env = clean_env(**S3_ENV, PREFECT_API_URL=prefect_server, MLFLOW_TRACKING_URI=mlflow_s3_server,
                    MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password, AWS_ENDPOINT_URL_S3=moto_s3, DAMAGE_STATE_DIR=str(state), PREFECT_RUNNER_POLL_FREQUENCY="2",
                    PYTHONPATH=str(REPO))
    env.pop("TMPDIR", None)
    cmd = [str(Path(sys.executable).with_name("damage")), "schedule", "--dataset", s3_dataset, "--model-size", "n"]
    for s in TINY:
        cmd += ["--set", s]
    log = state / "schedule.log"
    with run_process(cmd, log, None, "damage schedule", env=env, cwd=REPO) as proc:
        yield proc, log


def _wait_deployment(api: str, name: str, proc: subprocess.Popen, log: Path, timeout_s: float = 240):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + timeout_s
    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"damage schedule exited {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                return c.read_deployment_by_name(name)
            except Exception:
                time.sleep(1)
    raise AssertionError(f"deployment {name} never appeared:\n{log.read_text()[-4000:]}")


def _check_backend(role: str) -> str:
    """The store ``role``'s server ran on; with ``CI=true`` it must be PostgreSQL (CI has it)."""
    store = STACK_BACKENDS[role]
    if IN_CI:
        assert store.startswith("postgresql"), f"CI=true but the {role} server ran on {store.split(':')[0]}"
    return store


@pytest.mark.integration
@pytest.mark.timeout(1800)  # three servers + a served deployment + a training: 900 s is too tight on a busy 2-core box
def test_nightly_deployment_end_to_end(prefect_server, mlflow_s3_server, moto_s3, served):
    from mlflow.tracking import MlflowClient
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    proc, log = served
    dep = _wait_deployment(prefect_server, "nightly/nightly", proc, log)
    # the deployment as configured: cron + timezone from the config, never two runs at once
    cron = dep.schedules[0].schedule
    assert (cron.cron, cron.timezone) == ("0 2 * * *", "UTC")
    limit = dep.global_concurrency_limit.limit if dep.global_concurrency_limit else dep.concurrency_limit
    assert limit == 1
    assert f"data.source={DATASET_URI}" in dep.parameters["overrides"] or dep.parameters.get("dataset") == DATASET_URI

    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        run = run_deployment("nightly/nightly", timeout=600, poll_interval=3)
    assert run.state is not None and run.state.is_completed(), (
        f"flow run {run.id} ended {run.state and run.state.type}: {run.state and run.state.message}\n"
        f"{log.read_text()[-6000:]}")

    c = MlflowClient(tracking_uri=mlflow_s3_server, registry_uri=mlflow_s3_server)
    with mlflow_user("approver"):  # READ on the pipeline's runs (default_permission)
        _check_run_and_artifacts(c, run, moto_s3)
    _production_needs_the_approver(c)
    _approved_means_frozen(c, moto_s3)
    # issue 31: a run started with a tracking URI of its choosing is refused before it talks to any server
    # (the nightly deployment retries a failed run later: the refusal is read from the worker's log)
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        bad = run_deployment("nightly/nightly", parameters={"overrides": ["mlflow.tracking_uri=http://127.0.0.1:9"]},
                             timeout=0)
    refusal = "'mlflow.tracking_uri' is not allowed"
    deadline = time.monotonic() + 300
    while refusal not in log.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(2)
    assert refusal in log.read_text(errors="replace"), log.read_text()[-4000:]
    assert bad.state is None or not bad.state.is_completed()


def _approved_means_frozen(c, moto_s3):
    """Issue 31 on the stack: the pipeline's direct move of production is refused (the approval record) or
    detected (damage-seg's own alias); a file swapped after approval is refused where serving reads it."""
    from mlflow.exceptions import MlflowException

    import damage.model_registry as mr
    from damage.model_registry.frozen import approved_name, fetch_approved_uri

    with mlflow_user("approver"):
        prod = mr.alias_version(c, PRODUCTION_MODEL, mr.PRODUCTION)
        rec = c.get_model_version(approved_name(PRODUCTION_MODEL),
                                  mr.alias_version(c, approved_name(PRODUCTION_MODEL), mr.PRODUCTION))
        assert rec.tags["approval.source_version"] == prod
    with mlflow_user("pipeline"):
        with pytest.raises(MlflowException, match="403|PERMISSION_DENIED"):
            c.set_registered_model_alias(approved_name(PRODUCTION_MODEL), mr.PRODUCTION, rec.version)
    # a swapped ONNX in the approved copy (raw storage access): serving refuses it, naming the file
    key = f"mlartifacts/{rec.source.split('mlflow-artifacts:/', 1)[1]}"
    onnx_key = next(o["Key"] for o in _s3(moto_s3).list_objects_v2(Bucket=S3_BUCKET, Prefix=key)["Contents"]
                    if o["Key"].endswith(".onnx"))
    original = _s3(moto_s3).get_object(Bucket=S3_BUCKET, Key=onnx_key)["Body"].read()
    _s3(moto_s3).put_object(Bucket=S3_BUCKET, Key=onnx_key, Body=b"swapped")
    try:
        with mlflow_user("approver"), pytest.raises(mr.ApprovalMismatch, match=r"\.onnx: differs from what was"):
            fetch_approved_uri(c, f"models:/{PRODUCTION_MODEL}@production")
    finally:
        _s3(moto_s3).put_object(Bucket=S3_BUCKET, Key=onnx_key, Body=original)


def _production_needs_the_approver(c):
    """basic-auth on: the pipeline registered and staged; it gets a clear error moving `production`,
    the approver moves it."""
    import damage.model_registry as mr
    from damage.tasks.core.config import RegistryConfig

    approvers = ["approver"]
    with mlflow_user("pipeline"):
        versions = mr.list_versions(c, PRODUCTION_MODEL)
        assert versions and versions[0].tags["source_run_id"]
        v = versions[0].version
        # the nightly run (as pipeline) registered the version and the gate staged it (floor 0.0)
        assert mr.alias_version(c, PRODUCTION_MODEL, mr.STAGING) == v
        with pytest.raises(mr.AccessDenied, match=r"MLflow user 'pipeline' may not approve .* only approver"):
            mr.approve(c, PRODUCTION_MODEL, v, by="pipeline", reason="self-approval", approvers=approvers)
        with pytest.raises(mr.AccessDenied, match="no approvers are configured"):
            mr.approve(c, PRODUCTION_MODEL, v, by="pipeline", reason="empty list", approvers=RegistryConfig().approvers)
        assert mr.alias_version(c, PRODUCTION_MODEL, mr.PRODUCTION) is None
    with mlflow_user("approver"):
        info = mr.approve(c, PRODUCTION_MODEL, v, by="approver", reason="reviewed", approvers=approvers)
        assert mr.alias_version(c, PRODUCTION_MODEL, mr.PRODUCTION) == v
        assert info.tags["approved_via"] == "approver"


def _check_run_and_artifacts(c, run, moto_s3) -> None:
    exp = c.get_experiment_by_name(EXPERIMENT)
    parents = c.search_runs([exp.experiment_id], "tags.`damage.flow` = 'nightly'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.tags.get("prefect.flow_run_id") == str(run.id)  # the two systems point at each other
    assert parent.data.params["data.source"] == DATASET_URI
    versions = c.search_model_versions("name = 'damage-seg'")
    assert versions, "no registered model version on the server"

    keys = [o["Key"] for page in _s3(moto_s3).get_paginator("list_objects_v2").paginate(
        Bucket=S3_BUCKET, Prefix="mlartifacts/") for o in page.get("Contents", [])]
    assert any(k.endswith(".onnx") for k in keys), keys[:20]
    assert any(k.endswith(".pt") for k in keys), keys[:20]
    assert any(parent.info.run_id in k for k in keys)  # the parent run's own artifacts (config, summary)
    # which backend ran: the records are in PostgreSQL itself, not only reported by the servers
    mlflow_store, prefect_db = _check_backend("mlflow"), _check_backend("prefect")
    if mlflow_store.startswith("postgresql"):
        assert pg_rows(mlflow_store, "SELECT status FROM runs WHERE run_uuid = %s",
                       (parent.info.run_id,)) == [("FINISHED",)]
    if prefect_db.startswith("postgresql"):
        assert pg_rows(prefect_db, "SELECT state_type::text FROM flow_run WHERE id = %s::uuid",
                       (str(run.id),)) == [("COMPLETED",)]


@pytest.mark.integration
def test_work_pool_registration(prefect_server, tmp_path):
    """`damage schedule --work-pool` and `prefect deploy --prefect-file infra/prefect.yaml` both register
    the nightly deployment with a process work pool (execution by a worker is the serve test's path)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    _check_backend("prefect")
    bindir = Path(sys.executable).parent
    env = clean_env(PREFECT_API_URL=prefect_server, DAMAGE_STATE_DIR=str(tmp_path / "state"),
                    DAMAGE_REPO_DIR=str(REPO), PREFECT_HOME=str(tmp_path / "prefect"))

    def sh(*cmd: str) -> str:
        r = subprocess.run(list(cmd), env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{' '.join(cmd)} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r.stdout

    sh(str(bindir / "prefect"), "--no-prompt", "work-pool", "create", "damage-process", "--type", "process")
    out = sh(str(bindir / "damage"), "schedule", "--work-pool", "damage-process", "--set", "schedule.cron=15 3 * * *")
    assert "registered" in out
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as c:
        dep = c.read_deployment_by_name("nightly/nightly")
        assert dep.work_pool_name == "damage-process" and dep.entrypoint == "damage.flows.nightly.scheduled_nightly"
        assert dep.schedules[0].schedule.cron == "15 3 * * *"
    sh(str(bindir / "prefect"), "--no-prompt", "deploy", "--prefect-file", "infra/prefect.yaml", "--all")
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as c:
        dep = c.read_deployment_by_name("nightly/nightly")
        assert dep.entrypoint == "flows/nightly.py:scheduled_nightly" and dep.work_pool_name == "damage-process"
        assert dep.schedules[0].schedule.cron == "0 2 * * *"


def test_compose_matches_the_test_stack():
    """infra/docker-compose.yml loads and wires the same roles, commands and variables as this test."""
    spec = yaml.safe_load(COMPOSE.read_text())
    svc = spec["services"]
    assert {"postgres", "minio", "prefect-server", "mlflow", "worker"} <= set(svc)
    mlflow_cmd = " ".join(svc["mlflow"]["command"])
    assert "--backend-store-uri postgresql+psycopg2://" in mlflow_cmd and "--artifacts-destination s3://" in mlflow_cmd
    assert "MLFLOW_S3_ENDPOINT_URL" in svc["mlflow"]["environment"]
    assert "PREFECT_API_DATABASE_CONNECTION_URL" in svc["prefect-server"]["environment"]
    assert svc["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://")
    worker_env = svc["worker"]["environment"]
    for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL_S3", "DAMAGE_STATE_DIR"):
        assert k in worker_env, k
    worker_cmd = " ".join(svc["worker"]["command"]) if isinstance(svc["worker"]["command"], list) \
        else svc["worker"]["command"]
    assert "damage schedule" in worker_cmd or "prefect worker start" in worker_cmd
    env_example = (REPO / "infra" / ".env.example").read_text()
    for var in ("POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "DATASET_URI"):
        assert f"{var}=" in env_example, var
    for name, s in svc.items():  # every ${VAR} the compose file uses is documented in .env.example
        for var in _vars(s):
            assert f"{var}=" in env_example, f"{name}: ${{{var}}} not in infra/.env.example"


def _vars(obj) -> set[str]:
    import re

    text = yaml.safe_dump(obj)
    return {m for m in re.findall(r"\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}", text)}


def test_deployments_built_from_config(tmp_path, state_paths):
    """Deployment objects (no server): cron/timezone/limit from the config, --set overrides carried."""
    from damage.flows.deploy import build_deployments
    from damage.tasks.core.config_load import load_config

    cfg = load_config(overrides=["schedule.cron=30 1 * * 1-5", "schedule.timezone=Europe/Paris"])
    deps = {d.name: d for d in build_deployments(cfg, overrides=["train.epochs=3"], dataset="s3://b/ds",
                                                 model_size="s")}
    nightly = deps["nightly"]
    sched = nightly.schedules[0].schedule
    assert (sched.cron, sched.timezone) == ("30 1 * * 1-5", "Europe/Paris")
    limit = nightly.concurrency_limit
    assert getattr(limit, "limit", limit) == 1
    assert nightly.concurrency_options.collision_strategy.value == "ENQUEUE"
    params = nightly.parameters
    flat = params["overrides"] + [f"data.source={params.get('dataset')}", f"train.model={params.get('model_size')}"]
    assert "train.epochs=3" in flat and "data.source=s3://b/ds" in flat and "train.model=s" in flat
    assert "promote" in deps
    assert os.environ.get("PREFECT_API_URL") is None  # building needs no server
