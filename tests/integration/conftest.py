"""Real servers on loopback for integration tests.

``mlflow_server(backend_store_uri, ...)`` starts ``mlflow server`` as a subprocess on a free
127.0.0.1 port with proxied artifacts under a temp dir, waits for ``/health`` and returns the
URI; every server started is terminated at the end of the session. ``postgres_uri`` gives a
fresh PostgreSQL database on 127.0.0.1:5432 (skips when no server is reachable) and drops it
afterwards.

CI has PostgreSQL: with ``CI=true`` a missing PostgreSQL is a failure, never a skip or a silent
SQLite fallback, and the production-stack fixtures record which backend they started
(``STACK_BACKENDS``) so the tests can assert it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from damage.tasks.core.config import CLASSES
from tests.helpers import mlflow_credentials

PG_HOST = os.environ.get("DAMAGE_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("DAMAGE_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("DAMAGE_TEST_PG_USER", "postgres")
PG_PASSWORD = os.environ.get("DAMAGE_TEST_PG_PASSWORD", "")
PG_ADMIN_DB = os.environ.get("DAMAGE_TEST_PG_DB", "test")
# CI services set CI=true; there PostgreSQL is part of the environment and must be used.
IN_CI = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")
# Backend each production-stack server ran on: {"mlflow": store URI, "prefect": database URL}.
STACK_BACKENDS: dict[str, str] = {}


def no_postgres(reason: str) -> None:
    """Skip (local runs) or fail (``CI=true``): CI has PostgreSQL, so its absence there is a defect."""
    if IN_CI:
        pytest.fail(f"CI=true but PostgreSQL was not used: {reason}", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(uri: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"mlflow server at {uri} not healthy after {timeout_s:.0f} s:\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)  # the server forks workers: stop its whole group
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@contextlib.contextmanager
def run_mlflow_server(backend_store_uri: str, workdir: Path, *, app_name: str | None = None,
                      env: dict[str, str] | None = None, workers: int = 1,
                      timeout_s: float = 300.0) -> Iterator[str]:
    """Run ``mlflow server`` on a free loopback port; yields ``http://127.0.0.1:<port>``.

    Args:
        backend_store_uri: tracking + registry store (``sqlite:///...``, ``postgresql://...``).
        workdir: artifacts (``--artifacts-destination``) and the server log go here.
        app_name: e.g. ``basic-auth`` (then pass ``MLFLOW_AUTH_CONFIG_PATH`` in ``env``).
        env: extra environment for the server process.
        workers: server worker processes.
        timeout_s: how long to wait for ``/health``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
           "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
           "--serve-artifacts", "--artifacts-destination", (workdir / "artifacts").as_uri()]
    if app_name:
        cmd += ["--app-name", app_name]
    penv = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    # No background job runner (huey): tests need none and it costs a process and startup time.
    penv["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    penv.update(env or {})
    log = workdir / f"server-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=penv, cwd=workdir,
                                start_new_session=True)
    try:
        _wait_healthy(uri, proc, log, timeout_s)
        yield uri
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[Callable[..., str]]:
    """Factory: ``mlflow_server(backend_store_uri, **kw) -> uri``; servers live until session end.

    Keyword arguments are those of ``run_mlflow_server`` (``app_name``, ``env``, ``workers``).
    """
    with contextlib.ExitStack() as stack:

        def start(backend_store_uri: str, **kw) -> str:
            workdir = tmp_path_factory.mktemp("mlflow-server")
            return stack.enter_context(run_mlflow_server(backend_store_uri, workdir, **kw))

        yield start


def pg_rows(url: str, sql: str, params: tuple = ()) -> list[tuple]:
    """Rows of ``sql`` run on the PostgreSQL database named by a ``postgresql+driver://`` URL (what a
    server was started with), so a test reads what the server really wrote."""
    dbname = url.rsplit("/", 1)[1]
    with contextlib.closing(_pg_connect(dbname)) as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall()


def _pg_connect(dbname: str):
    import psycopg2

    return psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, password=PG_PASSWORD or None,
                            dbname=dbname, connect_timeout=3)


