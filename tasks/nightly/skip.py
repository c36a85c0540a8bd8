"""Skip the nightly run when nothing changed; find the checkpoint to resume when it is retried.

The identity of a nightly run is its **pipeline key**: a hash of the dataset fingerprint, the
config hash (without keys that cannot change the model: state dir, schedule, resume, worker
counts...) and the code version. A successful nightly run tags its parent MLflow run
``pipeline_key=<key>`` and ``damage.outcome=success``; the next run with the same key finds
that run by searching the experiment on the tracking server (works the same against a local
SQLite store and a remote ``mlflow server``), records a skip and stops early.

The same key names the training folder (``<state>/runs/train-<key>``), so when a flow run is
retried after a crash, training with ``resume="auto"`` finds the previous attempt's
``last.pt`` and continues from it instead of starting over.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from damage.tasks.core.config import Config, TrainConfig
from damage.tasks.core.secrets import redact_uri

KEY_TAG = "pipeline_key"
OUTCOME_TAG = "damage.outcome"
# Dotted config keys that change where or how fast things run, never what the model is.
VOLATILE_KEYS = (
    "state_dir",
    "schedule",
    "train.resume",
    "train.workers",
    "validate.workers",
    "validate.chunk_size",
    "mlflow.tracking_uri",
    "registry.approval_poll_s",
    "registry.approval_timeout_s",
    "registry.lock_timeout_s",
    "mlflow.system_metrics_interval_s",
    "mlflow.ui_url",
    "notify",
    "serving",
)


@dataclass
class SkipDecision:
    """Whether to stop early, and why (``reason`` is meant for the summary and the logs)."""

    skip: bool
    key: str
    reason: str
    previous_run_id: str | None = None
    dataset_fingerprint: str = ""
    config_hash: str = ""
    code_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _drop(d: dict[str, Any], dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if rest:
        if isinstance(d.get(head), dict):
            _drop(d[head], rest)
    else:
        d.pop(head, None)


def skip_config_hash(cfg: Config | dict[str, Any]) -> str:
    """Hash of the config keys that can change the trained model (``VOLATILE_KEYS`` removed)."""
    d = json.loads(json.dumps(cfg.to_dict() if isinstance(cfg, Config) else cfg))
    for k in VOLATILE_KEYS:
        _drop(d, k)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def code_identity(repo: Path | None = None) -> str:
    """``code_version()``, plus a hash of the uncommitted diff when the checkout is dirty.

    ``code_version`` says ``<sha>+dirty`` for every dirty tree, so two different edits would
    share a key and the second would be skipped; the diff hash tells them apart.
    """
    from damage.tasks.data.fingerprint import code_version

    v = code_version()
    if not v.endswith("+dirty"):
        return v
    repo = repo or Path(__file__).resolve().parents[2]
    try:
        diff = subprocess.run(["git", "-C", str(repo), "diff", "HEAD", "--", "."], capture_output=True,
                              timeout=30, check=True).stdout
    except Exception:  # no git: the dirty marker is all we have
        return v
    return f"{v}.{hashlib.sha256(diff).hexdigest()[:8]}"


def pipeline_key(dataset_fingerprint: str, config_hash: str, code_version: str) -> str:
    """The identity of a nightly run: same data + same config + same code = same key."""
    blob = f"{dataset_fingerprint}\n{config_hash}\n{code_version}".encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def fingerprint_dataset(data_yaml: str | Path) -> str:
    """Content fingerprint of the dataset a data.yaml describes (its ``path:`` root)."""
    from damage.tasks.data.dataset import load_data_yaml
    from damage.tasks.data.fingerprint import dataset_fingerprint

    return dataset_fingerprint(load_data_yaml(data_yaml).root)


def last_success(tracking_uri: str | None, experiment: str, key: str) -> str | None:
    """Run id of the newest FINISHED nightly run with this pipeline key that succeeded, or None."""
    from damage.tasks.core import tracking
    c = tracking.client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = c.search_runs(
        [exp.experiment_id],
        filter_string=(f"tags.{KEY_TAG} = '{key}' and tags.`{OUTCOME_TAG}` = 'success' "
                       "and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def check_unchanged(data_yaml: str | Path, cfg: Config, tracking_uri: str | None = None, force: bool = False,
                    dataset_fingerprint: str | None = None, code_version: str | None = None) -> SkipDecision:
    """Decide whether tonight's run can stop early because nothing changed.

    Args:
        data_yaml: the resolved dataset (after ``prepare_dataset``).
        cfg: the resolved config; ``cfg.schedule.skip_unchanged`` false never skips.
        tracking_uri: MLflow server or store to search; None = ``cfg.mlflow.tracking_uri`` or env.
        force: never skip (the ``--force`` flag / the ``force`` flow parameter).
        dataset_fingerprint: already computed fingerprint (saves hashing the dataset twice).
        code_version: override the code identity (tests).

    Returns:
        SkipDecision with the key (always) and, when skipping, the run it repeats.
    """
    fp = dataset_fingerprint or fingerprint_dataset(data_yaml)
    ch = skip_config_hash(cfg)
    cv = code_version or code_identity()
    key = pipeline_key(fp, ch, cv)
    ids = {"key": key, "dataset_fingerprint": fp, "config_hash": ch, "code_version": cv}
    if force:
        return SkipDecision(False, reason="forced: running even if nothing changed", **ids)
    if not cfg.schedule.skip_unchanged:
        return SkipDecision(False, reason="schedule.skip_unchanged is off", **ids)
    prev = last_success(tracking_uri or cfg.mlflow.tracking_uri, cfg.mlflow.experiment, key)
    if prev is None:
        return SkipDecision(False, reason="new data, config or code (no successful run with this key)", **ids)
    return SkipDecision(True, previous_run_id=prev, **ids,
                        reason=(f"skipped: data, config and code unchanged since run {prev} "
                                f"(dataset {fp}, config {ch}, code {cv})"))


def record_skip(tracking_uri: str | None, run_id: str, decision: SkipDecision) -> dict[str, Any]:
    """Tag this (parent) run as a skip and return the summary the flow should return."""
    from damage.tasks.core import tracking
    c = tracking.client(tracking_uri)
    tracking.set_tags(c, run_id, {KEY_TAG: decision.key, OUTCOME_TAG: "skipped",
                                  "damage.skip_reason": decision.reason,
                                  "damage.same_as_run": decision.previous_run_id or ""})
    return {"skipped": True, "reason": decision.reason, "mlflow_run_id": run_id,
            "previous_run_id": decision.previous_run_id, "pipeline_key": decision.key,
            "dataset_fingerprint": decision.dataset_fingerprint, "tracking_uri": redact_uri(c.tracking_uri)}


def record_success(tracking_uri: str | None, run_id: str, decision: SkipDecision) -> None:
    """Mark the parent run as the successful run of its key (call right before closing it FINISHED)."""
    from damage.tasks.core import tracking
    c = tracking.client(tracking_uri)
    tracking.set_tags(c, run_id, {KEY_TAG: decision.key, OUTCOME_TAG: "success",
                                  "dataset_fingerprint": decision.dataset_fingerprint,
                                  "skip_config_hash": decision.config_hash, "code_identity": decision.code_version})


def train_dir_for(runs_root: str | Path, key: str) -> Path:
    """Training folder of a pipeline key: a retried flow run of the same key finds its ``last.pt`` here."""
    return Path(runs_root) / f"train-{key}"


def resumable_train_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``resume="auto"`` unless an explicit checkpoint was asked for.

    ``auto`` resumes only an unfinished run (last.pt still holding optimizer state), so a
    first attempt, or a forced re-run after a finished one, trains from scratch.
    """
    return cfg if cfg.resume else cfg.model_copy(update={"resume": "auto"})
