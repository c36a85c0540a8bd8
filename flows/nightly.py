"""The ``nightly`` flow: dataset (+ labelled batches) -> drift reference -> data gate -> train init -> train ->
evaluate -> label issues -> sweep -> export -> explain -> (compress) -> register -> promotion gate. Wiring only: every
step is a task in ``tasks/`` or ``model_registry/``; this file passes results on.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from prefect import flow
from prefect.states import Completed

from damage.tasks.core.prefect_tasks import adopt_subflow_result
from damage.tasks.core.prefect_tasks import as_task as _t
from damage.tasks.nightly.pipeline import (
    close_pipeline_run,
    open_pipeline_run,
    prepare_dataset,
    prepare_state,
    summarise,
)
from damage.tasks.nightly.skip import (
    check_unchanged,
    record_skip,
    record_success,
    resumable_train_config,
    train_dir_for,
)
from damage.tasks.scale.fanout import FanOut


@flow(name="nightly", log_prints=True)
def nightly(config_path: str | None = None, overrides: list[str] | None = None, force: bool = False) -> dict[str, Any]:
    """Nightly retraining. ``overrides`` are ``key=value`` config overrides; ``force`` ignores skip-unchanged."""
    from damage.model_registry.card import card_step
    from damage.model_registry.reference import reference_step
    from damage.model_registry.steps import gate_step, init_step, register_step
    from damage.tasks.data.union import union_step
    from damage.tasks.evaluation.evaluate import Evaluator, evaluate_step
    from damage.tasks.evaluation.explain import explain_step, pick_explain_samples
    from damage.tasks.evaluation.extra_sets import extra_sets_step
    from damage.tasks.evaluation.headline import log_headline
    from damage.tasks.evaluation.label_issues import label_issues_step
    from damage.tasks.evaluation.sweep import damage_at_operating_point, sweep_step
    from damage.tasks.export.onnx import export_step
    from damage.tasks.nightly import reporting
    from damage.tasks.training.train import train_step
    from damage.tasks.validation.data_check import check_data_step

    cfg, paths = _t(prepare_state, "prepare-state")(config_path, overrides)
    run = _t(open_pipeline_run, "open-mlflow-run", retries=3)(cfg)
    links = _t(reporting.link_runs, "link-runs")(cfg, run)
    stack = ExitStack()  # the Ray task runner of runner: ray, closed when the night ends either way
    try:
        data_yaml = _t(prepare_dataset, "prepare-dataset", retries=3)(cfg, paths)
        # data.batches (labelled inbox batches): train on their union with data.source, each logged as an input
        data_yaml = _t(union_step, "union-sources", retries=1)(data_yaml, cfg.data.batches, paths.datasets,
                                                               run.tracking_uri, run.run_id)
        unchanged = _t(check_unchanged, "check-unchanged", retries=3)(data_yaml, cfg, run.tracking_uri, force)
        if unchanged.skip:  # same data + config + code as the last successful run: record it and stop
            print(unchanged.reason)
            skipped = _t(record_skip, "record-skip", retries=3)(run.tracking_uri, run.run_id, unchanged)
            _t(close_pipeline_run, "close-mlflow-run", retries=3)(run, ok=True, summary=skipped)
            _t(reporting.mark_skipped, "mark-skipped")(run, unchanged.reason)
            return Completed(name="Skipped", message=unchanged.reason, data=skipped)  # shown as skipped
        # the skip check hashed the dataset: the gate reuses that fingerprint instead of reading it again
        reference = _t(reference_step, "drift-reference", retries=2)(cfg, run)
        data = _t(check_data_step, "data-gate")(data_yaml, cfg.validation, run.report_dir, run.run_id, reference,
                                                 fingerprint=unchanged.dataset_fingerprint,
                                                 ray=cfg.ray if cfg.ray.enabled else None, state_dir=paths.root)
        # train.init: fine-tune from production's weights when they fit, else scratch (reason logged + tagged)
        train_cfg, init = _t(init_step, "train-init", retries=2)(cfg, run, data.data_yaml)
        # Train dir keyed by the pipeline key + resume="auto": a retried flow run continues from last.pt.
        trained = _t(train_step, "train", retries=1)(data.data_yaml, resumable_train_config(train_cfg),
                                                     train_dir_for(paths.runs, unchanged.key), run.run_id,
                                                     seed=cfg.seed, full_config=cfg.to_dict(),
                                                     dataset_fingerprint=data.fingerprint,
                                                     system_metrics_s=cfg.mlflow.system_metrics_interval_s,
                                                     dataset_source=cfg.data.source, reuse_finished=True,
                                                     evaluator=Evaluator.from_config(cfg))
        metrics = _t(evaluate_step, "evaluate")(trained.best, data.data_yaml, Evaluator.from_config(cfg), run.run_id,
                                                dataset_fingerprint=data.fingerprint,
                                                system_metrics_s=cfg.mlflow.system_metrics_interval_s,
                                                dataset_source=cfg.data.source)
        # runner: ray starts label issues, the sweep and explain as Ray tasks that run side by side (FanOut);
        # runner: local (the default) runs each here, at once, in this order
        fan = stack.enter_context(FanOut(cfg.runner == "ray", cfg.ray, paths.root))
        issues_run = fan.start(_t(label_issues_step, "label-issues"), trained.best, data.data_yaml,
                               cfg.label_issues, cfg.imgsz, run.run_id, run.root / "label_issues",
                               train_cfg=train_cfg, seed=cfg.seed) if cfg.label_issues.enabled else None
        sweep_run = fan.start(_t(sweep_step, "sweep"), trained.best, data.data_yaml, cfg.sweep, cfg.imgsz,
                              run.run_id, slices=cfg.predictor.slices_value) if cfg.sweep.enabled else None
        samples = _t(pick_explain_samples, "pick-samples")(data.data_yaml, max(cfg.explain.samples,
                                                                              cfg.export.parity_images), cfg.seed)
        sweep = sweep_run.result() if sweep_run is not None else None
        exported = _t(export_step, "export")(trained.best, cfg.export, cfg.imgsz,
                                             sweep.thresholds if sweep else {},
                                             {**run.lineage(data.fingerprint), "max_pixels": cfg.validation.max_pixels},
                                             samples[: cfg.export.parity_images], run.run_id, cfg.predictor)
        explain_run = fan.start(_t(explain_step, "explain"), trained.best, samples[: cfg.explain.samples],
                                cfg.explain, cfg.imgsz, run.run_id) \
            if cfg.explain.enabled and cfg.explain.samples else None
        candidate = {"weights": trained.best, "onnx": exported.onnx_path, "metrics": metrics.metrics,
                     "kind": "trained", "parent": None}
        compression = None
        if cfg.compress.enabled:
            from damage.flows.compress import compress_flow

            # later tasks take the subflow's result through a task, so the default UI lists them
            chosen = adopt_subflow_result(compress_flow(str(trained.best), str(exported.onnx_path),
                                                        str(data.data_yaml), cfg.to_dict(), run.run_id),
                                          "compress-result")
            candidate = chosen or candidate
            compression = {k: (chosen or {}).get(k) for k in ("name", "kind", "compressed", "table", "run_id")}
            compression["mask/mAP50"] = ((chosen or {}).get("metrics") or {}).get("mask/mAP50")
        # the sweep measured the .pt: a compressed variant's own damage-% error at the same operating point
        registered_damage = _t(damage_at_operating_point, "registered-damage")(
            candidate["onnx"], data.data_yaml, sweep.thresholds, cfg.imgsz, cfg.sweep.split, cfg.sweep.max_det) \
            if sweep is not None and compression and compression["compressed"] else None
        # evaluate.extra_sets (e.g. 640-px whole scenes): the registered ONNX through the sliced predictor; a set
        # with tuning images chooses the confidence of sliced photos over the sweep's grid (damage.sliced_conf)
        candidate = _t(extra_sets_step, "evaluate-extra")(candidate, cfg.evaluate.extra_sets, paths.datasets,
                                                          run.run_id, cfg.evaluate.conf, cfg.evaluate.iou,
                                                          conf_grid=cfg.sweep.conf if sweep is not None else ())
        issues = issues_run.result() if issues_run is not None else None
        if explain_run is not None:
            explain_run.result()  # its error fails the night, as in process
        version = _t(register_step, "register", retries=2)(cfg, run, candidate, sweep.thresholds if sweep else {},
                                                            data.fingerprint, init=init)
        decision = _t(gate_step, "promotion-gate")(cfg, run, version, data.data_yaml)
        _t(card_step, "model-card", retries=2)(cfg, run, version, metrics, sweep, data, candidate, decision, links,
                                                registered_damage)
        _t(reporting.notify_approval, "notify-approval")(cfg, run, version, candidate["metrics"], decision)
        if cfg.registry.wait_for_approval and decision.passed:
            from damage.flows.promote import await_approval

            answer = await_approval(cfg.registry.model_name, version.version, run.tracking_uri, cfg.registry,
                                    decision.reasons)
            if answer.get("decision") == "approved":
                _t(reporting.notify_promotion, "notify-promotion")(cfg, version.name, version.version,
                                                                   answer.get("by", ""), answer.get("reason", ""),
                                                                   run.tracking_uri)
        summary = _t(summarise, "summary")(cfg, paths, run, data, trained, metrics, sweep, exported, version, decision,
                                           candidate, registered_damage)
        _t(log_headline, "headline-metrics", retries=2)(run, summary, registered_damage, cfg.data.source)
        _t(reporting.link_step_reports, "link-step-reports", retries=2)(cfg, run)
        summary["pipeline_key"] = unchanged.key
        summary["init"] = init.to_dict()
        summary["label_issues"] = issues.summary() if issues is not None else None
        summary["compression"] = compression  # the variant registered (None: compression off)
        summary.update({k: v for k, v in links.items() if v})
        _t(reporting.publish_summary, "publish-summary")(summary, links)
        _t(record_success, "record-success", retries=3)(run.tracking_uri, run.run_id, unchanged)
    except BaseException as e:
        stack.close()
        _t(close_pipeline_run, "close-mlflow-run", retries=3)(run, ok=False, error=repr(e))
        _t(reporting.notify_failure, "notify-failure")(cfg, run, repr(e))
        raise
    stack.close()
    _t(close_pipeline_run, "close-mlflow-run", retries=3)(run, ok=True, summary=summary)
    return summary


# A nightly run that fails (server hiccup, node lost) is retried as a whole after these seconds;
# the skip check then short-circuits nothing (no success recorded) and training resumes from
# last.pt. Only the deployments run this object (flows/deploy.py); `damage run` calls `nightly`
# and fails at once.
FLOW_RETRIES = 2
FLOW_RETRY_DELAY_S = 300
scheduled_nightly = nightly.with_options(retries=FLOW_RETRIES, retry_delay_seconds=FLOW_RETRY_DELAY_S)
