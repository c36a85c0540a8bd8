"""Monitoring what production sees: windows of requests, drift against the training data, /metrics.

Each answered request contributes a small summary (``damage.tasks.serving.scoring.request_summary``: the
data gate's per-image measures, the predicted classes, confidences and damage percentages, its
latency and error kind). ``ServingMonitor`` keeps

* Prometheus metrics (``metrics_text``, the ``/metrics`` endpoint): ``damage_serving_requests_total``
  by version and HTTP status, ``damage_serving_latency_seconds`` (histogram), ``damage_serving_errors_total``
  by kind, ``damage_serving_version_info`` (1 for the version in service), shadow outcomes;
* one **window** per served version, closed after ``serving.window`` requests or
  ``serving.window_min`` minutes. A closed window is a report: the input profile (a dataset
  profile of the window's images, ``damage.tasks.validation.drift.sketch`` of width, height,
  brightness, blur, contrast), prediction statistics (per-class counts, a confidence histogram,
  the damage-% distribution), latency and errors, and the **drift** of its input profile against
  the profile of the version's training data, checked by the data gate's own drift suite (the
  same table, limits and codes: ``distribution_drift``). It goes to the injected ``sink``
  (MLflow: ``damage.model_registry.serving.log_window``); drift findings or an error share over
  ``serving.max_error_rate`` send a ``serving`` notification (``notify.urls``);
* the **shadow report** of the window (``damage.tasks.serving.shadow.ShadowReport``), to the same sink,
  on the candidate's version.

Nothing here talks to the registry: the training profile (``reference``) and the sink are injected.

Example:
    >>> mon = ServingMonitor(window=100, window_min=5, validate=cfg.validation, notify=cfg.notify,
    ...                      sink=log_window_fn, reference=profile_fn)
    >>> mon.record(request_summary(res, "3"))
    >>> mon.flush()  # close every open window now
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from damage.tasks.serving.shadow import ShadowReport

log = logging.getLogger(__name__)

PROFILE_COLUMNS = ("width", "height", "brightness", "blur", "contrast")
CONF_BINS = [round(x, 1) for x in np.linspace(0, 1, 11)]
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
Sink = Callable[[str, str, int, dict[str, Any]], None]  # (kind: window|shadow, version, index, report)


class _Window:
    def __init__(self, version: str):
        self.version, self.started = version, time.time()
        self.requests = self.row_errors = 0
        self.errors: dict[str, int] = {}
        self.latency: list[float] = []
        self.columns: dict[str, list[float]] = {c: [] for c in PROFILE_COLUMNS}
        self.classes: dict[str, int] = {}
        self.scores: list[float] = []
        self.damage: list[float] = []

    def add(self, s: dict[str, Any]) -> None:
        self.requests += 1
        self.row_errors += int(s.get("row_errors") or 0)
        if s.get("error_kind"):
            self.errors[s["error_kind"]] = self.errors.get(s["error_kind"], 0) + 1
        self.latency.append(float(s["latency_s"]))
        for im in s.get("images", []):
            for c in PROFILE_COLUMNS:
                self.columns[c].append(float(im[c]))
        for k, v in s.get("classes", {}).items():
            self.classes[k] = self.classes.get(k, 0) + int(v)
        self.scores += s.get("scores", [])
        self.damage += s.get("damage_percent", [])


def window_profile(columns: dict[str, list[float]], label: str) -> dict[str, Any]:
    """A dataset profile (``damage.tasks.validation.drift``) of a window's images: input columns only."""
    from damage.tasks.validation.drift import PROFILE_KIND, PROFILE_VERSION, sketch

    n = len(next(iter(columns.values()), []))
    return {"kind": PROFILE_KIND, "version": PROFILE_VERSION, "dataset": label, "fingerprint": "", "images": n,
            "annotations": 0, "splits": {}, "classes": [], "class_counts": {}, "class_shares": {},
            "columns": {c: sketch(np.asarray(v, np.float64)) for c, v in columns.items()}}


