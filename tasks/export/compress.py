"""Compression chain bookkeeping: build variants, measure each the same way, gate, choose.

A *variant* is a deployable ONNX file plus where it came from. Steps (``compress.steps``) run
in order on the current chain head: ``distill``, ``prune`` (structured, then fine-tuned),
``unstructured`` change the PyTorch model (each result is exported to ONNX and must pass the
same PyTorch-vs-ONNX-Runtime parity gate as the nightly export), and
``int8-static`` / ``int8-dynamic`` / ``fp16`` / ``int8-nncf`` (NNCF post-training quantization,
the optional ``nncf`` extra: ``damage.tasks.export.nncf_quant``) quantize the head's ONNX (and, with
``compress.quantize.also_parent``, the parent's, so the table shows what quantization alone
costs). Every variant, the parent included, is measured by the same evaluator
(``damage.tasks.evaluation.evaluate.Evaluator.from_config``: ``evaluate:`` settings at ``Config.imgsz``)
and, after the chain, timed in one interleaved ONNX Runtime pass with all the others (``time_variants``: the
speed-up ratios compare runs made under the same load). ``chain`` is the one loop; the plain ``run_chain`` and
the Prefect flow inject their step and measure callables (the flow's measurements run as Ray tasks with
``runner: ray``).

Gate: a variant is a candidate only if its mask mAP50 is at most ``compress.tolerance`` below
the *original* parent's (the model it would replace; chaining relative to an intermediate
step would let losses compound) and it runs at least ``compress.min_speedup`` times faster than
that parent (``latency/forward_ms``, the ONNX Runtime forward pass alone; a compressed model that is
not faster only loses accuracy). ``latency_ms`` keeps the evaluator's one meaning (pre+inference+post
per image). Choice: the candidate with the best mask mAP50-95 whose forward pass is within
``compress.latency_budget_ms`` (ties: lower latency). With no candidate the parent stays the
choice (``compressed=False``).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from damage.tasks.core.atomic import atomic_write
from damage.tasks.core.display import round_metric
from damage.tasks.core.errors import DamageError
from damage.tasks.export.chain_steps import apply_step
from damage.tasks.export.variant import (
    FORWARD_MS,
    PT_STEPS,
    QUANT_STEPS,
    TABLE_COLUMNS,
    StepOutput,
    Variant,
    pt_stats,
)

if TYPE_CHECKING:
    from damage.tasks.evaluation.evaluate import Evaluator

log = logging.getLogger(__name__)

def plan_steps(steps: list[str]) -> list[str]:
    """Validate the configured chain: known steps, PyTorch steps before quantization, no repeats.

    Raises:
        DamageError: unknown/repeated step or a PyTorch step after a quantization step.
    """
    seen: set[str] = set()
    quantized = False
    for s in steps:
        if s not in PT_STEPS + QUANT_STEPS:
            raise DamageError(f"compress.steps: unknown step '{s}' (choose from {', '.join(PT_STEPS + QUANT_STEPS)})")
        if s in seen:
            raise DamageError(f"compress.steps: step '{s}' appears twice")
        if s in PT_STEPS and quantized:
            raise DamageError(f"compress.steps: '{s}' after a quantization step (PyTorch steps must come first)")
        quantized |= s in QUANT_STEPS
        seen.add(s)
    return list(steps)


# ----------------------------------------------------------------------------- measurement
def ort_latency_ms(onnx_paths: Sequence[str | Path], imgsz: Sequence[int], runs: int = 20, warmup: int = 3,
                   threads: int | None = None) -> list[float]:
    """Median ONNX Runtime CPU latency (ms) of one 1x3xSxS inference of each model, timed interleaved.

    Every model gets its session and warm-up first; then each of ``runs`` rounds times one inference of every
    model, in alternating order, so a machine that slows down (another job, thermal limits) slows them all
    alike and the ratios the gate reads stay fair. ``threads=None`` uses every core (``os.cpu_count()``).
    """
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or os.cpu_count() or 1
    # as the predictor runs (damage.tasks.serving.backends): threads stop spinning when a run returns
    so.add_session_config_entry("session.force_spinning_stop", "1")
    probes = []
    for path, size in zip(onnx_paths, imgsz, strict=True):
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)}
        for _ in range(warmup):
            sess.run(None, feed)
        probes.append((sess, feed))
    times: list[list[float]] = [[] for _ in probes]
    for r in range(runs):
        for i in (range(len(probes)) if r % 2 == 0 else reversed(range(len(probes)))):
            sess, feed = probes[i]
            t = time.perf_counter()
            sess.run(None, feed)
            times[i].append(time.perf_counter() - t)
    return [float(np.median(t) * 1e3) if t else float("nan") for t in times]


def measure_variant(v: Variant, data_yaml: str | Path, evaluator: Evaluator,
                    root_metrics: dict[str, float] | None = None) -> Variant:
    """Fill ``v.metrics`` with what does not depend on the machine's load: the ``evaluator``'s metrics, the
    parameters and FLOPs, the delta to the root. Latency and file size come later, for every variant in one pass
    (``time_variants``), so that this may run on any worker, side by side with other steps.

    The evaluator's curves and confusion matrix go to ``<onnx stem>_plots/`` beside the variant
    (``v.info["plots_dir"]``); ``log_variants`` logs them, and the dataset, on the variant's run.
    """
    plots_dir = Path(v.onnx).parent / f"{Path(v.onnx).stem}_plots"
    res = evaluator(v.onnx, data_yaml, plots_dir=plots_dir)
    v.info.update(plots_dir=str(plots_dir), data_yaml=str(data_yaml), imgsz=int(res.imgsz))
    m = dict(res.metrics)  # latency_ms: the evaluator's (pre-processing + inference + post-processing)
    v.per_class = res.per_class
    if v.params is not None:
        m["params"] = float(v.params)
    if v.gflops is not None:
        m["gflops"] = float(v.gflops)
    if root_metrics is not None:
        m["delta_mask_mAP50"] = m["mask/mAP50"] - root_metrics["mask/mAP50"]
        m["delta_mask_mAP50-95"] = m["mask/mAP50-95"] - root_metrics["mask/mAP50-95"]
    v.metrics = m
    return v


def time_variants(variants: list[Variant], runs: int = 20) -> list[Variant]:
    """Time every measured variant in one pass, in this process, after the chain: the ONNX Runtime forward pass
    (``latency/forward_ms``, interleaved: ``ort_latency_ms``), then each installed predictor runtime
    (``latency/<runtime>_ms``), the faster written into the variant's ONNX metadata for ``predictor.backend: auto``
    (``damage.tasks.export.onnx.record_backend_latency``; OpenVINO runs QDQ INT8 faster than ONNX Runtime on some
    CPUs, so the choice differs per variant), then the file's size as it ships. Returns the same variants.
    """
    from damage.tasks.export.onnx import record_backend_latency

    sizes = [int(v.info["imgsz"]) for v in variants]
    for v, ms in zip(variants, ort_latency_ms([v.onnx for v in variants], sizes, runs=runs), strict=True):
        v.metrics[FORWARD_MS] = ms
    for v, size in zip(variants, sizes, strict=True):
        choice = record_backend_latency(Path(v.onnx), size, runs=runs)
        v.metrics.update({f"latency/{k}_ms": ms for k, ms in choice.get("backend_latency_ms", {}).items()})
        v.info["preferred_backend"] = choice.get("preferred_backend")
        v.metrics["size_mb"] = Path(v.onnx).stat().st_size / 1e6
    return variants


# ----------------------------------------------------------------------------- gate + choice
def gate_and_choose(variants: list[Variant], root: Variant, tolerance: float,
                    latency_budget_ms: float | None, min_speedup: float = 0.0,
                    class_tolerance: float | None = None) -> Variant:
    """Mark candidates and the chosen variant.

    A candidate keeps mask mAP50 within ``tolerance`` of ``root``, with ``class_tolerance`` every
    class's mask AP50 within it of root's (``mask_ap50/<class>``; a variant without per-class
    figures is not a candidate then), and, when ``min_speedup > 0``, runs at
    least ``min_speedup`` times faster than ``root`` (``latency/forward_ms``; a variant or root without
    it is not a candidate then).

    Returns:
        The chosen variant (``root`` when no compressed variant qualifies).
    """
    base = root.metrics["mask/mAP50"]
    root_ms = root.metrics.get(FORWARD_MS, float("nan"))
    for v in variants:
        accurate = v.metrics.get("mask/mAP50", float("-inf")) >= base - tolerance - 1e-12
        if class_tolerance is not None:
            from damage.tasks.evaluation.metrics import worst_class_drop

            accurate &= worst_class_drop(root.metrics, v.metrics)[1] <= class_tolerance + 1e-12
        faster = min_speedup <= 0 or v.metrics.get(FORWARD_MS, float("nan")) * min_speedup <= root_ms
        v.candidate = v.name != root.name and v.kind != "scratch-baseline" and accurate and faster
        v.chosen = False
    pool = [v for v in variants if v.candidate and (latency_budget_ms is None
                                                     or v.metrics.get(FORWARD_MS, float("inf")) <= latency_budget_ms)]
    chosen = max(pool, key=lambda v: (v.metrics["mask/mAP50-95"], -v.metrics[FORWARD_MS])) if pool else root
    for v in variants:  # by name: Prefect may hand tasks copies of these objects
        v.chosen = v.name == chosen.name
    chosen.chosen = True
    return chosen


# ----------------------------------------------------------------------------- outputs
def write_table(variants: list[Variant], out: str | Path) -> Path:
    """Comparison table as CSV (one row per variant, ``TABLE_COLUMNS``)."""
    def w(tmp):
        with open(tmp, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=TABLE_COLUMNS)
            wr.writeheader()
            for v in variants:
                wr.writerow(v.row())

    return atomic_write(Path(out), w)


def pareto_front(variants: list[Variant]) -> list[Variant]:
    """Variants no other variant beats on both latency (lower) and mask mAP50-95 (higher)."""
    pts = [v for v in variants if FORWARD_MS in v.metrics and "mask/mAP50-95" in v.metrics]
    front = []
    for v in pts:
        lv, av = v.metrics[FORWARD_MS], v.metrics["mask/mAP50-95"]
        dominated = any(o is not v and o.metrics[FORWARD_MS] <= lv and o.metrics["mask/mAP50-95"] >= av
                        and (o.metrics[FORWARD_MS] < lv or o.metrics["mask/mAP50-95"] > av) for o in pts)
        if not dominated:
            front.append(v)
    return sorted(front, key=lambda v: v.metrics[FORWARD_MS])


def plot_pareto(variants: list[Variant], out: str | Path, latency_budget_ms: float | None = None) -> Path:
    """Latency (ms/image, ORT) vs mask mAP50-95 scatter with the Pareto front and the choice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for v in variants:
        x, y = v.metrics.get(FORWARD_MS), v.metrics.get("mask/mAP50-95")
        if x is None or y is None:
            continue
        colour = "tab:green" if v.chosen else ("tab:blue" if v.candidate else "tab:grey")
        marker = "*" if v.chosen else ("s" if v.kind == "parent" else "o")
        ax.scatter([x], [y], c=colour, marker=marker, s=120 if v.chosen else 50, zorder=3)
        ax.annotate(v.name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = pareto_front(variants)
    if len(front) > 1:
        ax.plot([v.metrics[FORWARD_MS] for v in front], [v.metrics["mask/mAP50-95"] for v in front],
                "--", c="tab:orange", label="Pareto front", zorder=2)
    if latency_budget_ms is not None:
        ax.axvline(latency_budget_ms, c="tab:red", ls=":", label=f"budget {latency_budget_ms:g} ms")
    ax.set_xlabel("latency (ms/image, ONNX Runtime CPU)")
    ax.set_ylabel("mask mAP50-95 (val)")
    ax.set_title("Compression variants (green star: chosen; blue: within tolerance)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    fig.tight_layout()

    def w(tmp):
        fig.savefig(tmp, format="png", dpi=110)

    try:
        return atomic_write(Path(out), w)
    finally:
        plt.close(fig)


def log_variants(variants: list[Variant], parent_run_id: str, table_csv: Path, plot_png: Path,
                 chosen: Variant, settings: dict[str, Any]) -> str:
    """One nested MLflow run ``compress`` with the table, plot and choice; one nested run per variant.

    Returns:
        The ``compress`` run id.
    """
    from damage.tasks.core import tracking
    with tracking.step_run(parent_run_id, "compress") as (c, run_id):
        tracking.log_params(c, run_id, settings)
        for v in variants:
            with tracking.step_run(run_id, f"variant/{v.name}", tags={"damage.variant.kind": v.kind}) as (_, vid):
                tracking.log_params(c, vid, {"kind": v.kind, "parent": v.parent or "", "onnx": v.onnx,
                                             "weights": v.weights or "",
                                             **{f"info.{k}": val for k, val in _flat_info(v.info).items()}})
                tracking.log_metrics(c, vid, {**v.metrics, "candidate": float(v.candidate),
                                              "chosen": float(v.chosen)})
                _log_variant_inputs(c, vid, v)
        tracking.log_artifact(c, run_id, table_csv)
        tracking.log_artifact(c, run_id, plot_png)
        tracking.log_dict(c, run_id, chosen.to_dict(), "chosen.json")
        tracking.log_metrics(c, run_id, {f"chosen/{k}": val for k, val in chosen.metrics.items()})
        tracking.set_tags(c, run_id, {"damage.compress.chosen": chosen.name,
                                      "damage.compress.chosen_kind": chosen.kind})
    return run_id


def _log_variant_inputs(c, run_id: str, v: Variant) -> None:
    """The variant's evaluation dataset (MLflow input) and its curves / confusion matrix (``plots/``)."""
    from damage.tasks.core import tracking

    if v.info.get("data_yaml"):
        from damage.tasks.data.mlflow_input import log_dataset_input

        log_dataset_input(c, run_id, v.info["data_yaml"], None, "evaluation")
    plots = Path(v.info.get("plots_dir") or "")
    if v.info.get("plots_dir") and plots.is_dir():
        for f in sorted(plots.glob("*.png")):
            tracking.log_artifact(c, run_id, f, "plots")


def _flat_info(info: dict[str, Any]) -> dict[str, Any]:
    return {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in info.items()}


def table_markdown(variants: list[Variant]) -> list[dict[str, Any]]:
    """Rows for a Prefect table artifact (numbers rounded for reading)."""
    rows = []
    for v in variants:
        r = v.row()
        rows.append({k: round_metric(x, k) for k, x in r.items() if k != "onnx"})
    return rows


def publish_table_artifact(variants: list[Variant], key: str = "compress-variants") -> None:
    """Prefect table artifact of the variants (only inside a flow/task run)."""
    from prefect.artifacts import create_table_artifact
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return
    create_table_artifact(table_markdown(variants), key=key,
                          description="Compression variants: accuracy, latency, size; gate and choice")


def finalize(variants: list[Variant], root: Variant, cfg, out_dir: str | Path,
             parent_run_id: str | None) -> dict[str, Any]:
    """Gate, choose, write table + Pareto plot, log to MLflow (when ``parent_run_id``), Prefect artifact.

    Returns:
        The chosen variant as a dict: ``path`` (= ``onnx``), ``weights`` (the .pt it derives from),
        ``kind``, ``parent``, ``metrics``, ``name``,
        ``compressed`` (False when the parent stays), ``table``, ``plot``, ``run_id``.
    """
    out = Path(out_dir)
    chosen = gate_and_choose(variants, root, cfg.compress.tolerance, cfg.compress.latency_budget_ms,
                             cfg.compress.min_speedup, cfg.compress.class_tolerance)
    table = write_table(variants, out / "variants.csv")
    plot = plot_pareto(variants, out / "pareto.png", cfg.compress.latency_budget_ms)
    run_id = None
    if parent_run_id:
        settings = {"steps": cfg.compress.steps, "tolerance": cfg.compress.tolerance,
                    "class_tolerance": cfg.compress.class_tolerance,
                    "min_speedup": cfg.compress.min_speedup, "latency_budget_ms": cfg.compress.latency_budget_ms}
        run_id = log_variants(variants, parent_run_id, table, plot, chosen, settings)
    publish_table_artifact(variants)
    weights = chosen.weights or chosen.info.get("source_weights")
    return {"name": chosen.name, "path": chosen.onnx, "onnx": chosen.onnx, "weights": weights, "kind": chosen.kind,
            "parent": chosen.parent, "metrics": chosen.metrics, "per_class": chosen.per_class,
            "compressed": chosen.name != root.name,
            "table": str(table), "plot": str(plot), "run_id": run_id}


def root_variant(parent_weights: str | Path, parent_onnx: str | Path, imgsz: int) -> Variant:
    """The parent as a table row (params/FLOPs from its .pt)."""
    for p in (parent_weights, parent_onnx):
        if not Path(p).is_file():
            raise DamageError(f"{p}: parent model file not found")
    params, gf = pt_stats(parent_weights, imgsz)
    return Variant("parent", "parent", str(parent_onnx), None, str(parent_weights), params, gf)


def default_out_dir(cfg, parent_weights: str | Path) -> Path:
    """``<state_dir>/models/compress/<run folder of the parent>``: one folder per parent model."""
    from damage.tasks.core.runtime import state_paths

    p = Path(parent_weights).resolve()
    tag = p.parent.parent.name if p.parent.name == "weights" else p.stem
    return state_paths(cfg.state_dir).models / "compress" / tag


def chain(steps: list[str], root: Variant, apply: Callable[[str, Variant], StepOutput],
          measure: Callable[[Variant], Any]) -> list[Variant]:
    """The chain loop: each step works on the current head, its variants are measured, and the
    step's head (measured) becomes the next head. Returns the root and every measured variant, in order.

    ``apply(step, head)`` and ``measure(variant)`` are injected so that the plain function
    (``run_chain``) and the Prefect flow (each call a task) share this one loop. ``measure`` returns the
    measured variant, or a future of it (``.result()``): with ``runner: ray`` each measurement is a Ray task that
    runs while the chain goes on, and a step waits only for its own head's (INT8 static reads the float
    model's metrics); the rest are collected at the end.
    """
    from damage.tasks.core.progress import track

    def done(x: Any) -> Variant:
        return x if isinstance(x, Variant) else x.result()

    pending: list[Any] = [root]
    head: Any = root
    with track("compress", f"compress: {len(steps)} steps", len(steps)) as bar:
        for step in steps:
            res = apply(step, done(head))
            started = [measure(v) for v in res.variants]
            pending += started
            head = next((m for v, m in zip(res.variants, started, strict=True) if v.name == res.head.name), head)
            bar.advance()
    return [done(x) for x in pending]


def run_chain(parent_weights: str | Path, parent_onnx: str | Path, data_yaml: str | Path, cfg,
              out_dir: str | Path, parent_run_id: str | None = None, on_epoch=None) -> dict[str, Any]:
    """The whole chain as one plain function (CLI/tests); the Prefect flow wires the same pieces."""
    from damage.tasks.evaluation.evaluate import Evaluator

    evaluator = Evaluator.from_config(cfg)
    root = measure_variant(root_variant(parent_weights, parent_onnx, cfg.imgsz), data_yaml, evaluator)
    variants = chain(plan_steps(cfg.compress.steps), root,
                     lambda step, head: apply_step(step, head, root, data_yaml, cfg, Path(out_dir) / step,
                                                   evaluator, on_epoch),
                     lambda v: measure_variant(v, data_yaml, evaluator, root_metrics=root.metrics))
    return finalize(time_variants(variants), root, cfg, out_dir, parent_run_id)
