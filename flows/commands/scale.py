"""``damage tune``: the recipe search on Ray Tune (``damage.tasks.scale.tune``), on this machine or a Ray cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from damage.flows.common import console, open_top_level_run, run_guarded, setup


def tune_cmd(
    ctx: typer.Context,
    data: Annotated[Path, typer.Argument(help="data.yaml (or its folder) every trial trains and is scored on.")],
    space: Annotated[Path | None, typer.Option(help="Search-space YAML (default: tune.space).")] = None,
    trials: Annotated[int | None, typer.Option(help="Trials to sample (default: tune.trials).")] = None,
    out: Annotated[Path | None, typer.Option(help="Search folder (default: <state>/runs/tune).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the killed search in --out "
                                                          "(finished trials are kept).")] = False,
) -> None:
    """Search training recipes on Ray Tune (ASHA stops bad trials); write the winner as a config overlay."""
    extra = [f"tune.trials={trials}"] if trials else []
    if space is not None:
        extra.append(f"tune.space={space.resolve()}")
    cfg, paths = setup(ctx, extra)
    from damage.tasks.core import tracking
    from damage.tasks.data.dataset import find_data_yaml
    from damage.tasks.scale.ray_runtime import connect
    from damage.tasks.scale.tune import (
        load_search,
        load_space,
        objective_mode,
        resolve_space,
        run_search,
        save_search,
    )

    out_dir = (out or paths.runs / "tune").resolve()
    c = tracking.client(cfg.mlflow.tracking_uri)
    if resume:
        rec = run_guarded(load_search, out_dir)
        parent, data_yaml = rec["parent_run_id"], Path(rec["data_yaml"])
        c.update_run(parent, status="RUNNING")
        dims = None
    else:
        data_yaml = run_guarded(find_data_yaml, data).resolve()
        dims = run_guarded(load_space, resolve_space(cfg.tune.space), cfg)
        parent, _ = open_top_level_run(cfg, "tune", params={
            "tune": cfg.tune.model_dump(), "data": str(data_yaml),
            "space": {d.key: {d.sampler: d.values} for d in dims}})
        save_search(out_dir, parent, data_yaml)
    name, _ = run_guarded(objective_mode, cfg.tune.objective)
    where = run_guarded(connect, cfg.ray, paths.root)
    console.print(f"Ray: {where}; objective {name}; search folder {out_dir}", highlight=False)
    ok = False
    try:
        res = run_guarded(run_search, cfg, data_yaml, out_dir, parent, c.tracking_uri, dims, resume)
        ok = True
    finally:
        tracking.end_run(c, parent, ok)
    from rich.table import Table

    t = Table(title=f"damage tune: {len(res.trials)} trials ({', '.join(f'{v} {k}' for k, v in res.counts.items())})")
    for col in ("trial", "state", name, "epochs", "params"):
        t.add_column(col)
    for r in res.trials:
        best = res.best is not None and r["trial_id"] == res.best["trial_id"]
        t.add_row(r["trial_id"], r["state"], "-" if r["objective"] is None else f"{r['objective']:.4f}",
                  str(r["epochs"] or "-"), " ".join(f"{k}={v}" for k, v in r["params"].items()),
                  style="bold green" if best else None)
    console.print(t)
    if res.winner_path is not None:
        console.print(f"winner: {res.best['trial_id']} -> {res.winner_path}\n"
                      f"  use it: damage run --config {res.winner_path}", highlight=False, soft_wrap=True)
    else:
        console.print("[red]no trial finished: no winner[/]")
    console.print(f"MLflow parent run: {parent} ({c.tracking_uri})", highlight=False, soft_wrap=True)
    if res.winner_path is None:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("tune")(tune_cmd)
