"""The ``nightly`` flow: data gate -> train -> evaluate -> sweep -> export -> explain ->
(compress) -> register -> promotion gate. Wiring only: every step is a task in ``tasks/`` or
``model_registry/``; this file passes results on.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from tasks.core.pipeline import (
    close_pipeline_run,
    open_pipeline_run,
    prepare_dataset,
    prepare_state,
    summarise,
)
from tasks.core.skip import (
    check_unchanged,
    record_skip,
    record_success,
    resumable_train_config,
    train_dir_for,
)

_opts = {"cache_policy": NO_CACHE}


def _t(fn, name: str, retries: int = 0):
    """Wrap a plain step function as a Prefect task (no caching: steps pass live objects)."""
    return task(fn, name=name, retries=retries, retry_delay_seconds=[10, 60, 300][:retries] or 0, **_opts)


@flow(name="nightly", log_prints=True)
def nightly(config_path: str | None = None, overrides: list[str] | None = None, force: bool = False) -> dict[str, Any]:
    """Nightly retraining. ``overrides`` are ``key=value`` config overrides; ``force`` ignores skip-unchanged."""
    from model_registry.steps import gate_step, register_step
    from tasks.evaluation.evaluate import evaluate_step
    from tasks.evaluation.explain import explain_step, pick_explain_samples
    from tasks.evaluation.sweep import sweep_step
    from tasks.export.onnx import export_step
    from tasks.training.train import train_step
    from tasks.validation.data_check import check_data_step

    cfg, paths = _t(prepare_state, "prepare-state")(config_path, overrides)
    run = _t(open_pipeline_run, "open-mlflow-run", retries=3)(cfg)
    try:
        data_yaml = _t(prepare_dataset, "prepare-dataset", retries=3)(cfg, paths)
        unchanged = _t(check_unchanged, "check-unchanged", retries=3)(data_yaml, cfg, run.tracking_uri, force)
        if unchanged.skip:  # same data + config + code as the last successful run: record it and stop
            print(unchanged.reason)
            skipped = _t(record_skip, "record-skip", retries=3)(run.tracking_uri, run.run_id, unchanged)
            _t(close_pipeline_run, "close-mlflow-run", retries=3)(run, ok=True, summary=skipped)
            return skipped
        data = _t(check_data_step, "data-gate")(data_yaml, cfg.validation, run.report_dir, run.run_id)
        # Train dir keyed by the pipeline key + resume="auto": a retried flow run continues from last.pt.
        trained = _t(train_step, "train", retries=1)(data.data_yaml, resumable_train_config(cfg.train),
                                                     train_dir_for(paths.runs, unchanged.key), run.run_id,
                                                     seed=cfg.seed, full_config=cfg.to_dict(),
                                                     dataset_fingerprint=data.fingerprint, reuse_finished=True)
        metrics = _t(evaluate_step, "evaluate")(trained.best, data.data_yaml, cfg.evaluate, cfg.train.imgsz, run.run_id)
        sweep = _t(sweep_step, "sweep")(trained.best, data.data_yaml, cfg.sweep, cfg.train.imgsz, run.run_id) \
            if cfg.sweep.enabled else None
        samples = _t(pick_explain_samples, "pick-samples")(data.data_yaml, max(cfg.explain.samples,
                                                                              cfg.export.parity_images), cfg.seed)
        exported = _t(export_step, "export")(trained.best, cfg.export, cfg.train.imgsz,
                                             sweep.thresholds if sweep else {},
                                             {**run.lineage(data.fingerprint), "max_pixels": cfg.validation.max_pixels},
                                             samples[: cfg.export.parity_images], run.run_id)
        if cfg.explain.enabled and cfg.explain.samples:
            _t(explain_step, "explain")(trained.best, samples[: cfg.explain.samples], cfg.explain,
                                        cfg.train.imgsz, run.run_id)
        candidate = {"weights": trained.best, "onnx": exported.onnx_path, "metrics": metrics.metrics,
                     "kind": "trained", "parent": None}
        if cfg.compress.enabled:
            from flows.compress import compress_flow

            chosen = compress_flow(str(trained.best), str(exported.onnx_path), str(data.data_yaml),
                                   cfg.to_dict(), run.run_id)
            candidate = chosen or candidate
        version = _t(register_step, "register", retries=2)(cfg, run, candidate, sweep.thresholds if sweep else {},
                                                            data.fingerprint)
        decision = _t(gate_step, "promotion-gate")(cfg, run, version, data.data_yaml)
        if cfg.registry.wait_for_approval and decision.passed:
            from flows.promote import await_approval

            await_approval(cfg.registry.model_name, version.version, run.tracking_uri, cfg.registry,
                           decision.reasons)
        summary = _t(summarise, "summary")(cfg, paths, run, data, trained, metrics, sweep, exported, version, decision)
        summary["pipeline_key"] = unchanged.key
        _t(record_success, "record-success", retries=3)(run.tracking_uri, run.run_id, unchanged)
    except BaseException as e:
        _t(close_pipeline_run, "close-mlflow-run", retries=3)(run, ok=False, error=repr(e))
        raise
    _t(close_pipeline_run, "close-mlflow-run", retries=3)(run, ok=True, summary=summary)
    return summary
