"""``damage evaluate`` (mAP, per-class AP, speed) and ``damage sweep`` (operating thresholds).

Each stand-alone call opens a top-level MLflow run (``evaluate-<model>`` / ``sweep-<model>``)
with the step run nested under it, as in the nightly flow.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from damage.flows.common import (
    RayOpt,
    console,
    fail,
    ray_for,
    ray_where,
    refuse_unsafe_model,
    run_guarded,
    setup,
    top_level_run,
)
from damage.flows.tables import JsonOpt_help, json_output
from damage.tasks.core.display import fmt_metric

ModelArg = Annotated[Path, typer.Argument(help="Model to evaluate: .pt or .onnx (FP32, FP16 or INT8).")]
DataOpt = Annotated[Path, typer.Option("--data", "-d", help="data.yaml (or its folder) of a YOLO-seg dataset.")]
SplitOpt = Annotated[str | None, typer.Option(help="Split to use (default: evaluate.split / sweep.split).")]
ImgszOpt = Annotated[int | None, typer.Option(help="Letterbox size (default: the model's own).")]
RunOpt = Annotated[bool, typer.Option("--mlflow/--no-mlflow", help="Log to MLflow (a top-level run).")]
JsonOpt = Annotated[bool, typer.Option("--json", help=JsonOpt_help)]


def _fmt(v, key: str = "") -> str:
    return fmt_metric(v, key, missing="-")


def _run_logged(cfg, kind: str, model: Path, log_to_mlflow: bool, step, plain):
    """Run ``step(parent_run_id)`` inside a new top-level MLflow run, or ``plain()`` without MLflow."""
    if not log_to_mlflow:
        return run_guarded(plain), None, None
    with top_level_run(cfg, f"{kind}-{model.stem}", kind) as (run_id, uri):
        return run_guarded(step, run_id), run_id, uri


def _run_url(run_id: str | None, uri: str | None) -> str | None:
    if not run_id:
        return None
    from damage.tasks.core import links, tracking

    exp = tracking.client(uri).get_run(run_id).info.experiment_id
    return links.mlflow_run_url(exp, run_id, links.mlflow_base(None, uri))


def _where(run_id: str | None, uri: str | None) -> None:
    if run_id:
        console.print(f"MLflow run: {run_id}  ({uri})\n"
                      f"  open: {_run_url(run_id, uri)}   (start the UIs with: damage ui)", highlight=False,
                      soft_wrap=True)


def evaluate(
    ctx: typer.Context,
    model: ModelArg,
    data: DataOpt,
    split: SplitOpt = None,
    imgsz: ImgszOpt = None,
    mlflow: RunOpt = True,
    as_json: JsonOpt = False,
    ray: RayOpt = None,
) -> None:
    """Evaluate a model: box and mask P, R, mAP50, mAP50-95 (conf floor 0.001), per-class AP, speed."""
    with json_output(as_json) as out:
        cfg, paths = setup(ctx)
        from damage.tasks.core.runtime import configure_ultralytics
        from damage.tasks.data.dataset import find_data_yaml
        from damage.tasks.evaluation.evaluate import Evaluator, evaluate_step

        configure_ultralytics(paths)
        data_yaml = run_guarded(find_data_yaml, data)
        refuse_unsafe_model(model)
        # --imgsz unset: the model's own size (any model file can be evaluated, not only this config's)
        ecfg = Evaluator.from_config(cfg, imgsz=imgsz, ray=ray_for(cfg, paths, ray),
                                     **({"split": split} if split else {}))
        t0 = time.time()
        res, run_id, uri = _run_logged(
            cfg, "evaluate", model, mlflow,
            lambda parent: evaluate_step(model, data_yaml, ecfg, parent,
                                         system_metrics_s=cfg.mlflow.system_metrics_interval_s),
            lambda: ecfg(model, data_yaml))
        out.append({**res.to_dict(), "mlflow_run_id": run_id, "tracking_uri": uri,
                    "mlflow_run_url": _run_url(run_id, uri)})
    if as_json:
        return
    from rich.table import Table

    t = Table(title=f"{model.name} on {data_yaml} [{ecfg.split}] @ {res.imgsz}px ({res.model_format}), "
                    f"{int(res.metrics['images'])} images", show_header=True)
    t.add_column("metric")
    t.add_column("box", justify="right")
    t.add_column("mask", justify="right")
    for k in ("precision", "recall", "mAP50", "mAP50-95"):
        t.add_row(k, _fmt(res.metrics[f"box/{k}"]), _fmt(res.metrics[f"mask/{k}"]))
    console.print(t)
    pc = Table(title="per class")
    cols = ["class", "images", "instances", "box/AP50", "box/AP50-95", "mask/AP50", "mask/AP50-95"]
    for c in cols:
        pc.add_column(c, justify="left" if c == "class" else "right")
    for row in res.per_class:
        pc.add_row(*[_fmt(row[c]) for c in cols])
    console.print(pc)
    m = res.metrics
    ms = {k: _fmt(m[k], k) for k in ("speed/preprocess_ms", "speed/inference_ms", "speed/postprocess_ms", "latency_ms")}
    console.print(f"fitness {_fmt(m['fitness'])} | ms/image: pre {ms['speed/preprocess_ms']}, "
                  f"inference {ms['speed/inference_ms']}, post {ms['speed/postprocess_ms']}, "
                  f"total {ms['latency_ms']} | mAP at conf floor {ecfg.conf}, NMS IoU {ecfg.iou} "
                  f"| {time.time() - t0:.1f} s" + (f" | Ray: {ray_where(cfg)}" if ecfg.ray else ""))
    _where(run_id, uri)


def sweep(
    ctx: typer.Context,
    model: ModelArg,
    data: DataOpt,
    split: SplitOpt = None,
    imgsz: ImgszOpt = None,
    conf: Annotated[list[float] | None, typer.Option(
        "--conf", help="Confidence grid value (repeatable; default: sweep.conf).")] = None,
    iou: Annotated[list[float] | None, typer.Option(
        "--iou", help="NMS IoU grid value (repeatable; default: sweep.iou).")] = None,
    objective: Annotated[str | None, typer.Option(
        help="mask_f1 | fitness | recall_at_precision | damage_mae (default: sweep.objective).")] = None,
    min_precision: Annotated[float | None, typer.Option(
        help="Precision floor of recall_at_precision (default: sweep.min_precision).")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Folder for sweep.csv and the plots (default: <state>/reports/sweep-<run>).")] = None,
    mlflow: RunOpt = True,
    as_json: JsonOpt = False,
    ray: RayOpt = None,
) -> None:
    """Sweep confidence x NMS IoU with one inference pass and choose the operating point."""
    with json_output(as_json) as doc:
        cfg, paths = setup(ctx)
        from damage.tasks.core.runtime import configure_ultralytics
        from damage.tasks.data.dataset import find_data_yaml
        from damage.tasks.evaluation.sweep import OBJECTIVES, get_objective, sweep_step, sweep_thresholds

        update = {k: v for k, v in {"split": split, "conf": conf, "iou": iou, "objective": objective,
                                    "min_precision": min_precision}.items() if v}
        if objective and objective not in OBJECTIVES:
            run_guarded(get_objective, objective)
        try:
            scfg = type(cfg.sweep).model_validate({**cfg.sweep.model_dump(), **update})
        except ValueError as e:  # pydantic ValidationError: a bad grid value or precision floor
            fail(f"sweep options: {e}".replace("\n", " "))
        configure_ultralytics(paths)
        data_yaml = run_guarded(find_data_yaml, data)
        refuse_unsafe_model(model)
        rcfg = ray_for(cfg, paths, ray)
        res, run_id, uri = _run_logged(
            cfg, "sweep", model, mlflow,
            lambda parent: sweep_step(model, data_yaml, scfg, imgsz, parent, out_dir=out, ray=rcfg),
            lambda: sweep_thresholds(model, data_yaml, scfg.split, imgsz, scfg.conf, scfg.iou, scfg.objective,
                                     scfg.min_precision, out or paths.reports / "sweep", scfg.max_det, ray=rcfg))
        doc.append({**res.to_dict(), "mlflow_run_id": run_id, "tracking_uri": uri,
                    "mlflow_run_url": _run_url(run_id, uri)})
    if as_json:
        return
    from rich.table import Table

    obj = OBJECTIVES[res.objective]
    t = Table(title=f"threshold sweep: {model.name} on {data_yaml} [{scfg.split}], {res.images} images "
                    f"(mAP at conf floor 0.001)")
    cols = {"conf": "conf", "iou": "iou", "mask/precision": "mask P", "mask/recall": "mask R", "mask/f1": "mask F1",
            "box/f1": "box F1", "mask/mAP50-95": "mask mAP", "box/mAP50-95": "box mAP",
            "dets_per_image": "dets/img", "damage_mae": "dmg MAE"}
    for head in cols.values():
        t.add_column(head, justify="right")
    for r in res.rows:
        chosen = r["conf"] == res.best["conf"] and r["iou"] == res.best["iou"]
        t.add_row(*[f"{r[c]:.2f}" if c in ("conf", "iou") else _fmt(r[c], c) for c in cols],  # thresholds, metrics
                  style="bold green" if chosen else None)
    t.caption = "mAP = mAP50-95 at the row's NMS IoU; P/R/F1 micro-averaged at IoU 0.5; dmg MAE in % points"
    console.print(t)
    th = res.thresholds
    feas = "" if res.best.get("feasible", True) else f" [red](no point reaches precision {res.min_precision})[/]"
    console.print(f"operating point: conf={th['conf']:.2f} iou={th['iou']:.2f}  "
                  f"({res.objective}: {obj.key} = {_fmt(th['value'])}){feas}")
    console.print(f"files: {res.csv_path}\n       {res.heatmap_path}\n       {res.pr_plot_path}")
    _where(run_id, uri)


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)
    app.command("sweep")(sweep)