@pytest.fixture(scope="session")
def postgres_uri() -> Iterator[str]:
    """SQLAlchemy URI of a fresh database ``damage_reg_<random>`` (dropped at session end)."""
    try:
        conn = _pg_connect(PG_ADMIN_DB)
    except Exception as e:  # no server, no psycopg2, wrong credentials: nothing to test against
        no_postgres(f"PostgreSQL not reachable at {PG_HOST}:{PG_PORT} ({type(e).__name__}: {e})".strip())
    conn.autocommit = True
    name = f"damage_reg_{uuid.uuid4().hex[:10]}"
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    auth = f"{PG_USER}:{PG_PASSWORD}@" if PG_PASSWORD else f"{PG_USER}@"
    try:
        yield f"postgresql+psycopg2://{auth}{PG_HOST}:{PG_PORT}/{name}"  # psycopg2-binary is what is installed
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


@pytest.fixture(scope="session")
def sqlite_mlflow_server(mlflow_server, tmp_path_factory) -> str:
    """One ``mlflow server`` on a SQLite store for the whole session."""
    db = tmp_path_factory.mktemp("mlflow-sqlite") / "mlflow.db"
    return mlflow_server(f"sqlite:///{db}")


@pytest.fixture(scope="session")
def postgresql_mlflow_server(mlflow_server, postgres_uri) -> str:
    """One ``mlflow server`` on a fresh PostgreSQL database (skipped without PostgreSQL)."""
    return mlflow_server(postgres_uri, workers=2)


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def registry_server(request) -> str:
    """URI of a real ``mlflow server``: once on SQLite, once on PostgreSQL (when reachable)."""
    return request.getfixturevalue(f"{request.param}_mlflow_server")


# --- model registry helpers ----------------------------------------------------------------


def fake_evaluate(onnx_path: Path) -> dict[str, float]:
    """Evaluator for registry tests: the fake "ONNX" file holds its own scores as JSON, so a
    result proves which version's artifact the gate actually downloaded."""
    import json

    return json.loads(Path(onnx_path).read_text())


@pytest.fixture
def make_candidate(tmp_path) -> Callable[..., str]:
    """Factory: ``make_candidate(client, model_name, mask, box, latency_ms=5.0) -> version``.

    Creates an MLflow run and registers a candidate whose files carry the given scores.
    """
    import json

    from damage.model_registry import register_candidate

    counter = iter(range(10**6))

    def make(client, model_name: str, mask: float, box: float, latency_ms: float = 5.0, **kw) -> str:
        i = next(counter)
        exp = client.get_experiment_by_name("registry-tests")
        eid = exp.experiment_id if exp else client.create_experiment("registry-tests")
        run = client.create_run(eid, run_name=f"candidate-{i}")
        d = tmp_path / f"cand{i}"
        d.mkdir()
        # per-class mask AP50 for every class: the gate refuses a candidate without them
        class_ap50 = kw.pop("class_ap50", {})
        scores = {"mask/mAP50-95": mask, "box/mAP50-95": box, "latency_ms": latency_ms,
                  **{f"mask_ap50/{c}": class_ap50.get(c, 0.5) for c in CLASSES}}
        (d / "best.onnx").write_text(json.dumps(scores))
        (d / "best.pt").write_bytes(b"pt-%d" % i)
        lineage = {"dataset_fingerprint": f"ds{i}", "config_hash": "cfg", "code_version": "abc123",
                   **kw.pop("lineage", {})}
        v = register_candidate(client, model_name, run.info.run_id, d / "best.onnx", d / "best.pt",
                               metrics=scores, thresholds={"conf": 0.4, "iou": 0.5}, lineage=lineage, **kw)
        client.set_terminated(run.info.run_id)
        return v.version

    return make


# --- production stack (S3 on moto_server, MLflow on PostgreSQL + S3, Prefect server) -----
# Same commands, variable names and roles as infra/docker-compose.yml, on loopback ports.

S3_BUCKET = "damage"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _wait_http(url: str, proc: subprocess.Popen, log: Path, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except urllib.error.HTTPError as e:
            if e.code < 500:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} at {url} not up after {timeout_s:.0f} s:\n{log.read_text()[-4000:]}")


