"""Pipeline-level steps of the nightly flow: config + state, the parent MLflow run, dataset, summary."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from damage.tasks.core.config import Config
from damage.tasks.core.runtime import StatePaths
from damage.tasks.core.secrets import redact_uri


@dataclass
class PipelineRun:
    """The parent MLflow run of one pipeline run, and where its steps write."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    root: Path
    config_hash: str
    code_version: str

    @property
    def report_dir(self) -> Path:
        return self.root / "validation"

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def export_dir(self) -> Path:
        return self.root / "export"

    def lineage(self, dataset_fingerprint: str) -> dict[str, str]:
        """Lineage tags every artifact of this run carries."""
        return {
            "dataset_fingerprint": dataset_fingerprint,
            "config_hash": self.config_hash,
            "code_version": self.code_version,
            "source_run_id": self.run_id,
        }


def prepare_state(config_path: str | None = None, overrides: list[str] | None = None) -> tuple[Config, StatePaths]:
    """The run's config (the worker's, plus allowlisted run overrides: ``damage.tasks.core.run_params``); activate its
    state directory (env vars, Ultralytics settings).

    Raises:
        ConfigError: a run parameter outside ``RUN_OVERRIDES`` (named), or a config file not the worker's.
    """
    from damage.tasks.core.run_params import run_config
    from damage.tasks.core.runtime import activate, configure_ultralytics

    cfg = run_config(config_path, overrides)
    paths = activate(cfg.state_dir, cfg.mlflow.tracking_uri)
    if cfg.mlflow.tracking_uri:  # activate moved any URI credentials into MLflow's env variables
        cfg.mlflow.tracking_uri = redact_uri(cfg.mlflow.tracking_uri)
    configure_ultralytics(paths)
    return cfg, paths


def _prefect_flow_run() -> tuple[str | None, str | None]:
    try:
        from prefect.runtime import flow_run

        return (str(flow_run.id) if flow_run.id else None), flow_run.name
    except Exception:
        return None, None


