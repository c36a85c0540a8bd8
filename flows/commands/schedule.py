"""``damage schedule``: serve the nightly, promote and compress deployments (or register them with a pool)."""

from __future__ import annotations

from typing import Annotated

import typer

from damage.flows.common import console, fail, run_guarded, setup, shared


def schedule(
    ctx: typer.Context,
    dataset: Annotated[str | None, typer.Option(help="Default dataset URI of nightly runs (default: data.source).")]
    = None,
    model_size: Annotated[str | None, typer.Option(help="Default model size n|s|m|l|x or .pt (default: train.model).")]
    = None,
    work_pool: Annotated[str | None, typer.Option(
        help="Register the deployments with this work pool and exit (run them with `prefect worker start "
             "--pool NAME`); default: serve them from this process.")] = None,
    limit: Annotated[int | None, typer.Option(help="Max concurrent runs served by this process.")] = None,
) -> None:
    """Serve the nightly retraining deployment on its cron schedule (plus promote/compress on demand)."""
    import os

    cfg, _ = setup(ctx)
    if not os.environ.get("PREFECT_API_URL"):
        console.print("[yellow]PREFECT_API_URL is not set: using the local Prefect server of the state dir "
                      "(start `prefect server start` for the UI; runs stop when this process stops).[/]")
    from damage.flows.deploy import build_deployments, register_with_pool, serve_all
    from damage.tasks.core.config_load import CONFIG_ENV
    from damage.tasks.core.run_params import split_worker_sets

    opts = shared(ctx)
    # --set stays in this process (pinned by setup; served runs inherit it), never in the deployment's
    # stored parameters (they are readable by anyone with the Prefect API: a URI password, Apprise tokens)
    run_sets, worker_only = split_worker_sets(opts.sets) if work_pool else ([], [])
    if worker_only:
        console.print(f"[yellow]--set {', '.join(s.split('=', 1)[0] for s in worker_only)} applies to runs served "
                      f"by this process only; pool workers read their config from ${CONFIG_ENV} "
                      f"(default configs/default.yaml).[/]")
    deployments = run_guarded(build_deployments, cfg, opts.config, overrides=run_sets,
                              dataset=dataset,
                              model_size=model_size, work_pool=work_pool)
    for d in deployments:
        sched = ", ".join(f"{s.schedule.cron} {s.schedule.timezone}" for s in (d.schedules or [])
                          if hasattr(s.schedule, "cron")) or "on demand"
        console.print(f"deployment [bold]{d.flow_name}/{d.name}[/]: {sched}")
    if work_pool:
        try:
            ids = register_with_pool(deployments, work_pool)
        except ValueError as e:  # e.g. work pool missing
            fail(f"{e} (create it: prefect work-pool create {work_pool} --type process)")
        console.print(f"registered {len(ids)} deployments with work pool '{work_pool}'. "
                      f"Start a worker: prefect worker start --pool {work_pool}")
        return
    serve_all(deployments, limit=limit)


def register(app: typer.Typer) -> None:
    app.command("schedule")(schedule)