@contextlib.contextmanager
def run_process(cmd: list[str], log: Path, url: str | None, what: str, env: dict[str, str] | None = None,
                cwd: Path | None = None, timeout_s: float = 180.0) -> Iterator[subprocess.Popen]:
    """Start ``cmd`` in its own process group, wait until ``url`` answers, stop the group on exit."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    try:
        if url:
            _wait_http(url, proc, log, what, timeout_s)
        yield proc
    finally:
        _stop(proc)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment minus the test session's MLflow/Prefect/AWS pointers, plus ``extra``."""
    drop = ("MLFLOW_", "PREFECT_", "AWS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update({"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true"})
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def fresh_postgres() -> Iterator[Callable[[str], str | None]]:
    """Factory ``fresh_postgres(prefix) -> "user@host:port/dbname"`` of a new database, or None without
    PostgreSQL (locally; with ``CI=true`` the fixture fails instead); every database created is dropped at
    session end."""
    try:
        conn = _pg_connect(PG_ADMIN_DB)
    except Exception as e:
        if IN_CI:
            no_postgres(f"PostgreSQL not reachable at {PG_HOST}:{PG_PORT} ({type(e).__name__}: {e})")
        conn = None
    made: list[str] = []

    def make(prefix: str) -> str | None:
        if conn is None:
            return None
        conn.autocommit = True
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        auth = f"{PG_USER}:{PG_PASSWORD}@" if PG_PASSWORD else f"{PG_USER}@"
        return f"{auth}{PG_HOST}:{PG_PORT}/{name}"

    try:
        yield make
    finally:
        if conn is not None:
            with conn.cursor() as cur:
                for name in made:
                    cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.close()


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory) -> Iterator[str]:
    """``moto_server`` on a loopback port with bucket ``damage``; yields the endpoint URL (role of MinIO)."""
    import boto3

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    exe = Path(sys.executable).with_name("moto_server")
    with run_process([str(exe), "-H", "127.0.0.1", "-p", str(port)], log, f"{url}/moto-api/", "moto_server",
                     env=clean_env(**S3_ENV)):
        boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=S3_BUCKET)
        yield url


# MLflow basic-auth accounts of the production stack (infra/docker-compose.yml: admin, pipeline, approver)
MLFLOW_ACCOUNTS = {name: (name, f"{name}-{uuid.uuid4().hex[:12]}") for name in ("admin", "pipeline", "approver")}
PRODUCTION_MODEL = "damage-seg"


def mlflow_user(account: str) -> contextlib.AbstractContextManager[None]:
    """Authenticate this process as one of ``MLFLOW_ACCOUNTS`` (MLflow reads the variables per request)."""
    return mlflow_credentials(MLFLOW_ACCOUNTS[account])


@pytest.fixture(scope="session")
def mlflow_s3_server(moto_s3, fresh_postgres, tmp_path_factory) -> Iterator[str]:
    """``mlflow server --app-name basic-auth`` with a PostgreSQL backend (SQLite without PostgreSQL) and
    artifacts proxied to ``s3://damage/mlartifacts`` on moto; the ``pipeline`` (EDIT) and ``approver``
    (MANAGE) accounts are provisioned on ``damage-seg`` as in the compose file; yields its URI."""
    import flask_wtf  # noqa: F401  MLflow's basic-auth app needs it (the [server] extra): missing is a failure
    work = tmp_path_factory.mktemp("mlflow-s3")
    pg = fresh_postgres("damage_mlflow")
    # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; the project ships psycopg2-binary
    store = f"postgresql+psycopg2://{pg}" if pg else f"sqlite:///{work / 'mlflow.db'}"
    STACK_BACKENDS["mlflow"] = store
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    ini = work / "basic_auth.ini"  # the compose file's auth config, accounts DB in the temp dir
    shipped = Path(__file__).resolve().parents[2] / "infra" / "mlflow-auth" / "basic_auth.compose.ini"
    ini.write_text(shipped.read_text().replace("sqlite:////mlflow-auth/basic_auth.db", f"sqlite:///{work / 'auth.db'}")
                   + "auth_cache_ttl_seconds = 600\n")
    cmd = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--backend-store-uri", store,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--serve-artifacts",
           "--artifacts-destination", f"s3://{S3_BUCKET}/mlartifacts"]
    env = clean_env(**S3_ENV, MLFLOW_S3_ENDPOINT_URL=moto_s3, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
                    MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_AUTH_ADMIN_PASSWORD=MLFLOW_ACCOUNTS["admin"][1],
                    MLFLOW_FLASK_SERVER_SECRET_KEY=uuid.uuid4().hex)
    with run_process(cmd, work / "server.log", f"{uri}/health", "mlflow server", env=env, cwd=work, timeout_s=300):
        from damage.model_registry.auth import provision

        with mlflow_user("admin"):  # what the compose file's one-shot `mlflow-accounts` service runs
            provision(uri, PRODUCTION_MODEL, pipeline=MLFLOW_ACCOUNTS["pipeline"],
                      approvers=[MLFLOW_ACCOUNTS["approver"]])
        yield uri


