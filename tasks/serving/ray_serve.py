"""The Ray Serve scoring server: replicas of the torch-free predictor that follow a registry alias.

``damage serve --replicas N`` builds this application (``build_app``) and runs it on loopback:

* **Same protocol as ``mlflow models serve``.** ``POST /invocations`` goes through
  ``damage.tasks.serving.scoring.score`` (MLflow's own scoring code on the version's pyfunc), so existing
  clients keep working and bad requests are refused the same way. ``/ping``, ``/health``,
  ``/version`` (the versions in service, JSON) and ``/metrics`` (Prometheus) answer too.
* **Follows the alias.** Each replica looks at its URIs every ``poll_s`` seconds (``resolve`` is
  injected: ``damage.model_registry.serving.resolve``). A moved alias loads in a background thread while
  the old version keeps answering; then one attribute assignment switches: a request runs whole
  on the slot it picked up, so none fails and none mixes versions. A version that fails to load
  leaves the old one in service; the monitor logs it and notifies once.
* **Canary** (``canary_weight`` of requests, chosen by ``canary_share`` of the request id) and
  **shadow** (every request's decoded images mirrored to the candidate in the background, at most
  ``shadow_max_inflight`` per replica, more are dropped and counted; its answer is never returned
  and its failures never touch the primary's answer).
* **Monitoring**: each answered request's summary goes, without waiting, to one ``Monitor``
  replica (``damage.tasks.serving.monitor.ServingMonitor``): windows, drift, shadow reports, /metrics.

Every answer names its version (``X-Model-Version``; ``model_version`` in a 200's JSON).

Example:
    >>> app = build_app("models:/damage-seg@production", resolve_fn, ServingConfig(replicas=2), ...)
    >>> serve.start(http_options={"host": "127.0.0.1", "port": 8000}); serve.run(app, name="damage")
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from damage.tasks.serving.monitor import ServingMonitor
from damage.tasks.serving.scoring import (
    REQUEST_ID_HEADER,
    Slot,
    canary_share,
    load_slot,
    request_summary,
    score,
)
from damage.tasks.serving.shadow import ShadowReport, compare

log = logging.getLogger(__name__)

APP_NAME = "damage"
Resolver = Callable[[str], tuple[str, Path]]  # model URI -> (version, local pyfunc folder)


class Follower:
    """One model URI followed by one replica: the slot in service, swapped when the URI moves.

    ``check()`` is what the poll thread calls: resolve, and if the version changed, load it (the
    old slot answers meanwhile) and swap. ``on_failure(version, uri, error)`` hears of a version
    that failed to load; it is not retried until the URI names another version.
    """

    def __init__(self, uri: str, resolve: Resolver, threads: int,
                 on_failure: Callable[[str, str, str], None] | None = None,
                 on_switch: Callable[[str, str | None], None] | None = None):
        self.uri, self.resolve, self.threads = uri, resolve, threads
        self.on_failure, self.on_switch = on_failure, on_switch
        self.slot: Slot | None = None
        self.failed: str | None = None
        self._lock = threading.Lock()  # one load at a time

    def check(self) -> bool:
        """Resolve the URI and switch if it names another version; True when it switched."""
        with self._lock:
            try:
                version, local = self.resolve(self.uri)
            except Exception as e:  # a registry that is down: keep serving what is loaded
                if self.slot is None:
                    raise
                log.warning("serving: cannot resolve %s (keeping version %s): %s", self.uri, self.slot.version, e)
                return False
            if self.slot is not None and self.slot.version == version or version == self.failed:
                return False
            try:
                slot = load_slot(version, local, self.threads, self.uri)
            except Exception as e:
                self.failed = version
                if self.slot is None:
                    raise
                if self.on_failure:
                    self.on_failure(version, self.uri, f"{type(e).__name__}: {e}")
                return False
            previous = self.slot.version if self.slot else None
            self.slot, self.failed = slot, None  # the switch: requests pick up one slot and keep it
            log.info("serving: %s now answers with version %s (was %s)", self.uri, version, previous)
            if self.on_switch:
                self.on_switch(version, previous)
            return True


class Monitor:
    """The Ray Serve deployment around ``ServingMonitor`` (one replica: the one /metrics and window store)."""

    def __init__(self, monitor_kwargs: dict[str, Any], tick_s: float = 5.0):
        self.monitor = ServingMonitor(**monitor_kwargs)
        self._stop = threading.Event()
        threading.Thread(target=self._tick, args=(tick_s,), daemon=True, name="monitor-tick").start()

    def _tick(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.monitor.tick()
            except Exception as e:
                log.warning("serving monitor: %s", e)

    def record(self, summary: dict[str, Any]) -> None:
        self.monitor.record(summary)

    def record_shadow(self, candidate: str, primary: str, part: dict[str, Any]) -> None:
        self.monitor.record_shadow(candidate, primary, part)

    def load_failed(self, version: str, uri: str, error: str) -> None:
        self.monitor.load_failed(version, uri, error)

    def set_version(self, version: str, role: str, previous: str | None) -> None:
        self.monitor.set_version(version, role, previous)

    def metrics(self) -> bytes:
        return self.monitor.metrics_text()

    def flush(self) -> list[tuple[str, str, dict[str, Any]]]:
        """Close every window now; returns every report so far (tests, shutdown)."""
        self.monitor.flush()
        return list(self.monitor.reports)


class Server:
    """The ingress deployment: routes, alias following, canary, shadow (see the module docstring)."""

    def __init__(self, primary: str, resolve: Resolver, monitor: Any, threads: int = 1, poll_s: float = 10.0,
                 canary: str | None = None, canary_weight: float = 0.0, shadow: str | None = None,
                 shadow_max_inflight: int = 2, windows: bool = True, inbox: Any = None):
        self.monitor, self.windows = monitor, bool(windows)
        self.inbox = inbox  # serving.collect (README "Labelling loop"): None = off
        self.canary_weight, self.max_inflight, self.poll_s = float(canary_weight), int(shadow_max_inflight), poll_s
        self.shadow_inflight = 0
        self._pending: set = set()  # shadow tasks, referenced until done
        self._recent: deque = deque(maxlen=1024)  # monitor calls sent without waiting

        def follower(uri: str, role: str) -> Follower:
            return Follower(uri, resolve, threads, on_failure=self._failed,
                            on_switch=lambda v, prev: self._send(self.monitor.set_version.remote(v, role, prev)))

        self.primary = follower(primary, "primary")
        self.primary.check()  # the primary must load: a replica without a model does not start
        self.extra = {role: follower(uri, role) for role, uri in (("canary", canary), ("shadow", shadow)) if uri}
        for role, f in self.extra.items():
            try:
                f.check()
            except Exception as e:  # a candidate that does not load never stops production
                log.warning("serving: %s %s not loaded: %s", role, f.uri, e)
        self._stop = threading.Event()
        threading.Thread(target=self._poll, daemon=True, name="alias-poll").start()

    def __del__(self):
        self._stop.set()

    # -- following --------------------------------------------------------------------------------

    def _failed(self, version: str, uri: str, error: str) -> None:
        self._send(self.monitor.load_failed.remote(version, uri, error))

    def _send(self, response: Any) -> None:
        """Keep a fire-and-forget call referenced for a while (its result is never awaited)."""
        self._recent.append(response)

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            for f in (self.primary, *self.extra.values()):
                try:
                    f.check()
                except Exception as e:
                    log.warning("serving: %s: %s", f.uri, e)

    # -- requests ---------------------------------------------------------------------------------

    def _pick(self, request_id: str) -> Slot:
        canary = self.extra.get("canary")
        if canary is not None and canary.slot is not None and canary_share(request_id) < self.canary_weight:
            return canary.slot
        return self.primary.slot

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import Response

        # routes are one segment under the application's route prefix (``/`` or e.g. ``/canary``)
        path = "/" + request.url.path.rstrip("/").rsplit("/", 1)[-1]
        if path in ("/ping", "/health"):
            return Response("\n", status_code=200, media_type="application/json")
        if path == "/version":
            body = {"primary": self._describe(self.primary),
                    **{role: self._describe(f) for role, f in self.extra.items()}}
            return Response(json.dumps(body), media_type="application/json")
        if path == "/metrics":
            text = await self.monitor.metrics.remote()
            return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")
        if path != "/invocations":
            return Response(json.dumps({"error": f"no route {path}: POST /invocations, GET /ping /version /metrics"}),
                            status_code=404, media_type="application/json")
        if request.method != "POST":
            return Response("Method Not Allowed", status_code=405, media_type="text/plain")
        rid = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        slot = self._pick(rid)
        data = await request.body()
        res = await asyncio.to_thread(score, slot, data, request.headers.get("content-type"), rid)
        shadow = self.extra.get("shadow")
        if shadow is not None and shadow.slot is not None and res.rows and slot is self.primary.slot:
            if self.shadow_inflight < self.max_inflight:
                self.shadow_inflight += 1
                self._spawn(self._shadow(shadow.slot, slot.version, res))
            else:
                self._send(self.monitor.record_shadow.remote(shadow.slot.version, slot.version, _dropped(
                    shadow.slot.version, slot.version)))
        if self.windows:  # the image measures cost a little: only when windows are kept
            summary = await asyncio.to_thread(request_summary, res, slot.version)
        else:
            summary = {"version": slot.version, "status": res.status, "error_kind": res.error_kind,
                       "row_errors": res.row_errors, "latency_s": res.latency_s}
        self._send(self.monitor.record.remote(summary))
        if self.inbox is not None and res.rows:  # uncertain requests go to the labelling inbox, off the request path
            self._spawn(asyncio.to_thread(collect_rows, self.inbox, res.rows))
        return Response(res.body, status_code=res.status, headers=res.headers, media_type=res.mimetype)

    def _spawn(self, coro: Any) -> None:
        """Run ``coro`` in the background, referenced until it is done (the request does not wait for it)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _shadow(self, cand: Slot, primary_version: str, res: Any) -> None:
        """Score the primary's decoded images with the candidate, compare, report; never raises."""
        try:
            part = await asyncio.to_thread(shadow_compare, cand, primary_version, res, self.inbox)
        except Exception as e:  # a broken shadow is a counted error, nothing more
            rep = ShadowReport(cand.version, primary_version, errors=1)
            part = rep.to_dict(raw=True)
            log.warning("serving: shadow v%s failed: %s: %s", cand.version, type(e).__name__, e)
        finally:
            self.shadow_inflight -= 1
        self._send(self.monitor.record_shadow.remote(cand.version, primary_version, part))

    @staticmethod
    def _describe(f: Follower) -> dict[str, Any]:
        s = f.slot
        return {"uri": f.uri, "version": s.version if s else None, "loaded_at": s.loaded_at if s else None,
                "failed_version": f.failed}


