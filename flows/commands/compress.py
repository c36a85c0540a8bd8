"""``damage distill``, ``damage prune``, ``damage quantize``, ``damage compress``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.common import ConfigOpt, SetOpt, StateOpt, console, fail, run_guarded, setup

DataOpt = Annotated[Path | None, typer.Option("--data", "-d", help="Dataset data.yaml (YOLO-seg).")]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default: <state>/models/compress/...).")]


def _need(path: Path | None, what: str) -> Path:
    if path is None:
        fail(f"{what} is required")
    if not path.is_file():
        fail(f"{path}: {what} not found")
    return path


def _open_run(cfg, name: str) -> str:
    from tasks.core import tracking
    c = tracking.client()
    exp = tracking.ensure_experiment(c, cfg.mlflow.experiment, cfg.mlflow.artifact_location)
    return tracking.start_run(c, exp, name, tags={"damage.entry": f"cli:{name}"})


def _close_run(run_id: str, ok: bool) -> None:
    from tasks.core import tracking
    tracking.end_run(tracking.client(), run_id, ok)


def _print_table(result: dict) -> None:
    import csv

    from rich.table import Table

    t = Table(title="compression variants")
    cols = ["name", "kind", "mask/mAP50", "mask/mAP50-95", "box/mAP50-95", "latency_ms", "size_mb", "params",
            "gflops", "candidate", "chosen"]
    for c in cols:
        t.add_column(c)
    with open(result["table"]) as f:
        for row in csv.DictReader(f):
            cells = []
            for c in cols:
                v = row.get(c, "")
                try:
                    v = f"{float(v):.4g}" if c not in ("params",) else f"{int(float(v)):,}"
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
    from tasks.core.runtime import configure_ultralytics
    from tasks.export import compress as C

    configure_ultralytics(paths)
    imgsz = cfg.export.imgsz or cfg.train.imgsz
    out = out or C.default_out_dir(cfg, weights)
    if onnx is None:
        onnx, _ = run_guarded(C.export_variant, weights, out / "parent.onnx", cfg, imgsz, {"variant": "parent"})
    run_id = _open_run(cfg, name)
    ok = False
    try:
        res = run_guarded(C.run_chain, weights, onnx, data, cfg, out, parent_run_id=run_id)
        ok = True
    finally:
        _close_run(run_id, ok)
    return res


def distill_cmd(
    teacher: Annotated[Path, typer.Option("--teacher", "-t", help="Teacher checkpoint (.pt).")],
    data: DataOpt = None,
    student: Annotated[str | None, typer.Option("--student", help="Student size n|s|m|l|x (default: compress.distill.student).")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Epochs for KD and scratch (default: compress.distill.epochs).")] = None,
    hinton: Annotated[bool | None, typer.Option("--hinton/--no-hinton", help="Add the Hinton KL term (default: config).")] = None,
    out: OutOpt = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    state_dir: StateOpt = None,
) -> None:
    """Distil TEACHER into a smaller student; also train it from scratch and compare both in MLflow."""
    cfg, paths = setup(config, sets, state_dir)
    _need(teacher, "teacher checkpoint")
    data = _need(data, "--data data.yaml")
    from tasks.core.runtime import configure_ultralytics

    configure_ultralytics(paths)
    from tasks.training.distill import distill, distill_vs_scratch

    upd = {k: v for k, v in {"student": student, "epochs": epochs, "hinton": hinton}.items() if v is not None}
    dcfg = cfg.compress.distill.model_copy(update=upd)
    out = out or paths.models / "distill" / teacher.stem
    if dcfg.compare_scratch:
        run_id = _open_run(cfg, "distill")
        ok = False
        try:
            res = run_guarded(distill_vs_scratch, teacher, data, cfg.train, dcfg, out, seed=cfg.seed,
                              parent_run_id=run_id, eval_cfg=cfg.evaluate)
            ok = True
        finally:
            _close_run(run_id, ok)
        for tag in ("kd", "scratch"):
            m = res[tag]
            console.print(f"{tag:8s} mask mAP50 {m['mask/mAP50']:.4f}  mask mAP50-95 {m['mask/mAP50-95']:.4f}  "
                          f"box mAP50-95 {m['box/mAP50-95']:.4f}", highlight=False)
        d = res["diff"]["kd_minus_scratch/mask/mAP50-95"]
        console.print(f"KD - scratch (mask mAP50-95): {d:+.4f}; loss terms logged: {', '.join(res['kd_loss_terms'])}",
                      highlight=False)
        console.print(f"student: {res['kd_weights']}\nMLflow run: {run_id}", highlight=False, soft_wrap=True)
    else:
        tr = run_guarded(distill, teacher, data, cfg.train, dcfg, out, seed=cfg.seed)
        console.print(f"student: {tr.best}  metrics: {tr.metrics}", highlight=False, soft_wrap=True)


def prune_cmd(
    model: Annotated[Path, typer.Argument(help="Checkpoint to prune (.pt).")],
    data: DataOpt = None,
    ratio: Annotated[float | None, typer.Option("--ratio", help="Structured: fraction of channels removed.")] = None,
    method: Annotated[str, typer.Option("--method", help="structured | unstructured")] = "structured",
    sparsity: Annotated[float | None, typer.Option("--sparsity", help="Unstructured: fraction of weights zeroed.")] = None,
    scope: Annotated[str | None, typer.Option("--scope", help="Unstructured: global | layer.")] = None,
    finetune_epochs: Annotated[int | None, typer.Option("--finetune-epochs", help="Fine-tuning epochs after structured pruning.")] = None,
    onnx: Annotated[Path | None, typer.Option("--onnx", help="The model's ONNX (default: exported now).")] = None,
    out: OutOpt = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    state_dir: StateOpt = None,
) -> None:
    """Prune MODEL; report params, FLOPs, latency and mAP before, after pruning and after fine-tuning."""
    if method not in ("structured", "unstructured"):
        fail(f"--method must be structured or unstructured, got '{method}'")
    extra = [f"compress.steps=[{'prune' if method == 'structured' else 'unstructured'}]"]
    for key, val in (("ratio", ratio), ("sparsity", sparsity), ("scope", scope), ("finetune_epochs", finetune_epochs)):
        if val is not None:
            extra.append(f"compress.prune.{key}={val}")
    cfg, paths = setup(config, list(sets or []) + extra, state_dir)
    _need(model, "checkpoint")
    data = _need(data, "--data data.yaml")
    _print_table(_chain(model, data, onnx, cfg, paths, out, "prune"))


def quantize_cmd(
    model: Annotated[Path, typer.Argument(help="FP32 ONNX model.")],
    mode: Annotated[str, typer.Option("--mode", help="int8-static | int8-dynamic | fp16")] = "int8-static",
    data: DataOpt = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output .onnx (default: MODEL.<mode>.onnx).")] = None,
    accuracy_aware: Annotated[bool, typer.Option("--accuracy-aware/--plain", help="INT8 static: retry with sensitive nodes in float until within tolerance.")] = True,
    imgsz: Annotated[int | None, typer.Option("--imgsz", help="Calibration/eval size (default: ONNX metadata).")] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    state_dir: StateOpt = None,
) -> None:
    """Quantize an ONNX model (static INT8 QDQ per-channel, dynamic INT8 or FP16) and report accuracy and size."""
    cfg, paths = setup(config, sets, state_dir)
    _need(model, "ONNX model")
    from tasks.core.runtime import configure_ultralytics
    from tasks.export import quantize as Q

    if mode not in Q.QUANT_MODES:
        fail(f"--mode must be one of {', '.join(Q.QUANT_MODES)}, got '{mode}'")
    configure_ultralytics(paths)
    target = (out or model.with_name(f"{model.stem}.{mode}.onnx")).resolve()
    qc = cfg.compress.quantize
    if mode == "int8-static":
        data = _need(data, "--data data.yaml (calibration images come from its train split)")
        calib = run_guarded(Q.calibration_images, data, qc.calib_images, cfg.seed)
        if accuracy_aware:
            res = run_guarded(Q.quantize_accuracy_aware, model, target, data, calib, cfg.compress.tolerance,
                              qc.max_retries, qc.nodes_per_retry, imgsz=imgsz, per_channel=qc.per_channel,
                              sensitivity_images=qc.sensitivity_images)
            for i, a in enumerate(res.attempts):
                console.print(f"attempt {i}: {len(a.float_nodes)} extra float node(s), mask mAP50 "
                              f"{a.metrics['mask/mAP50']:.4f}", highlight=False)
            console.print(f"float mask mAP50 {res.float_metrics['mask/mAP50']:.4f}, INT8 {res.metrics['mask/mAP50']:.4f}"
                          f" -> {'within' if res.within_tolerance else 'OUTSIDE'} tolerance {cfg.compress.tolerance}",
                          highlight=False)
        else:
            run_guarded(Q.quantize_onnx, model, target, mode, calib_images=calib, imgsz=imgsz,
                        per_channel=qc.per_channel)
    else:
        run_guarded(Q.quantize_onnx, model, target, mode,
                    per_channel=qc.per_channel if mode == "int8-dynamic" else None)
        if data is not None:
            from tasks.evaluation.evaluate import evaluate_model

            for p in (model, target):
                m = run_guarded(evaluate_model, p, data, imgsz=imgsz).metrics
                console.print(f"{p.name}: mask mAP50 {m['mask/mAP50']:.4f}  mask mAP50-95 {m['mask/mAP50-95']:.4f}",
                              highlight=False)
    console.print(f"{mode}: {model} ({model.stat().st_size / 1e6:.1f} MB) -> {target} "
                  f"({target.stat().st_size / 1e6:.1f} MB)", highlight=False, soft_wrap=True)


def compress_cmd(
    model: Annotated[Path, typer.Argument(help="Trained checkpoint (.pt), the parent of every variant.")],
    data: DataOpt = None,
    onnx: Annotated[Path | None, typer.Option("--onnx", help="The parent's ONNX (default: exported now).")] = None,
    out: OutOpt = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    state_dir: StateOpt = None,
) -> None:
    """Run the configured chain (compress.steps), measure every variant, gate on tolerance, pick one."""
    cfg, paths = setup(config, sets, state_dir)
    _need(model, "checkpoint")
    data = _need(data, "--data data.yaml")
    _print_table(_chain(model, data, onnx, cfg, paths, out, "compress"))


def register(app: typer.Typer) -> None:
    app.command("distill")(distill_cmd)
    app.command("prune")(prune_cmd)
    app.command("quantize")(quantize_cmd)
    app.command("compress")(compress_cmd)