@pytest.fixture(scope="session")
def prefect_server(fresh_postgres, tmp_path_factory) -> Iterator[str]:
    """``prefect server start`` on a loopback port, PostgreSQL-backed when available (else SQLite);
    yields the API URL (``http://127.0.0.1:<port>/api``)."""
    home = tmp_path_factory.mktemp("prefect-server")
    pg = fresh_postgres("damage_prefect")
    db = f"postgresql+asyncpg://{pg}" if pg else f"sqlite+aiosqlite:///{home / 'prefect.db'}"
    STACK_BACKENDS["prefect"] = db
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = clean_env(PREFECT_HOME=str(home), PREFECT_API_DATABASE_CONNECTION_URL=db, PREFECT_SERVER_UI_ENABLED="false",
                    PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port))
    cmd = [str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", "127.0.0.1", "--port",
           str(port), "--no-ui", "--analytics-off"]
    with run_process(cmd, home / "server.log", f"{api}/health", "prefect server", env=env, timeout_s=300):
        yield api


@pytest.fixture(scope="session")
def night_recorder():
    """A loopback endpoint recording the notifications of the shared tiny nightly."""
    from tests.recording_http import Recorder

    with Recorder() as rec:
        yield rec


@pytest.fixture(scope="session")
def night_notify_config(night_recorder, tmp_path_factory) -> str:
    """Config file with two notify URLs: one recording, one dead. URLs live in a file, not in
    overrides: overrides are flow parameters, shown in the Prefect UI."""
    from tests.integration.tiny_night import dead_port

    cfg = tmp_path_factory.mktemp("night") / "notify.yaml"
    cfg.write_text(f"notify:\n  urls: ['{night_recorder.json_url('hook')}', 'json://127.0.0.1:{dead_port()}/x']\n")
    return str(cfg)


@pytest.fixture(scope="session")
def tiny_night(prefect_harness, state_paths, night_notify_config, night_recorder) -> dict:
    """The shared forced tiny nightly (tests/integration/tiny_night.py): its summary, the recorded
    notifications, the non-loopback connection attempts made while it ran, and the registered
    model's aliases right after it (later tests may approve the version)."""
    from prefect.logging.handlers import APILogWorker

    import damage.model_registry as mr
    from damage.flows.nightly import nightly
    from damage.tasks.core import tracking
    from tests.helpers import worker_config
    from tests.integration.tiny_night import AUDIT, TINY, worker_registry

    AUDIT["attempts"].clear()
    AUDIT["on"] = True
    try:
        with worker_registry(), worker_config(TINY, night_notify_config):  # the worker's --config/--set
            summary = nightly(force=True)
    finally:
        AUDIT["on"] = False
    APILogWorker.drain_all(timeout=10)  # what APILogHandler.flush does outside an event loop
    c = tracking.client(summary["tracking_uri"])
    aliases = {a: mr.alias_version(c, summary["registered_model"], a) for a in (mr.STAGING, mr.PRODUCTION)}
    return {"summary": summary, "posts": night_recorder.posts, "outbound": list(AUDIT["attempts"]),
            "aliases": aliases}