def input_view(profile: dict[str, Any]) -> dict[str, Any]:
    """A training profile cut to the input columns: labels have no counterpart in served images."""
    return {**profile, "classes": [], "class_counts": {}, "class_shares": {}, "annotations": 0,
            "columns": {c: v for c, v in profile.get("columns", {}).items() if c in PROFILE_COLUMNS}}


class DriftChecker:
    """The data gate's drift suite (Great Expectations), built once, run on each window's table."""

    def __init__(self, validate: Any):
        self.cfg = validate
        self._runner = None
        self._lock = threading.Lock()

    def check(self, reference: dict[str, Any], current: dict[str, Any], file: str) -> tuple[list[dict], list[dict]]:
        """(findings ``{"code", "file", "detail"}``, the drift table's rows)."""
        from damage.tasks.validation.drift import drift_parameters, drift_table

        table = drift_table(input_view(reference), current, self.cfg, file)
        if table.empty:
            return [], []
        from damage.expectations import DRIFT_SUITE
        from damage.expectations.gx import GxRunner, findings_from_results

        with self._lock:  # one GE context, not thread-safe
            if self._runner is None:
                self._runner = GxRunner(None, (DRIFT_SUITE,))
            params = drift_parameters(self.cfg)
            findings = findings_from_results(self._runner.validate({"drift": table}, params), {"drift": table}, params)
        rows = [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()}
                for r in table.to_dict("records")]
        return findings, rows


def _q(v: list[float], p: float) -> float | None:
    return round(float(np.percentile(v, p)), 4) if v else None


