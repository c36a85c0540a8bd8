"""Clickable URLs into the MLflow and Prefect UIs: one place builds them, every printer uses it.

MLflow 3 opens an experiment in its GenAI view unless told otherwise; every MLflow link carries
``workflowType=machine_learning`` so it lands on the runs table / run page of the model-training
view (the experiment also gets the ``mlflow.experimentKind`` tag, see ``tracking.ensure_experiment``).
"""

from __future__ import annotations

import os
from urllib.parse import quote

DEFAULT_MLFLOW_UI = "http://127.0.0.1:5000"  # what `damage ui` / `make ui-mlflow` start
DEFAULT_PREFECT_UI = "http://127.0.0.1:4200"
ML_VIEW = "workflowType=machine_learning"


def mlflow_base(ui_url: str | None = None, tracking_uri: str | None = None) -> str:
    """The MLflow UI base URL: ``ui_url``, else an http(s) tracking URI, else the local default."""
    if ui_url:
        return ui_url.rstrip("/")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return DEFAULT_MLFLOW_UI


def mlflow_run_url(experiment_id: str, run_id: str, base: str | None = None) -> str:
    """Run page in the model-training view.

    Example:
        >>> mlflow_run_url("1", "abc", "http://h:5000")
        'http://h:5000/#/experiments/1/runs/abc?workflowType=machine_learning'
    """
    return f"{mlflow_base(base)}/#/experiments/{experiment_id}/runs/{run_id}?{ML_VIEW}"


# Oldest first: the nested step runs under a pipeline run then read top to bottom (validate, train,
# evaluate ... promotion-gate) instead of the UI's default newest-first order.
PIPELINE_ORDER = "orderByKey=attributes.start_time&orderByAsc=true"


def mlflow_experiment_url(experiment_id: str, base: str | None = None) -> str:
    """Experiment runs table in the model-training view, steps in pipeline order."""
    return f"{mlflow_base(base)}/#/experiments/{experiment_id}/runs?{ML_VIEW}&{PIPELINE_ORDER}"


def mlflow_version_url(model_name: str, version: str | int, base: str | None = None) -> str:
    """Registered model version page (renders the version description, the model card)."""
    return f"{mlflow_base(base)}/#/models/{quote(model_name, safe='')}/versions/{version}"


def prefect_base() -> str:
    """Prefect UI base URL: ``PREFECT_UI_URL`` when set, else the local server's default."""
    try:
        from prefect.settings import get_current_settings

        url = get_current_settings().ui_url
    except Exception:
        url = None
    return (str(url) if url else os.environ.get("PREFECT_UI_URL") or DEFAULT_PREFECT_UI).rstrip("/")


def prefect_flow_run_url(flow_run_id: str, base: str | None = None) -> str:
    """Flow run page in the Prefect UI."""
    return f"{(base or prefect_base()).rstrip('/')}/runs/flow-run/{flow_run_id}"
