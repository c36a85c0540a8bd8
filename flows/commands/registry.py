"""``damage registry ...``: list versions, approve/reject the staged version, roll back, show history.

Approve and reject call the same ``model_registry`` functions as the paused promotion flow.
The MLflow account used is the one in ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``
(basic auth); ``registry.approvers`` lists the accounts allowed to move ``production``.
"""

from __future__ import annotations

import getpass
import os
from typing import Annotated

import typer

from flows.common import console, run_guarded, setup

registry_app = typer.Typer(help="Model registry: versions, approval of the staged version, rollback, history.",
                           no_args_is_help=True)

NameArg = Annotated[str | None, typer.Argument(help="Registered model name (default: registry.model_name).")]
UriOpt = Annotated[str | None, typer.Option("--tracking-uri", help="MLflow tracking URI (default: config / $MLFLOW_TRACKING_URI).")]


def _ctx(ctx, name, tracking_uri):
    cfg, _ = setup(ctx)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return cfg, (name or cfg.registry.model_name), uri


def _fmt_metric(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _print_table(title: str, columns: tuple[str, ...], rows, **column_style) -> None:
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, **column_style)
    for row in rows:
        table.add_row(*row)
    console.print(table)


@registry_app.command("list")
def list_(ctx: typer.Context, name: NameArg = None, tracking_uri: UriOpt = None) -> None:
    """Show every version with its aliases, gate result, approval state and key metrics."""
    _, name, uri = _ctx(ctx, name, tracking_uri)
    from model_registry import list_versions

    versions = run_guarded(list_versions, uri, name)
    _print_table(f"{name} @ {uri}",
                 ("version", "aliases", "gate", "approval", "by", "mask mAP50-95", "box mAP50-95", "created", "run"),
                 ((v.version, ",".join(v.aliases), v.validation_status,
                   v.approval + (" (rolled back)" if "rolled_back_at" in v.tags else ""),
                   v.tags.get("approved_by") or v.tags.get("rejected_by") or "",
                   _fmt_metric(v.metrics.get("mask/mAP50-95")), _fmt_metric(v.metrics.get("box/mAP50-95")),
                   v.created_at, (v.run_id or "")[:12]) for v in versions))
    console.print(f"{len(versions)} version(s) of '{name}'", highlight=False)


@registry_app.command("approve")
def approve_(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Version at 'staging' that passed the gate.")],
    by: Annotated[str, typer.Option("--by", help="Who approves (recorded).")],
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded).")],
    tracking_uri: UriOpt = None,
) -> None:
    """Move 'production' to the staged version (only a staged, gate-passed version)."""
    cfg, name, uri = _ctx(ctx, name, tracking_uri)
    from model_registry import approve

    v = run_guarded(approve, uri, name, version, by, reason, approvers=cfg.registry.approvers,
                    lock_timeout_s=cfg.registry.lock_timeout_s)
    console.print(f"approved '{name}' version {v.version}: now 'production' (by {by}: {reason}) at {uri}",
                  highlight=False, soft_wrap=True)


@registry_app.command("reject")
def reject_(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Version to reject (never approvable afterwards).")],
    by: Annotated[str, typer.Option("--by", help="Who rejects (recorded).")],
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded).")],
    tracking_uri: UriOpt = None,
) -> None:
    """Mark a version rejected and take it off 'staging'."""
    cfg, name, uri = _ctx(ctx, name, tracking_uri)
    from model_registry import reject

    v = run_guarded(reject, uri, name, version, by, reason, lock_timeout_s=cfg.registry.lock_timeout_s)
    console.print(f"rejected '{name}' version {v.version} (by {by}: {reason}) at {uri}", highlight=False,
                  soft_wrap=True)


@registry_app.command("rollback")
def rollback_(
    ctx: typer.Context,
    name: NameArg = None,
    by: Annotated[str | None, typer.Option("--by", help="Who rolls back (default: MLflow user or OS user).")] = None,
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded).")] = "rollback",
    to: Annotated[str | None, typer.Option("--to", help="Explicit earlier approved version.")] = None,
    tracking_uri: UriOpt = None,
) -> None:
    """Move 'production' back to the previously approved version."""
    cfg, name, uri = _ctx(ctx, name, tracking_uri)
    from model_registry import current_identity, rollback

    who = by or current_identity() or getpass.getuser()
    move = run_guarded(rollback, uri, name, who, reason, to=to, approvers=cfg.registry.approvers,
                       lock_timeout_s=cfg.registry.lock_timeout_s)
    console.print(f"rolled back '{name}': production {move.version_from} -> {move.version_to} "
                  f"(by {who}: {reason}) at {uri}", highlight=False, soft_wrap=True)


@registry_app.command("history")
def history_(ctx: typer.Context, name: NameArg = None, tracking_uri: UriOpt = None) -> None:
    """Print every alias move: when, which alias, from -> to, who and why."""
    _, name, uri = _ctx(ctx, name, tracking_uri)
    from model_registry import history

    moves = run_guarded(history, uri, name)
    _print_table(f"alias history of {name} @ {uri}",
                 ("#", "when (UTC)", "alias", "from", "to", "action", "by", "MLflow user", "reason"),
                 ((str(m.seq), m.at[:19].replace("T", " "), m.alias, m.version_from or "-", m.version_to or "-",
                   m.action, m.by, m.identity or "-", m.reason) for m in moves), overflow="fold")
    console.print(f"{len(moves)} move(s)", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the ``registry`` command group to the ``damage`` CLI."""
    app.add_typer(registry_app, name="registry")
