"""Benchmark: served throughput and latency, ``mlflow models serve`` vs Ray Serve (1 and 2 replicas).

Prints the machine line, then per concurrency (1, 8, 32 clients on loopback) requests per second,
p50 and p95 latency and errors of each server, interleaved in rounds (every server gets a burst in
each round, so a slower minute of a shared machine falls on all of them), and the ratios:

* ``rps x mlflow``: Ray Serve's requests per second over ``mlflow models serve`` (goal on a
  2-core machine: 2 replicas >= 1.5x at concurrency 8, no error);
* ``shadow p95``: 2 replicas with a shadow (the same model as candidate) over 2 replicas without
  (goal: <= 1.10; the shadow is asynchronous but shares the cores);
* ``monitor p95``: 2 replicas with monitoring windows over 2 replicas with ``serving.monitor: false``
  (goal: <= 1.05).

The model is a yolov8n-seg with random weights exported at ``--imgsz`` (no download), registered
twice in a temporary SQLite MLflow store; requests carry one ``--image-px`` JPEG each.

    flock /tmp/cpu.lock .venv/bin/python bench/bench_serving.py --seconds 3 --rounds 2
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NAME = "bench-seg"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: bytes) -> tuple[bool, float]:
    t0 = time.perf_counter()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()
            ok = r.status == 200
    except (urllib.error.URLError, OSError):
        ok = False
    return ok, time.perf_counter() - t0


def burst(url: str, body: bytes, clients: int, seconds: float) -> dict:
    """``clients`` closed-loop clients for ``seconds``: rps, latencies, errors."""
    stop = time.perf_counter() + seconds

    def client(_):
        out = []
        while time.perf_counter() < stop:
            out.append(_post(url, body))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        res = [r for part in ex.map(client, range(clients)) for r in part]
    wall = time.perf_counter() - t0
    return {"n": len(res), "wall": wall, "lat": [r[1] for r in res if r[0]], "errors": sum(1 for r in res if not r[0])}


def _wait(url: str, deadline_s: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < deadline_s:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    raise RuntimeError(f"{url} never answered")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--image-px", type=int, default=480)
    ap.add_argument("--seconds", type=float, default=3.0, help="length of one burst")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("DAMAGE_TORCH_THREADS", "1")
    from bench.common import announce_machine, build_random_model, write_json

    machine = announce_machine()
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    store = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = store
    _, onnx = build_random_model("n", work, args.imgsz)

    from mlflow.tracking import MlflowClient

    from tests.serving_helpers import register  # the tests' registration helper: pyfunc + version

    c = MlflowClient(tracking_uri=store, registry_uri=store)
    v1, v2 = register(c, NAME, onnx, work), register(c, NAME, onnx, work)
    c.set_registered_model_alias(NAME, "production", v1)
    c.set_registered_model_alias(NAME, "staging", v2)
    import cv2

    img = np.random.default_rng(0).integers(0, 255, (args.image_px, args.image_px, 3), np.uint8)
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(
        cv2.imencode(".jpg", img)[1].tobytes()).decode()]]}}).encode()

    servers: dict[str, str] = {}
    port = _port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@production",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait(f"http://127.0.0.1:{port}/ping")
        servers["mlflow models serve"] = f"http://127.0.0.1:{port}/invocations"
        import ray
        from ray import serve

        from damage.model_registry.serving import resolve
        from damage.tasks.core.config import ServingConfig
        from damage.tasks.serving.ray_serve import build_app

        ray.init(num_cpus=8, include_dashboard=False, configure_logging=False, log_to_driver=False)
        rport = _port()
        serve.start(http_options={"host": "127.0.0.1", "port": rport})
        resolver = functools.partial(resolve, cache_dir=work / "cache", tracking_uri=store)
        variants = {"ray 1 replica": ({"replicas": 1}, True), "ray 2 replicas": ({"replicas": 2}, True),
                    "ray 2 + shadow": ({"replicas": 2, "shadow": f"models:/{NAME}@staging"}, True),
                    "ray 2, no monitor": ({"replicas": 2}, False)}
        for label, (kw, monitor) in variants.items():
            prefix = "/" + label.replace(" ", "-").replace(",", "").replace("+", "plus")
            cfg = ServingConfig(replica_cpus=1.0, threads=1, poll_s=60, monitor=monitor, **kw)
            # the bench's windows never reach MLflow (no sink): the cost measured is the window work itself
            app = build_app(f"models:/{NAME}@production", resolver, cfg, {"window": 200, "monitor": monitor,
                                                                             "validate": None})
            serve.run(app, name=prefix.strip("/"), route_prefix=prefix)
            servers[label] = f"http://127.0.0.1:{rport}{prefix}/invocations"
        for url in servers.values():  # warm-up: every replica loads its session
            burst(url, body, 4, 2.0)
        results: dict[str, dict[str, dict]] = {}
        for conc in [int(x) for x in args.concurrency.split(",")]:
            agg = {k: {"n": 0, "wall": 0.0, "lat": [], "errors": 0} for k in servers}
            for _ in range(args.rounds):
                for label, url in servers.items():
                    r = burst(url, body, conc, args.seconds)
                    a = agg[label]
                    a["n"] += r["n"]
                    a["wall"] += r["wall"]
                    a["lat"] += r["lat"]
                    a["errors"] += r["errors"]
            results[str(conc)] = {k: {"rps": a["n"] / a["wall"],
                                      "p50_ms": float(np.percentile(a["lat"], 50) * 1000) if a["lat"] else None,
                                      "p95_ms": float(np.percentile(a["lat"], 95) * 1000) if a["lat"] else None,
                                      "errors": a["errors"], "n": a["n"]} for k, a in agg.items()}
            base = results[str(conc)]["mlflow models serve"]["rps"]
            print(f"\nconcurrency {conc}:")
            print(f"  {'server':22s} {'rps':>7s} {'p50 ms':>8s} {'p95 ms':>8s} {'errors':>6s} {'rps x mlflow':>12s}")
            for k, r in results[str(conc)].items():
                print(f"  {k:22s} {r['rps']:7.1f} {r['p50_ms'] or float('nan'):8.1f} {r['p95_ms'] or float('nan'):8.1f} "
                      f"{r['errors']:6d} {r['rps'] / base:12.2f}")
            two, sh, nomon = (results[str(conc)][k] for k in ("ray 2 replicas", "ray 2 + shadow", "ray 2, no monitor"))
            if two["p95_ms"] and sh["p95_ms"] and nomon["p95_ms"]:
                print(f"  shadow p95 ratio (2 + shadow / 2): {sh['p95_ms'] / two['p95_ms']:.2f}   "
                      f"monitor p95 ratio (2 / 2 no monitor): {two['p95_ms'] / nomon['p95_ms']:.2f}")
        write_json(args.json, machine, results)
        serve.shutdown()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