def _dropped(candidate: str, primary: str) -> dict[str, Any]:
    return ShadowReport(candidate, primary, dropped=1).to_dict(raw=True)


def shadow_compare(cand: Slot, primary_version: str, res: Any, inbox: Any = None) -> dict[str, Any]:
    """The candidate's predictions of ``res``'s decoded images, compared with the primary's; with an
    ``inbox``, images where the two disagree are offered to it (``Inbox.maybe_collect(..., other=...)``)."""
    rep = ShadowReport(cand.version, primary_version)
    per_image = res.latency_s / max(1, len(res.rows))
    for image, pred in res.rows:
        t0 = time.perf_counter()
        cpred = cand.predictor.predict(image)[0]
        rep.add(compare(pred, cpred), time.perf_counter() - t0, per_image)
        if inbox is not None and inbox.config.disagreement:
            inbox.maybe_collect(encode_png(image), pred, other=cpred.to_dict("shadow"))
    return rep.to_dict(raw=True)


def encode_png(image: Any) -> bytes:
    """The decoded request image as PNG (what the inbox keeps: the image, not the request)."""
    import cv2

    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise ValueError("the decoded image could not be encoded as PNG")
    return buf.tobytes()


def collect_rows(inbox: Any, rows: list) -> int:
    """Offer each (image, prediction) of a request to the inbox (band rule, rate cap); never raises."""
    n = 0
    for image, pred in rows:
        try:
            n += inbox.maybe_collect(encode_png(image), pred) is not None
        except Exception as e:  # an inbox failure is a warning, never a failed request
            log.warning("serving: inbox: %s: %s", type(e).__name__, e)
    return n


