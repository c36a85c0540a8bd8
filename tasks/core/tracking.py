"""MLflow tracking with explicit run ids: one parent run per pipeline run, one nested run per step.

Everything goes through ``MlflowClient`` with run ids passed in, never through MLflow's
thread-local "active run": Prefect may run tasks in worker threads, and a pipeline must never
log into the wrong run.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

_BAD_KEY = re.compile(r"[^A-Za-z0-9_\-./ :]")
_PARAM_MAX = 6000  # MLflow 3 param value limit is 6000 chars


def client(tracking_uri: str | None = None) -> MlflowClient:
    """Client for ``tracking_uri`` (default: ``$MLFLOW_TRACKING_URI`` set by ``damage.tasks.core.runtime.activate``)."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# MLflow 3 opens an experiment without this tag in its GenAI (traces) view; this value makes the
# UI open the model-training view (runs table, charts) that this project fills.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def _mark_model_training(c: MlflowClient, exp) -> None:
    if (exp.tags or {}).get(EXPERIMENT_KIND_TAG) is None:
        try:
            c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        except Exception:  # a read-only account may not tag the experiment: the UI toggle still works
            pass


def ensure_experiment(c: MlflowClient, name: str, artifact_location: str | None = None) -> str:
    """Experiment id for ``name``, created (with ``artifact_location``) if missing, tagged so the
    MLflow UI opens it in the model-training view."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        _mark_model_training(c, exp)
        return exp.experiment_id
    if artifact_location is None:
        state = os.environ.get("DAMAGE_STATE_DIR")
        uri = c.tracking_uri or ""
        if state and (uri.startswith("sqlite") or uri.startswith("file") or "://" not in uri):
            artifact_location = Path(state, "mlartifacts").as_uri()
    try:
        return c.create_experiment(name, artifact_location=artifact_location,
                                   tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # created concurrently by another process
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def metric_key(k: str) -> str:
    """MLflow-safe metric/param key."""
    return _BAD_KEY.sub("_", k)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"epochs": 3}}`` -> ``{"train.epochs": 3}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def log_params(c: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    """Log a (nested) dict as flat params in batches."""
    flat = flatten(params)
    items = [Param(metric_key(k), (json.dumps(v) if not isinstance(v, str) else v)[:_PARAM_MAX])
             for k, v in flat.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i:i + 100])


def log_metrics(c: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log numeric metrics (non-numbers and NaN are skipped) in one batch."""
    ts = int(time.time() * 1000)
    batch = []
    for k, v in metrics.items():
        try:
            fv = float(v)
        except (TypeError, ValueError):
            continue
        if fv != fv:  # NaN
            continue
        batch.append(Metric(metric_key(k), fv, ts, step or 0))
    for i in range(0, len(batch), 500):
        c.log_batch(run_id, metrics=batch[i:i + 500])


def set_tags(c: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    for k, v in tags.items():
        c.set_tag(run_id, metric_key(k), str(v)[:5000])


def log_artifact(c: MlflowClient, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """Log a file or a directory (recursively)."""
    p = Path(path)
    if p.is_dir():
        c.log_artifacts(run_id, str(p), artifact_path)
    elif p.is_file():
        c.log_artifact(run_id, str(p), artifact_path)


def log_dict(c: MlflowClient, run_id: str, data: Any, artifact_file: str) -> None:
    c.log_dict(run_id, data, artifact_file)


def start_run(c: MlflowClient, experiment_id: str, name: str, parent_run_id: str | None = None,
              tags: Mapping[str, str] | None = None) -> str:
    """Create a run (nested under ``parent_run_id`` when given); returns its id."""
    t = {MLFLOW_RUN_NAME: name, **(tags or {})}
    if parent_run_id:
        t[MLFLOW_PARENT_RUN_ID] = parent_run_id
    return c.create_run(experiment_id, run_name=name, tags=t).info.run_id


def end_run(c: MlflowClient, run_id: str, ok: bool = True) -> None:
    c.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED))


@contextmanager
def step_run(parent_run_id: str, step: str, tags: Mapping[str, str] | None = None,
             tracking_uri: str | None = None) -> Iterator[tuple[MlflowClient, str]]:
    """Nested run for one pipeline step, FINISHED on success and FAILED on an exception.

    Example:
        >>> with step_run(parent_id, "train") as (c, run_id):
        ...     log_metrics(c, run_id, {"box/mAP50": 0.7})
    """
    c = client(tracking_uri)
    parent = c.get_run(parent_run_id)
    run_id = start_run(c, parent.info.experiment_id, step, parent_run_id, {"damage.step": step, **(tags or {})})
    ok = False
    try:
        yield c, run_id
        ok = True
    finally:
        end_run(c, run_id, ok)
