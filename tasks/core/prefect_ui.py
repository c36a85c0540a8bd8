"""What a nightly run shows in the Prefect UI: progress artifacts, the summary, links, our logs.

Everything here is a no-op outside a Prefect flow/task run (tests calling ``task.fn``, the CLI
without Prefect), and a Prefect API problem is logged, never raised: the UI is a view of the
pipeline, never a reason for it to fail.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# Project loggers whose records go to the flow run's logs (S3 sync, data gate, registry...).
PROJECT_LOGGERS = ("damage",)  # every project module logs under damage.<package>.<module>


def flow_run_id() -> str | None:
    """Id of the Prefect flow run this code runs in, or None."""
    try:
        from prefect.runtime import flow_run

        return flow_run.id or None
    except Exception:
        return None


def in_run_context() -> bool:
    """True inside a Prefect flow or task run (artifacts and progress are published only there)."""
    try:
        from prefect.context import FlowRunContext, TaskRunContext

        return FlowRunContext.get() is not None or TaskRunContext.get() is not None
    except Exception:
        return False


class Progress:
    """A Prefect progress artifact (0-100 %), created on the first update inside a run.

    Example:
        >>> p = Progress("train-epochs", "epochs done")
        >>> p.update(50.0)   # no-op outside a Prefect run
    """

    def __init__(self, key: str, description: str) -> None:
        self.key = key.lower().replace("_", "-").replace("/", "-")
        self.description = description
        self.artifact_id = None
        self.last: float | None = None

    def update(self, percent: float) -> None:
        percent = max(0.0, min(100.0, float(percent)))
        if percent == self.last or not in_run_context():
            return
        try:
            from prefect.artifacts import create_progress_artifact, update_progress_artifact

            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(percent, key=self.key, description=self.description)
            else:
                update_progress_artifact(self.artifact_id, percent)
            self.last = percent
        except Exception as e:
            log.debug("progress artifact %s not updated: %s", self.key, e)


class _RunLogHandler(logging.Handler):
    """Prefect's API log handler, only inside a run (elsewhere a record is dropped silently)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        from prefect.logging.handlers import APILogHandler

        self._api = APILogHandler()

    def emit(self, record: logging.LogRecord) -> None:
        if in_run_context():
            self._api.handle(record)


def forward_project_logs(level: int = logging.INFO) -> None:
    """Send the project's log records (``PROJECT_LOGGERS``) to the current flow run's logs.

    Idempotent. Loggers left at NOTSET are raised to ``level`` so INFO lines (S3 sync, the data
    gate summary) are not dropped by the root logger's WARNING level.
    """
    for name in PROJECT_LOGGERS:
        lg = logging.getLogger(name)
        if not any(isinstance(h, _RunLogHandler) for h in lg.handlers):
            lg.addHandler(_RunLogHandler())
        if lg.level == logging.NOTSET:
            lg.setLevel(level)


def link_flow_run(mlflow_run_url: str, mlflow_run_id: str, mlflow_run_name: str | None = None) -> None:
    """Put the MLflow run on the current flow run: a link artifact, a tag with the run id, and (with
    ``mlflow_run_name``) the run's name as the flow run's name, so both UIs list the night by one name
    (Prefect would call it e.g. "grateful-pug")."""
    fid = flow_run_id()
    if not fid:
        return
    try:
        from prefect.artifacts import create_link_artifact
        from prefect.client.orchestration import get_client

        create_link_artifact(mlflow_run_url, link_text=f"MLflow run {mlflow_run_id}", key="mlflow-run",
                             description="The MLflow parent run of this flow run")
        with get_client(sync_client=True) as client:
            fr = client.read_flow_run(fid)
            tags = sorted(set(fr.tags or []) | {f"mlflow-run:{mlflow_run_id}"})
            client.update_flow_run(fid, tags=tags, name=mlflow_run_name or None)
    except Exception as e:
        log.warning("could not link flow run %s to MLflow run %s: %s", fid, mlflow_run_id, e)


def publish_markdown(markdown: str, key: str, description: str) -> Any:
    """A markdown artifact on the current flow run (None outside a run)."""
    if not in_run_context():
        return None
    try:
        from prefect.artifacts import create_markdown_artifact

        return create_markdown_artifact(markdown, key=key, description=description)
    except Exception as e:
        log.warning("markdown artifact %s not created: %s", key, e)
        return None