def make_inbox(collect: Any, default_root: Any, max_pixels: int | None = None) -> Any:
    """The labelling inbox of ``serving.collect`` (a ``CollectConfig``), or None when collection is off."""
    if collect is None or not collect.enabled:
        return None
    from damage.tasks.data.blobstore import open_store
    from damage.tasks.serving.inbox import Inbox

    kwargs = {"max_pixels": max_pixels} if max_pixels else {}
    return Inbox(collect, open_store(collect.inbox, default_root), **kwargs)


def build_app(primary: str, resolve: Resolver, cfg: Any, monitor_kwargs: dict[str, Any],
              inbox_root: str | Path | None = None) -> Any:
    """The Ray Serve application (``serve.run`` it) for ``primary`` with ``cfg`` (``ServingConfig``).

    Args:
        primary: the model URI to follow (``models:/damage-seg@production``).
        resolve: ``uri -> (version, local_dir)`` (``damage.model_registry.serving.resolve`` bound to a cache).
        cfg: replicas or min/max autoscaling, CPUs and threads per replica, poll, canary, shadow.
        monitor_kwargs: ``ServingMonitor`` arguments (window, drift config, notify, sink, reference).
    """
    from ray import serve

    if cfg.min_replicas is not None:
        scale: dict[str, Any] = {"autoscaling_config": {"min_replicas": cfg.min_replicas,
                                                        "max_replicas": cfg.max_replicas,
                                                        "target_ongoing_requests": 2}}
    else:
        scale = {"num_replicas": cfg.replicas}
    mon = serve.deployment(Monitor, name="monitor", num_replicas=1,
                           ray_actor_options={"num_cpus": 0.1}).bind(monitor_kwargs)
    server = serve.deployment(Server, name="server", ray_actor_options={"num_cpus": cfg.replica_cpus},
                              max_ongoing_requests=8, **scale)
    canary = cfg.canary.model if cfg.canary else None
    return server.bind(primary, resolve, mon, threads=cfg.threads, poll_s=cfg.poll_s, canary=canary,
                       canary_weight=cfg.canary.weight if cfg.canary else 0.0, shadow=cfg.shadow,
                       shadow_max_inflight=cfg.shadow_max_inflight,
                       windows=monitor_kwargs.get("monitor", cfg.monitor),
                       inbox=make_inbox(cfg.collect, inbox_root))


def run(app: Any, host: str = "127.0.0.1", port: int = 8000, name: str = APP_NAME) -> None:
    """Start Serve's HTTP proxy on ``host:port`` (loopback by default) and deploy ``app`` at ``/``.

    Starts a local Ray when none is running (``ray.init`` only then; never ``ray.shutdown``).
    """
    import ray
    from ray import serve

    if not ray.is_initialized():
        if not os.environ.get("RAY_ADDRESS"):  # ray.init starts a cluster: its token in the state dir
            from damage.tasks.core.runtime import embedded_ray_token, state_paths

            embedded_ray_token(state_paths())
        ray.init(include_dashboard=False, configure_logging=False)
    serve.start(http_options={"host": host, "port": int(port)})
    serve.run(app, name=name, route_prefix="/", blocking=False)
