"""``damage run`` (the nightly flow, now) and ``damage train`` (training alone)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from damage.flows.common import console, run_guarded, setup, shared
from damage.tasks.core.display import fmt_metric


def _print_summary(summary: dict, seconds: float) -> None:
    from rich.table import Table

    if summary.get("skipped"):
        console.print(f"[yellow]{summary.get('reason')}[/]\n(use --force to run anyway; "
                      f"MLflow run {summary.get('mlflow_run_id')})")
        return

    t = Table(title="nightly run", show_header=False)
    m = summary.get("metrics", {})
    for k in ("box/mAP50", "box/mAP50-95", "mask/mAP50", "mask/mAP50-95"):
        v = m.get(k)
        t.add_row(k, fmt_metric(v, k))
    op = summary.get("operating_point") or {}
    if op:
        t.add_row("operating point", f"conf={op.get('conf')} iou={op.get('iou')} ({op.get('objective')})")
    dmg = summary.get("damage_pct_mae") or {}
    if dmg:
        mae = dmg.get("mae")
        t.add_row("damage % MAE", (f"{fmt_metric(mae)} pp" if isinstance(mae, float) else "n/a")
                  + f" over {dmg.get('vehicles', 0)} labelled vehicles (at the operating point)")
    init = summary.get("init") or {}
    if init:
        t.add_row("training start", init.get("reason", ""))
    comp = summary.get("compression") or {}
    if comp:
        ap = comp.get("mask/mAP50")
        what = (f"registered variant: {comp.get('name')} ({comp.get('kind')}" if comp.get("compressed", True)
                else "kept the uncompressed model (no variant within compress.tolerance and compress.min_speedup"
                     " x faster")
        t.add_row("compression", what + (f", mask mAP50 {ap:.3f}" if isinstance(ap, float) else "")
                  + f"); table: {comp.get('table')}")
    art = summary.get("registered_artifact") or {}
    t.add_row("registered", f"{summary.get('registered_model')} v{summary.get('registered_version')}"
              + (f" ({art.get('precision')}, {art.get('kind')}; the figures above are its own)" if art else ""))
    promo = summary.get("promotion") or {}
    if promo:
        verdict = "passed -> staging" if promo.get("passed") else "failed (stays pending)"
        t.add_row("promotion gate", f"{verdict}: {'; '.join(promo.get('reasons', []))}")
        if promo.get("failed_classes"):
            t.add_row("failing classes", ", ".join(promo["failed_classes"]))
    t.add_row("epochs / imgsz", f"{summary.get('epochs_run')} / {summary.get('imgsz')}")
    t.add_row("wall time", f"{seconds / 60:.1f} min")
    t.add_row("MLflow run", summary.get("mlflow_run_id", ""))
    t.add_row("state dir", summary.get("state_dir", ""))
    console.print(t)
    per_class = summary.get("per_class") or []
    if per_class:
        by_class = dmg.get("by_class") or {}
        rows = [{**r, "damage % MAE": by_class.get(r.get("class"))} for r in per_class]
        pc = Table(title="per class (val; AP at conf 0.001, damage % MAE in pp at the operating point)")
        cols = [k for k in rows[0].keys()]
        for c in cols:
            pc.add_column(str(c), style="bold" if c == "mask/AP50" else None)
        for row in rows:
            pc.add_row(*[fmt_metric(row[c], str(c), missing="-") for c in cols])
        console.print(pc)
    state = summary.get("state_dir", ".state")
    if summary.get("mlflow_run_url"):
        console.print(f"\nMLflow run : {summary['mlflow_run_url']}", highlight=False, soft_wrap=True)
    if summary.get("prefect_flow_run_url"):
        console.print(f"Prefect run: {summary['prefect_flow_run_url']}", highlight=False, soft_wrap=True)
    console.print("(both UIs on this state dir: damage ui)", highlight=False)
    console.print(
        "\nLook at it:\n"
        f"  MLflow UI : .venv/bin/mlflow ui --backend-store-uri {summary.get('tracking_uri')} --port 5000"
        "   (or: make ui-mlflow)\n"
        f"  Prefect UI: PREFECT_HOME={state}/prefect .venv/bin/prefect server start --port 4200"
        "   (or: make ui-prefect)\n"
        f"  summary   : {state}/last_run.json"
    )


def run(
    ctx: typer.Context,
    force: Annotated[bool, typer.Option(help="Run even if data, config and code are unchanged.")] = False,
    demo: Annotated[bool, typer.Option(help="Demo mode: configs/demo.yaml (built-in synthetic data, "
                                             "sized for ~10-15 min on 2 CPU cores).")] = False,
) -> None:
    """Run the nightly pipeline now: data gate, train, evaluate, sweep, export, register."""
    opts = shared(ctx)
    config = opts.config
    if demo and config is None:
        from damage.tasks.core.config import DEFAULT_CONFIG

        config = DEFAULT_CONFIG.parent / "demo.yaml"
    cfg, paths = setup(ctx, config=config)
    from damage.tasks.nightly.pipeline import preflight

    run_guarded(preflight, cfg)
    from damage.flows.nightly import nightly

    t0 = time.time()
    # the whole config (--config, --set) travels pinned in this process's environment (setup): this process is
    # the worker; a run parameter could only carry the allowlisted keys of damage.tasks.core.run_params
    summary = run_guarded(nightly, config_path=None, overrides=[], force=force)
    seconds = time.time() - t0
    summary = {**summary, "wall_time_s": round(seconds, 1)}
    from damage.tasks.core.atomic import atomic_write_text

    atomic_write_text(paths.root / "last_run.json", json.dumps(summary, indent=2, default=str))
    _print_summary(summary, seconds)


def train(
    ctx: typer.Context,
    data: Annotated[Path, typer.Argument(help="data.yaml (or its folder) of a YOLO-seg dataset.")],
    out: Annotated[Path | None, typer.Option(help="Output folder (default: <state>/runs/train).")] = None,
    name: Annotated[str, typer.Option(help="Run folder name (resume=auto looks here).")] = "train",
) -> None:
    """Train a segmentation model alone (no MLflow run), honouring the train: section (the command's
    help, set in ``register``, lists the families of ``damage.tasks.core.families``)."""
    cfg, paths = setup(ctx)
    from damage.tasks.data.dataset import find_data_yaml, load_data_yaml
    from damage.tasks.training.init import apply, offline_decision
    from damage.tasks.training.train import train_model

    data_yaml = run_guarded(find_data_yaml, data)
    start = run_guarded(offline_decision, cfg.train, run_guarded(load_data_yaml, data_yaml).names)
    console.print(f"start: {start.reason}", highlight=False)
    from damage.tasks.evaluation.evaluate import Evaluator

    res = run_guarded(train_model, data_yaml, apply(cfg.train, start), out or paths.runs / "train", seed=cfg.seed,
                      name=name, guard_eval=Evaluator.from_config(cfg).metrics_fn(data_yaml))
    console.print(f"trained {res.epochs_run} epochs -> best: {res.best}")
    for k in ("box/mAP50", "box/mAP50-95", "mask/mAP50", "mask/mAP50-95"):
        if k in res.metrics:
            console.print(f"  {k}: {fmt_metric(res.metrics[k])}")


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    from damage.tasks.core.families import FAMILIES, SIZES

    fams = ", ".join(FAMILIES)
    app.command("train", help=(
        f"Train a segmentation model alone (no MLflow run), honouring the train: section. Families: {fams} "
        f"(train.model: a size {'|'.join(SIZES)} = {next(iter(FAMILIES))}, or <family><size>-seg, e.g. "
        f"train.model={list(FAMILIES)[-1]}n-seg; or a .yaml/.pt path)."))(train)
