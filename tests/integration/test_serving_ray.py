"""Issue 28: the Ray Serve server follows ``@production`` under load without a failed request, names
the version of every answer, keeps the old version when a new one fails to load, refuses bad input
the way ``mlflow models serve`` does, and exposes /metrics; canary and shadow on two known models.

A loopback ``mlflow server`` (SQLite store) holds four versions of constant-output ONNX models.
"""

from __future__ import annotations

import functools
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.serving_helpers import move_production, png_b64, request_body, versions

pytestmark = pytest.mark.integration

NAME = "serve-m"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: bytes, ctype: str = "application/json", rid: str | None = None,
          timeout: float = 30) -> tuple[int, dict[str, str], str]:
    headers = {"Content-Type": ctype, **({"X-Request-Id": rid} if rid else {})}
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


@pytest.fixture(scope="module")
def served(ray_local, mlflow_server, tmp_path_factory):
    """(tracking uri, versions, client, base url, start(cfg) -> url, tmp) with one Serve instance."""
    from ray import serve

    from tests.helpers import sqlite_client

    tmp = tmp_path_factory.mktemp("serve-ray")
    store = tmp / "store"
    store.mkdir()
    uri = mlflow_server(f"sqlite:///{store / 'mlflow.db'}")
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    del sqlite_client
    vs = versions(c, NAME, tmp)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield uri, vs, c, f"http://127.0.0.1:{port}", tmp
    serve.shutdown()


@pytest.fixture(autouse=True)
def _no_app_left(served):
    """A test that fails before its own ``serve.delete`` must not leave its route to the next test (whose deploy
    would then fail with "Prefix / is being used")."""
    yield
    from ray import serve

    for name in list(serve.status().applications):
        serve.delete(name)


def _app(uri: str, tmp: Path, monitor_kwargs: dict, **cfg):
    from damage.model_registry.serving import resolve
    from damage.tasks.core.config import ServingConfig
    from damage.tasks.serving.ray_serve import build_app

    resolver = functools.partial(resolve, cache_dir=tmp / "cache", tracking_uri=uri)
    scfg = ServingConfig(replica_cpus=0.5, threads=1, **cfg)
    return build_app(f"models:/{NAME}@production", resolver, scfg, monitor_kwargs)