def _earlier_attempt(c, exp_id: str, flow_run_id: str):
    """The parent run an earlier attempt of this Prefect flow run opened, if any (a retry)."""
    runs = c.search_runs([exp_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}' and tags.`damage.flow` = 'nightly'",
                         max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def open_pipeline_run(cfg: Config) -> PipelineRun:
    """Create the parent MLflow run with the full resolved config as params.

    A retried Prefect flow run reopens the parent run of its earlier attempt (same run id, same
    run folder), so later steps find what that attempt finished: the registered version by its
    source run id, the training folder by the pipeline key.
    """
    from damage.tasks.core import tracking
    from damage.tasks.core.runtime import state_paths
    from damage.tasks.data.fingerprint import code_version

    c = tracking.client(cfg.mlflow.tracking_uri)
    exp_id = tracking.ensure_experiment(c, cfg.mlflow.experiment, cfg.mlflow.artifact_location)
    code = code_version()
    flow_run_id, flow_run_name = _prefect_flow_run()
    earlier = _earlier_attempt(c, exp_id, flow_run_id) if flow_run_id else None
    if earlier is not None and earlier.data.tags.get("damage.run_root"):
        run_id = earlier.info.run_id
        c.update_run(run_id, status="RUNNING")
        tracking.set_tags(c, run_id, {"damage.attempts": str(int(earlier.data.tags.get("damage.attempts", "1")) + 1)})
        root = Path(earlier.data.tags["damage.run_root"])
        root.mkdir(parents=True, exist_ok=True)
        return PipelineRun(run_id, exp_id, c.tracking_uri, root, cfg.hash(), code)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    run_id = tracking.start_run(c, exp_id, f"nightly-{stamp}", tags={
        "damage.flow": "nightly", "config_hash": cfg.hash(), "code_version": code,
        "data.source": redact_uri(cfg.data.source), "train.model": cfg.train.model,
    })
    tracking.log_params(c, run_id, cfg.to_dict())
    tracking.log_dict(c, run_id, cfg.to_dict(), "config/resolved.yaml")
    if flow_run_id:  # link the MLflow run to the Prefect flow run, both ways
        tracking.set_tags(c, run_id, {"prefect.flow_run_id": flow_run_id, "prefect.flow_run_name": flow_run_name or ""})
    root = state_paths(cfg.state_dir).runs / f"nightly-{stamp}-{run_id[:8]}"
    root.mkdir(parents=True, exist_ok=True)
    tracking.set_tags(c, run_id, {"damage.run_root": str(root)})
    return PipelineRun(run_id, exp_id, c.tracking_uri, root, cfg.hash(), code)


def prepare_dataset(cfg: Config, paths: StatePaths) -> Path:
    """Resolve ``data.source`` into a local data.yaml (synth, local folder, COCO JSON, s3://)."""
    from damage.tasks.data.source import resolve_source

    return resolve_source(cfg.data, paths.datasets, paths.cache)


def close_pipeline_run(run: PipelineRun, ok: bool, summary: dict[str, Any] | None = None, error: str | None = None) -> None:
    """Finish the parent run (FAILED with the error message as a tag when ``ok`` is false)."""
    from damage.tasks.core import tracking
    c = tracking.client(run.tracking_uri)
    if summary is not None:
        tracking.log_dict(c, run.run_id, summary, "summary.json")
    if error:
        tracking.set_tags(c, run.run_id, {"error": error[:4000]})
    tracking.end_run(c, run.run_id, ok)


def summarise(cfg: Config, paths: StatePaths, run: PipelineRun, data, trained, evaluation, sweep, exported,
              version, decision, candidate: dict[str, Any] | None = None, registered_damage=None) -> dict[str, Any]:
    """A JSON-able summary of the run: what was produced, the figures, and where everything is.

    Every figure is the registered artifact's own: ``candidate`` (what ``register`` registered: the
    compressed variant's metrics and per-class rows when compression chose one) and
    ``registered_damage`` (its per-vehicle damage-% error at the operating point,
    ``sweep.damage_at_operating_point``). Without them, the trained model's evaluation and sweep.
    ``damage.tasks.evaluation.headline`` logs these figures on the pipeline run.
    """
    from damage.tasks.core.display import artifact_precision

    candidate = candidate or {}
    m = candidate.get("metrics") or evaluation.metrics
    kind = str(candidate.get("kind") or "trained")
    damage = registered_damage if registered_damage is not None else getattr(sweep, "damage", None)
    summary = {
        "mlflow_run_id": run.run_id,
        "tracking_uri": redact_uri(run.tracking_uri),
        "state_dir": str(paths.root),
        "prefect_home": str(paths.prefect_home),
        "dataset": str(data.data_yaml),
        "dataset_fingerprint": data.fingerprint,
        "trained_on_cleaned_copy": data.cleaned,
        "epochs_run": trained.epochs_run,
        "imgsz": cfg.train.imgsz,
        "model": cfg.train.model,
        "best_weights": str(trained.best),
        "onnx": str(exported.onnx_path),
        # what was registered: the variant's kind, its numeric format and file
        "registered_artifact": {"kind": kind, "precision": artifact_precision(kind),
                                "onnx": str(candidate.get("onnx") or exported.onnx_path)},
        "metrics": {k: m.get(k) for k in ("box/mAP50", "box/mAP50-95", "mask/mAP50", "mask/mAP50-95",
                                          "box/precision", "box/recall", "mask/precision", "mask/recall",
                                          "fitness", "latency_ms")},
        "per_class": candidate.get("per_class") or getattr(evaluation, "per_class", []),
        "operating_point": sweep.thresholds if sweep is not None else None,
        # per-vehicle damage-percentage error at the operating point (percentage points), per class too
        "damage_pct_mae": _damage(damage),
        "registered_model": getattr(version, "name", None),
        "registered_version": getattr(version, "version", None),
        "promotion": decision.to_dict() if hasattr(decision, "to_dict") else decision,
    }
    return summary


def _damage(d) -> dict[str, Any] | None:
    if d is None:
        return None
    return {"mae": d.mae if d.mae == d.mae else None, "by_class": dict(d.by_class), "vehicles": d.vehicles}


def preflight(cfg: Config) -> None:
    """Fail fast, before any run is opened, on inputs that cannot work.

    Raises:
        DatasetError / DamageError: naming the missing dataset, weights or bad model spec.
    """
    from damage.tasks.core.errors import DatasetError
    from damage.tasks.core.families import model_source

    src = cfg.data.source
    if src != "synth" and not src.startswith("s3://"):
        p = Path(src).expanduser()
        if not p.exists():
            raise DatasetError(f"{p}: dataset path does not exist (data.source)")
        if p.is_dir() or p.suffix in {".yaml", ".yml"}:
            from damage.tasks.data.dataset import check_structure, load_data_yaml

            # With validate.on_error=clean broken labels are quarantined by the gate, not fatal.
            if cfg.validation.enabled and cfg.validation.on_error == "clean":
                load_data_yaml(p)
            else:
                check_structure(p)
    for b in cfg.data.batches:
        if not Path(b).expanduser().exists():
            raise DatasetError(f"{b}: labelled batch not found (data.batches)")
    model_source(cfg.train.model)
    if cfg.train.weights and not Path(cfg.train.weights).expanduser().is_file():
        from damage.tasks.core.errors import DamageError

        raise DamageError(f"{cfg.train.weights}: weights file not found (train.weights)")
