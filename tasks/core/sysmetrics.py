"""System metrics (CPU, memory, disk, network; GPU when present) sampled into an MLflow run.

MLflow's ``SystemMetricsMonitor`` logs ``system/*`` metrics every ``interval_s`` seconds from a
daemon thread, for the given run id (no active run needed). A step shorter than one interval
would log nothing, so one sample is taken at the end when none was published.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


@contextmanager
def system_metrics(run_id: str, interval_s: float, tracking_uri: str | None = None) -> Iterator[None]:
    """Sample system metrics into ``run_id`` while the block runs (``interval_s`` <= 0: off).

    Must close before the run is terminated (the monitor stops on a non-RUNNING run). Monitoring
    problems are logged, never raised: they must not fail a training run.
    """
    if interval_s <= 0:
        yield
        return
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        mon = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=tracking_uri)
        mon.start()
    except Exception as e:  # psutil missing, unsupported platform...
        log.warning("system metrics off for run %s: %s", run_id, e)
        yield
        return
    try:
        yield
    finally:
        try:
            mon.finish()
            if mon._logging_step == 0:  # shorter than one interval: publish one final sample
                mon.collect_metrics()
                mon.publish_metrics(mon.aggregate_metrics())
                mon.mlflow_logger.flush()
        except Exception as e:
            log.warning("system metrics for run %s not logged: %s", run_id, e)