def test_alias_moves_under_load_zero_failures(served):
    """Concurrency 8 across v1 -> v2 -> v3 (two moves), a rollback to v2, then a broken v4."""
    from prometheus_client.parser import text_string_to_metric_families
    from ray import serve

    uri, vs, c, base, tmp = served
    move_production(c, NAME, vs["one"])
    serve.run(_app(uri, tmp, {"window": 1000}, replicas=2, poll_s=0.3), name="alias", route_prefix="/")
    body = request_body(png_b64())
    results: list[tuple[int, str, str]] = []
    stop, lock = threading.Event(), threading.Lock()

    def client():
        for _ in range(3000):  # bounded loop
            if stop.is_set():
                return
            status, headers, text = _post(f"{base}/invocations", body)
            version = json.loads(text).get("model_version") if status == 200 else None
            with lock:
                results.append((status, headers.get("x-model-version") or headers.get("X-Model-Version"),
                                str(version)))

    def wait_for(version: str, deadline_s: float = 90) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < deadline_s:
            with lock:
                last = [r[1] for r in results[-24:]]
            if len(last) == 24 and set(last) == {version}:
                return
            time.sleep(0.2)
        raise AssertionError(f"never switched to version {version}: last answers {last}")

    def metrics() -> dict:
        with urllib.request.urlopen(f"{base}/metrics", timeout=30) as r:
            return {f.name: f for f in text_string_to_metric_families(r.read().decode())}

    def errors(fams: dict) -> dict[str, float]:
        return {s.labels["kind"]: s.value for s in fams["damage_serving_errors"].samples if s.name.endswith("_total")}

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        wait_for(vs["one"])
        for target in ("two", "vehicle", "two"):  # two moves, then a rollback
            move_production(c, NAME, vs[target])
            wait_for(vs[target])
        move_production(c, NAME, vs["broken"])
        deadline = time.monotonic() + 120
        while errors(metrics()).get("load_failed", 0) < 1:  # a replica tried the broken version and refused it
            assert time.monotonic() < deadline, "no replica reported a load failure of the broken version"
            time.sleep(0.3)
        with lock:
            n_before = len(results)
        while len(results) - n_before < 16 and time.monotonic() < deadline:  # answers given since then
            time.sleep(0.1)
        with lock:
            after_broken = {r[1] for r in results[n_before:]}
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    failed = [r for r in results if r[0] != 200]
    print(f"alias test: {len(results)} requests, {len(failed)} failed, versions answered "
          f"{sorted({r[1] for r in results})}, after the broken version {sorted(after_broken)}")
    assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:3]}"
    assert all(r[1] == r[2] for r in results), "a header and a body named different versions"
    assert {r[1] for r in results} == {vs["one"], vs["two"], vs["vehicle"]}
    assert after_broken == {vs["two"]}, "a version that failed to load must leave the old one in service"

    t0 = time.monotonic()
    while True:  # the replicas report without waiting: give the last reports a moment
        fams = metrics()
        answered = sum(s.value for s in fams["damage_serving_requests"].samples if s.name.endswith("_total"))
        if answered >= len(results) or time.monotonic() - t0 > 30:
            break
        time.sleep(0.5)
    assert answered == len(results)
    assert errors(fams).get("load_failed", 0) >= 1
    in_service = {s.labels["version"] for s in fams["damage_serving_version_info"].samples if s.value == 1}
    assert vs["two"] in in_service and vs["one"] not in in_service
    hist = fams["damage_serving_latency_seconds"]
    assert any(s.name.endswith("_count") and s.value > 0 for s in hist.samples)
    deadline = time.monotonic() + 60
    while True:  # each replica polls on its own: the one that answers may not have tried the broken version yet
        with urllib.request.urlopen(f"{base}/version", timeout=30) as r:
            info = json.loads(r.read())
        if info["primary"]["failed_version"] == vs["broken"] or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert info["primary"]["version"] == vs["two"] and info["primary"]["failed_version"] == vs["broken"]
    serve.delete("alias")


def test_refusals_match_mlflow_scoring_server(served, tmp_path):
    """Bomb, wrong schema, garbage, wrong content type: same status and body as MLflow's own server app."""
    import base64

    import mlflow.pyfunc
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server
    from ray import serve

    from tests.unit.test_issue13_serving import png_bomb

    uri, vs, c, base, tmp = served
    move_production(c, NAME, vs["one"])
    serve.run(_app(uri, tmp, {"window": 1000}, replicas=1, poll_s=5), name="refuse", route_prefix="/")
    from damage.model_registry.serving import resolve

    _, local = resolve(f"models:/{NAME}/{vs['one']}", tmp / "cache", uri)
    reference = TestClient(scoring_server.init(mlflow.pyfunc.load_model(str(local))))
    bomb = base64.b64encode(png_bomb(tmp_path / "bomb.png").read_bytes()).decode()
    cases = [
        ("bomb", request_body(bomb), "application/json"),
        ("schema", json.dumps({"dataframe_split": {"columns": ["image"], "data": [[1, 2]]}}).encode(),
         "application/json"),
        ("rows", json.dumps({"dataframe_records": [{"image": png_b64()}] * 17}).encode(), "application/json"),
        ("garbage-json", b"{not json", "application/json"),
        ("garbage-b64", request_body("!!not base64"), "application/json"),
        ("no-format", json.dumps({"data": [1]}).encode(), "application/json"),
        ("ctype", b"x", "application/xml"),
    ]
    for label, body, ctype in cases:
        status, headers, text = _post(f"{base}/invocations", body, ctype)
        ref = reference.post("/invocations", content=body, headers={"Content-Type": ctype})
        assert status == ref.status_code, (label, status, text[:300], ref.text[:300])
        if status == 200:
            got = json.loads(text)
            assert got.pop("model_version") == vs["one"]
            assert got == ref.json(), label
        else:
            assert _without_trace(text) == _without_trace(ref.text), label
        if label == "bomb":
            assert "exceeds max_pixels" in text
    serve.delete("refuse")


