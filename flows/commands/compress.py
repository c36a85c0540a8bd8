"""``damage distill``, ``damage prune``, ``damage quantize``, ``damage compress``."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from damage.flows.common import console, fail, run_guarded, setup, top_level_run
from damage.tasks.core.display import fmt_metric
from damage.tasks.export.calibration import CALIBRATION_METHODS
from damage.tasks.export.quantize import QUANT_MODES

DataReq = Annotated[Path, typer.Option("--data", "-d", exists=True, dir_okay=False, help="Dataset data.yaml (YOLO-seg).")]
DataOpt = Annotated[Path | None, typer.Option("--data", "-d", exists=True, dir_okay=False,
                                              help="Dataset data.yaml (YOLO-seg).")]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default: <state>/models/compress/...).")]
# Choices (Typer checks them and lists them in --help)
PruneMethod = Enum("PruneMethod", {m: m for m in ("structured", "unstructured")}, type=str)
QuantMode = Enum("QuantMode", {m: m for m in QUANT_MODES}, type=str)
CalibMethod = Enum("CalibMethod", {m: m for m in CALIBRATION_METHODS}, type=str)
OnnxOpt = Annotated[Path | None, typer.Option("--onnx", exists=True, dir_okay=False,
                                              help="The model's ONNX (default: exported now).")]


def _print_table(result: dict) -> None:
    import csv

    from rich.table import Table

    t = Table(title="compression variants")
    # latency_ms: the evaluator's pre+inference+post per image; latency/forward_ms: the ORT forward pass alone
    cols = ["name", "kind", "mask/mAP50", "mask/mAP50-95", "box/mAP50-95", "latency_ms", "latency/forward_ms",
            "size_mb", "params", "gflops", "candidate", "chosen"]
    for c in cols:
        t.add_column(c)
    with open(result["table"]) as f:
        for row in csv.DictReader(f):
            cells = []
            for c in cols:
                v = row.get(c, "")
                try:
                    v = fmt_metric(float(v), c) if c not in ("params",) else f"{int(float(v)):,}"
                except ValueError:
                    pass
                cells.append(v)
            t.add_row(*cells)
    console.print(t)
    console.print(f"chosen: {result['name']} ({result['kind']}) -> {result['path']}", highlight=False, soft_wrap=True)
    console.print(f"table: {result['table']}\nPareto plot: {result['plot']}", highlight=False, soft_wrap=True)
    if result.get("run_id"):
        console.print(f"MLflow run: {result['run_id']}", highlight=False)


def _chain(weights: Path, data: Path, onnx: Path | None, cfg, paths, out: Path | None, name: str) -> dict:
    from damage.tasks.core.runtime import configure_ultralytics
    from damage.tasks.export import compress as C
    from damage.tasks.export.chain_steps import export_variant

    configure_ultralytics(paths)
    imgsz = cfg.imgsz
    out = out or C.default_out_dir(cfg, weights)
    if onnx is None:
        onnx, _ = run_guarded(export_variant, weights, out / "parent.onnx", cfg, imgsz, {"variant": "parent"})
    with top_level_run(cfg, name) as (run_id, _):
        return run_guarded(C.run_chain, weights, onnx, data, cfg, out, parent_run_id=run_id)


def distill_cmd(
    ctx: typer.Context,
    teacher: Annotated[Path, typer.Option("--teacher", "-t", exists=True, dir_okay=False,
                                          help="Teacher checkpoint (.pt).")],
    data: DataReq,
    student: Annotated[str | None, typer.Option("--student", help="Student size n|s|m|l|x (default: compress.distill.student).")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Epochs for KD and scratch (default: compress.distill.epochs).")] = None,
    hinton: Annotated[bool | None, typer.Option("--hinton/--no-hinton", help="Add the Hinton KL term (default: config).")] = None,
    out: OutOpt = None,
) -> None:
    """Distil TEACHER into a smaller student; also train it from scratch and compare both in MLflow."""
    cfg, paths = setup(ctx)
    from damage.tasks.core.runtime import configure_ultralytics

    configure_ultralytics(paths)
    from damage.tasks.evaluation.evaluate import Evaluator
    from damage.tasks.training.distill import distill, distill_vs_scratch

    upd = {k: v for k, v in {"student": student, "epochs": epochs, "hinton": hinton}.items() if v is not None}
    dcfg = cfg.compress.distill.model_copy(update=upd)
    out = out or paths.models / "distill" / teacher.stem
    if dcfg.compare_scratch:
        with top_level_run(cfg, "distill") as (run_id, _):
            res = run_guarded(distill_vs_scratch, teacher, data, cfg.train, dcfg, out, seed=cfg.seed,
                              parent_run_id=run_id, evaluator=Evaluator.from_config(cfg))
        for tag in ("kd", "scratch"):
            m = res[tag]
            console.print(f"{tag:8s} mask mAP50 {fmt_metric(m['mask/mAP50'])}  mask mAP50-95 "
                          f"{fmt_metric(m['mask/mAP50-95'])}  box mAP50-95 {fmt_metric(m['box/mAP50-95'])}", highlight=False)
        d = res["diff"]["kd_minus_scratch/mask/mAP50-95"]
        console.print(f"KD - scratch (mask mAP50-95): {'+' if d >= 0 else ''}{fmt_metric(d)}; loss terms logged: {', '.join(res['kd_loss_terms'])}",
                      highlight=False)
        console.print(f"student: {res['kd_weights']}\nMLflow run: {run_id}", highlight=False, soft_wrap=True)
    else:
        tr = run_guarded(distill, teacher, data, cfg.train, dcfg, out, seed=cfg.seed)
        console.print(f"student: {tr.best}  metrics: {tr.metrics}", highlight=False, soft_wrap=True)


def prune_cmd(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Checkpoint to prune (.pt).")],
    data: DataReq,
    ratio: Annotated[float | None, typer.Option("--ratio", help="Structured: fraction of channels removed.")] = None,
    method: Annotated[PruneMethod, typer.Option("--method", help="Structured (channels) or unstructured (weights).")]
    = PruneMethod.structured,
    sparsity: Annotated[float | None, typer.Option("--sparsity", help="Unstructured: fraction of weights zeroed.")] = None,
    scope: Annotated[str | None, typer.Option("--scope", help="Unstructured: global | layer.")] = None,
    finetune_epochs: Annotated[int | None, typer.Option("--finetune-epochs", help="Fine-tuning epochs after structured pruning.")] = None,
    onnx: OnnxOpt = None,
    out: OutOpt = None,
) -> None:
    """Prune MODEL; report params, FLOPs, latency and mAP before, after pruning and after fine-tuning."""
    method = method.value
    extra = [f"compress.steps=[{'prune' if method == 'structured' else 'unstructured'}]"]
    for key, val in (("ratio", ratio), ("sparsity", sparsity), ("scope", scope), ("finetune_epochs", finetune_epochs)):
        if val is not None:
            extra.append(f"compress.prune.{key}={val}")
    cfg, paths = setup(ctx, extra)
    _print_table(_chain(model, data, onnx, cfg, paths, out, "prune"))


def quantize_cmd(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="FP32 ONNX model.")],
    mode: Annotated[QuantMode, typer.Option("--mode", help="Quantization mode.")] = QuantMode["int8-static"],
    data: DataOpt = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output .onnx (default: MODEL.<mode>.onnx).")] = None,
    accuracy_aware: Annotated[bool, typer.Option("--accuracy-aware/--plain", help="INT8 static: retry with sensitive nodes in float until within tolerance.")] = True,
    imgsz: Annotated[int | None, typer.Option("--imgsz", help="Calibration/eval size (default: ONNX metadata).")] = None,
    calibrate_method: Annotated[CalibMethod | None, typer.Option(
        "--calibrate-method", help="INT8 static activation calibration (default: compress.quantize.calibrate_method).")] = None,
    per_channel: Annotated[bool | None, typer.Option(
        "--per-channel/--per-tensor", help="INT8 weight scales (default: compress.quantize.per_channel).")] = None,
) -> None:
    """Quantize an ONNX model (static INT8 QDQ per-channel, dynamic INT8 or FP16) and report accuracy and size."""
    mode = mode.value
    extra = []
    if calibrate_method is not None:
        if mode != "int8-static":
            fail(f"--calibrate-method applies to int8-static only, not {mode}")
        extra.append(f"compress.quantize.calibrate_method={calibrate_method.value}")
    if per_channel is not None:
        if mode == "fp16":
            fail("--per-channel/--per-tensor apply to the INT8 modes only, not fp16")
        extra.append(f"compress.quantize.per_channel={str(per_channel).lower()}")
    cfg, paths = setup(ctx, extra)
    from damage.tasks.core.runtime import configure_ultralytics
    from damage.tasks.evaluation.evaluate import Evaluator
    from damage.tasks.export import quantize as Q
    from damage.tasks.export.calibration import calibration_images

    # --imgsz unset: the ONNX's own size (its metadata), for calibration and evaluation alike
    evaluator = Evaluator.from_config(cfg, imgsz=imgsz)
    configure_ultralytics(paths)
    target = (out or model.with_name(f"{model.stem}.{mode}.onnx")).resolve()
    qc = cfg.compress.quantize
    if mode == "int8-static":
        if data is None:
            fail("--data data.yaml is required for int8-static (calibration images come from its train split)")
        calib = run_guarded(calibration_images, data, qc.calib_images, cfg.seed)
        if accuracy_aware:
            res = run_guarded(Q.quantize_accuracy_aware, model, target, data, calib, cfg.compress.tolerance,
                              qc.max_retries, qc.nodes_per_retry, evaluate_fn=evaluator.metrics_fn(data),
                              imgsz=imgsz, per_channel=qc.per_channel, sensitivity_images=qc.sensitivity_images,
                              calibrate_method=qc.calibrate_method, activation_symmetric=qc.activation_symmetric)
            for i, a in enumerate(res.attempts):
                console.print(f"attempt {i}: {len(a.float_nodes)} extra float node(s), mask mAP50 "
                              f"{fmt_metric(a.metrics['mask/mAP50'])}", highlight=False)
            console.print(f"float mask mAP50 {fmt_metric(res.float_metrics['mask/mAP50'])}, INT8 "
                          f"{fmt_metric(res.metrics['mask/mAP50'])}"
                          f" -> {'within' if res.within_tolerance else 'OUTSIDE'} tolerance {cfg.compress.tolerance}",
                          highlight=False)
        else:
            run_guarded(Q.quantize_onnx, model, target, mode, calib_images=calib, imgsz=imgsz,
                        per_channel=qc.per_channel, calibrate_method=qc.calibrate_method,
                        activation_symmetric=qc.activation_symmetric)
    else:
        run_guarded(Q.quantize_onnx, model, target, mode,
                    per_channel=qc.per_channel if mode == "int8-dynamic" else None)
        if data is not None:
            for p in (model, target):
                m = run_guarded(evaluator, p, data).metrics
                console.print(f"{p.name}: mask mAP50 {fmt_metric(m['mask/mAP50'])}  mask mAP50-95 "
                              f"{fmt_metric(m['mask/mAP50-95'])}",
                              highlight=False)
    console.print(f"{mode}: {model} ({model.stat().st_size / 1e6:.1f} MB) -> {target} "
                  f"({target.stat().st_size / 1e6:.1f} MB)", highlight=False, soft_wrap=True)


def compress_cmd(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(exists=True, dir_okay=False,
                                          help="Trained checkpoint (.pt), the parent of every variant.")],
    data: DataReq,
    onnx: OnnxOpt = None,
    out: OutOpt = None,
) -> None:
    """Run the configured chain (compress.steps), measure every variant, gate on tolerance, pick one."""
    cfg, paths = setup(ctx)
    _print_table(_chain(model, data, onnx, cfg, paths, out, "compress"))


def register(app: typer.Typer) -> None:
    app.command("distill")(distill_cmd)
    app.command("prune")(prune_cmd)
    app.command("quantize")(quantize_cmd)
    app.command("compress")(compress_cmd)
