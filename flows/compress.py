"""The ``compress`` flow: measure the parent, run the configured chain, time every variant, gate, choose.

Wiring only: every step is a function of ``tasks/export/compress.py`` wrapped as a Prefect task.
The nightly flow calls :func:`compress_flow` as a subflow when ``compress.enabled``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from damage.tasks.core.config_load import config_from_dict
from damage.tasks.core.prefect_tasks import as_task
from damage.tasks.core.runtime import state_paths
from damage.tasks.evaluation.evaluate import Evaluator
from damage.tasks.export import compress as C
from damage.tasks.export.chain_steps import apply_step
from damage.tasks.scale.fanout import FanOut

root_task = as_task(C.root_variant, "compress-parent")
measure_task = as_task(C.measure_variant, "compress-measure")
time_task = as_task(C.time_variants, "compress-latency")
step_task = as_task(apply_step, "compress-step")
finalize_task = as_task(C.finalize, "compress-gate-and-choose")
plan_task = as_task(C.plan_steps, "compress-plan")


@flow(name="compress", log_prints=True)
def compress_flow(parent_weights: str, parent_onnx: str, data_yaml: str, config: dict[str, Any],
                  parent_run_id: str | None = None, out_dir: str | None = None) -> dict[str, Any]:
    """Run the compression chain on a trained model and return the chosen variant.

    Args:
        parent_weights: the trained ``.pt``.
        parent_onnx: its FP32 ONNX export.
        data_yaml: dataset (fine-tuning, calibration, evaluation).
        config: ``Config.to_dict()``.
        parent_run_id: MLflow run the ``compress`` run nests under (None: no MLflow logging).
        out_dir: where variants go (default: ``<state_dir>/models/compress/<parent stem>``).

    Returns:
        ``{"name", "path", "onnx", "weights", "kind", "parent", "metrics", "compressed", "table",
        "plot", "run_id"}`` of the chosen variant.
    """
    cfg = config_from_dict(config)
    evaluator = Evaluator.from_config(cfg)
    out = Path(out_dir) if out_dir else C.default_out_dir(cfg, parent_weights)
    steps = plan_task(cfg.compress.steps)
    root = measure_task(root_task(parent_weights, parent_onnx, cfg.imgsz), data_yaml, evaluator)
    # runner: ray measures each variant as a Ray task while the chain goes on (FanOut); runner: local, here at once
    with FanOut(cfg.runner == "ray", cfg.ray, state_paths(cfg.state_dir).root) as fan:
        variants = C.chain(steps, root,
                           lambda step, head: step_task(step, head, root, data_yaml, cfg, out / step, evaluator),
                           lambda v: fan.start(measure_task, v, data_yaml, evaluator, root_metrics=root.metrics))
    # latency: every variant in one interleaved pass here, after the chain, whichever runner measured accuracy
    variants = time_task(variants)
    return finalize_task(variants, variants[0], cfg, out, parent_run_id)