def _without_trace(text: str) -> object:
    """The error body without its stack trace, set literals sorted (their order is per process)."""
    import re

    try:
        d = json.loads(text)
    except json.JSONDecodeError:
        return text
    d.pop("stack_trace", None)
    if isinstance(d.get("message"), str):
        d["message"] = re.sub(r"\{('[^{}]*')\}", lambda m: "{" + ", ".join(sorted(m[1].split(", "))) + "}",
                              d["message"])
    return d


def test_canary_and_shadow_through_the_server(served):
    """@staging as a 50 % canary and as the shadow: the split follows the request-id hash, the shadow
    report reaches the candidate version in MLflow, and a shadow that cannot load leaves production alone."""
    from ray import serve

    from damage.model_registry.serving import SHADOW_TAG, log_window, shadow_report
    from damage.tasks.serving.scoring import canary_share

    uri, vs, c, base, tmp = served
    move_production(c, NAME, vs["one"])
    c.set_registered_model_alias(NAME, "staging", vs["two"])
    sink = functools.partial(log_window, NAME, "serving-tests", uri)
    app = _app(uri, tmp, {"window": 10, "window_min": 60, "sink": sink}, replicas=1, poll_s=5,
               canary={"model": f"models:/{NAME}@staging", "weight": 0.5}, shadow=f"models:/{NAME}@staging")
    serve.run(app, name="canary", route_prefix="/")
    body = request_body(png_b64())
    seen = {}
    for i in range(40):
        rid = f"claim-{i}"
        status, headers, text = _post(f"{base}/invocations", body, rid=rid)
        assert status == 200, text[:300]
        seen[rid] = json.loads(text)["model_version"]
    expected = {rid: vs["two"] if canary_share(rid) < 0.5 else vs["one"] for rid in seen}
    assert seen == expected
    assert set(seen.values()) == {vs["one"], vs["two"]}
    # the shadow mirrors the primary's requests (about 20), in windows of 10 comparisons
    t0 = time.monotonic()
    report = None
    while time.monotonic() - t0 < 60:
        report = shadow_report(NAME, vs["two"], uri)
        if report and report["images"] + report["dropped"] >= 10:
            break
        time.sleep(0.5)
    assert report is not None, f"no {SHADOW_TAG} tag on the candidate"
    assert report["candidate"] == vs["two"] and report["primary"] == vs["one"] and report["errors"] == 0
    assert report["images"] > 0  # sequential requests: the shadow is never busy enough to drop all
    # v2 = v1's dent plus a second one: one matched pair per image, IoU 1
    assert report["counts_primary"]["dent"] * 2 == report["counts_candidate"]["dent"]
    assert report["mask_iou_mean"] == 1.0 and report["unmatched_candidate"] == report["images"]
    run = c.get_run(report["run_id"])
    assert run.data.metrics["shadow/images"] >= 0 and run.data.tags["damage.model_version"] == vs["two"]
    serve.delete("canary")

    c.set_registered_model_alias(NAME, "staging", vs["broken"])
    serve.run(_app(uri, tmp, {"window": 1000}, replicas=1, poll_s=5, shadow=f"models:/{NAME}@staging"),
              name="broken-shadow", route_prefix="/")
    for i in range(5):
        status, headers, text = _post(f"{base}/invocations", body, rid=f"b-{i}")
        assert status == 200 and json.loads(text)["model_version"] == vs["one"]
    with urllib.request.urlopen(f"{base}/version", timeout=30) as r:
        assert json.loads(r.read())["shadow"]["version"] is None
    serve.delete("broken-shadow")