class ServingMonitor:
    """Windows, drift, shadow reports and Prometheus metrics of one serving application.

    Args:
        window: requests per window. window_min: minutes per window at most.
        validate: the ``validate`` config (drift limits). notify: the ``notify`` config.
        sink: where closed windows and shadow reports go (None: kept in ``reports`` only).
        reference: ``version -> training-data profile or None`` (None: no drift check).
        max_error_rate: error share of a window over which a notification is sent.
        monitor: False = only Prometheus metrics (no windows, no drift).
    """

    def __init__(self, window: int = 200, window_min: float = 5.0, validate: Any = None, notify: Any = None,
                 sink: Sink | None = None, reference: Callable[[str], dict | None] | None = None,
                 max_error_rate: float = 0.05, monitor: bool = True):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.window, self.window_s = int(window), float(window_min) * 60
        self.validate, self.notify, self.sink, self.reference = validate, notify, sink, reference
        self.max_error_rate, self.monitor = float(max_error_rate), bool(monitor)
        self.registry = CollectorRegistry()
        self.m_requests = Counter("damage_serving_requests", "Answered requests", ["version", "status"],
                                  registry=self.registry)
        self.m_latency = Histogram("damage_serving_latency_seconds", "Scoring time of a request", ["version"],
                                   buckets=LATENCY_BUCKETS, registry=self.registry)
        self.m_errors = Counter("damage_serving_errors", "Refused or failed requests and rows by kind", ["kind"],
                                registry=self.registry)
        self.m_version = Gauge("damage_serving_version_info", "1 for the version in service", ["version", "role"],
                               registry=self.registry)
        self.m_shadow = Counter("damage_serving_shadow", "Mirrored requests by outcome", ["outcome"],
                                registry=self.registry)
        self.m_drift = Gauge("damage_serving_drift_findings", "Drift findings of the last closed window",
                             ["version"], registry=self.registry)
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}
        self._index: dict[str, int] = {}
        self._shadow: dict[tuple[str, str], ShadowReport] = {}
        self._shadow_total: dict[tuple[str, str], tuple[ShadowReport, int]] = {}
        self._shadow_started = time.time()
        self._refs: dict[str, dict | None] = {}
        self._drift = DriftChecker(validate) if validate is not None else None
        self._alerted: set[str] = set()
        self.reports: list[tuple[str, str, dict[str, Any]]] = []  # (kind, version, report), newest last

    # -- input ------------------------------------------------------------------------------------

    def record(self, summary: dict[str, Any]) -> None:
        """One answered request (``request_summary``); closes its window when it is full or old."""
        v, status = str(summary["version"]), str(summary["status"])
        self.m_requests.labels(v, status).inc()
        self.m_latency.labels(v).observe(float(summary["latency_s"]))
        if summary.get("error_kind"):
            self.m_errors.labels(summary["error_kind"]).inc(max(1, int(summary.get("row_errors") or 0)))
        if not self.monitor:
            return
        with self._lock:
            w = self._windows.setdefault(v, _Window(v))
            w.add(summary)
            full = w.requests >= self.window or time.time() - w.started >= self.window_s
            if full:
                del self._windows[v]
        if full:
            self._close(w)

    def set_version(self, version: str, role: str = "primary", previous: str | None = None) -> None:
        """The version now in service (``role``: primary | canary | shadow)."""
        if previous and previous != version:
            self.m_version.labels(previous, role).set(0)
        self.m_version.labels(version, role).set(1)

    def record_shadow(self, candidate: str, primary: str, part: dict[str, Any]) -> None:
        """A replica's comparisons (``ShadowReport.to_dict(raw=True)``); the report closes with the window."""
        self.m_shadow.labels("compared").inc(part["images"])
        self.m_shadow.labels("error").inc(part["errors"])
        self.m_shadow.labels("dropped").inc(part["dropped"])
        with self._lock:
            rep = self._shadow.setdefault((candidate, primary), ShadowReport(candidate, primary))
            rep.merge(part)
            due = rep.images + rep.errors >= self.window or time.time() - self._shadow_started >= self.window_s
            if due:
                del self._shadow[(candidate, primary)]
                self._shadow_started = time.time()
        if due:
            self._emit_shadow(rep)

    def load_failed(self, version: str, uri: str, error: str) -> None:
        """A version that failed to load (the old one stays in service): logged and notified once."""
        self.m_errors.labels("load_failed").inc()
        log.error("serving: version %s of %s failed to load; the previous version stays in service: %s",
                  version, uri, error)
        key = f"load:{uri}:{version}"
        if key not in self._alerted:
            self._alerted.add(key)
            self._notify(f"damage serving: version {version} failed to load",
                         f"`{uri}` moved to version {version}, which failed to load; the previous version "
                         f"stays in service.\n\n**Error:** {error[:1500]}")

    # -- output -----------------------------------------------------------------------------------

    def metrics_text(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def tick(self) -> None:
        """Close windows older than ``window_min`` (called periodically: a quiet server still reports)."""
        now = time.time()
        with self._lock:
            old = [v for v, w in self._windows.items() if now - w.started >= self.window_s]
            closing = [self._windows.pop(v) for v in old]
            shadows = []
            if now - self._shadow_started >= self.window_s:
                shadows, self._shadow = list(self._shadow.values()), {}
                self._shadow_started = now
        for w in closing:
            self._close(w)
        for rep in shadows:
            self._emit_shadow(rep)

    def flush(self) -> None:
        """Close every open window and shadow report now."""
        with self._lock:
            closing, self._windows = list(self._windows.values()), {}
            shadows, self._shadow = list(self._shadow.values()), {}
        for w in closing:
            self._close(w)
        for rep in shadows:
            self._emit_shadow(rep)

    # -- windows ----------------------------------------------------------------------------------

    def _reference(self, version: str) -> dict | None:
        if version not in self._refs:
            try:
                self._refs[version] = self.reference(version) if self.reference else None
            except Exception as e:  # monitoring never stops serving
                log.warning("serving: no training profile for version %s: %s", version, e)
                self._refs[version] = None
        return self._refs[version]

    def window_report(self, w: _Window, index: int) -> dict[str, Any]:
        """The report of a closed window (see the module docstring)."""
        n = w.requests
        errors = sum(w.errors.values())
        hist = np.histogram(w.scores, bins=CONF_BINS)[0].tolist() if w.scores else [0] * (len(CONF_BINS) - 1)
        label = f"serving v{w.version} window {index}"
        report: dict[str, Any] = {
            "version": w.version, "window": index, "requests": n, "images": len(w.columns["width"]),
            "started": round(w.started, 3), "seconds": round(time.time() - w.started, 3),
            "errors": dict(w.errors), "error_rate": round(errors / n, 4) if n else 0.0,
            "row_errors": w.row_errors,
            "latency_ms_p50": None if not w.latency else round(float(np.percentile(w.latency, 50)) * 1000, 3),
            "latency_ms_p95": None if not w.latency else round(float(np.percentile(w.latency, 95)) * 1000, 3),
            "input": {c: {"median": _q(v, 50), "p05": _q(v, 5), "p95": _q(v, 95)} for c, v in w.columns.items()},
            "profile": window_profile(w.columns, label),
            "predictions": {"classes": dict(sorted(w.classes.items())), "instances": len(w.scores),
                            "confidence_bins": CONF_BINS, "confidence_hist": hist,
                            "damage_percent": {"n": len(w.damage), "mean": None if not w.damage else
                                               round(float(np.mean(w.damage)), 3),
                                               "p50": _q(w.damage, 50), "p95": _q(w.damage, 95)}},
            "drift": {"reference": None, "findings": [], "table": []},
        }
        ref = self._reference(w.version)
        if ref is not None and self._drift is not None and report["images"]:
            try:
                findings, table = self._drift.check(ref, report["profile"], label)
                report["drift"] = {"reference": {"dataset": ref.get("dataset"), "fingerprint": ref.get("fingerprint")},
                                   "findings": findings, "table": table}
            except Exception as e:
                log.warning("serving: drift check of %s failed: %s: %s", label, type(e).__name__, e)
                report["drift"]["error"] = f"{type(e).__name__}: {e}"
        return report

    def _close(self, w: _Window) -> None:
        with self._lock:
            index = self._index[w.version] = self._index.get(w.version, 0) + 1
        report = self.window_report(w, index)
        findings = report["drift"]["findings"]
        self.m_drift.labels(w.version).set(len(findings))
        self._emit("window", w.version, report)
        alerts = []
        if findings:
            alerts.append(f"{len(findings)} drift finding(s) against the training data:\n" +
                          "\n".join(f"- {f['code']}: {f['detail']}" for f in findings[:10]))
        if report["error_rate"] > self.max_error_rate:
            alerts.append(f"error rate {report['error_rate']:.1%} > serving.max_error_rate "
                          f"{self.max_error_rate:.1%} ({report['errors']})")
        if alerts:
            self._notify(f"damage serving: version {w.version}, window {index}", "\n\n".join(alerts))

    def _emit_shadow(self, rep: ShadowReport) -> None:
        """A closed shadow window, with ``total``: every window of this service so far."""
        key = (rep.candidate, rep.primary)
        with self._lock:
            total, n = self._shadow_total.get(key, (ShadowReport(*key), 0))
            total.merge(rep.to_dict(raw=True))
            self._shadow_total[key] = (total, n + 1)
        report = {**rep.to_dict(), "window": n + 1, "total": {**total.to_dict(), "windows": n + 1}}
        self._emit("shadow", rep.candidate, report)

    def _emit(self, kind: str, version: str, report: dict[str, Any]) -> None:
        with self._lock:
            index = len([r for r in self.reports if r[0] == kind and r[1] == version]) + 1
            self.reports.append((kind, version, report))
        if self.sink is not None:
            try:
                self.sink(kind, version, report.get("window", index), report)
            except Exception as e:  # a tracking server that is down never stops serving
                log.warning("serving: %s report of version %s not logged: %s: %s", kind, version, type(e).__name__, e)

    def _notify(self, title: str, body: str) -> None:
        if self.notify is None:
            return
        from damage.tasks.core.notify import send

        send(self.notify, "serving", title, body)
