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

from damage.flows.common import console, run_guarded, setup
from damage.flows.tables import JsonOpt_help
from damage.tasks.core.display import fmt_metric

JsonOpt = Annotated[bool, typer.Option("--json", help=JsonOpt_help)]

registry_app = typer.Typer(help="Model registry: versions, approval of the staged version, rollback, history.",
                           no_args_is_help=True)

NameArg = Annotated[str | None, typer.Argument(help="Registered model name (default: registry.model_name).")]
UriOpt = Annotated[str | None, typer.Option("--tracking-uri", help="MLflow tracking URI (default: config / $MLFLOW_TRACKING_URI).")]


def _ctx(ctx, name, tracking_uri):
    cfg, _ = setup(ctx)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return cfg, (name or cfg.registry.model_name), uri


def _fmt_metric(v: float | None) -> str:
    return fmt_metric(v, missing="-")


@registry_app.command("list")
def list_(ctx: typer.Context, name: NameArg = None, tracking_uri: UriOpt = None, as_json: JsonOpt = False) -> None:
    """Show every version with its aliases, gate result, approval state and key metrics."""
    from damage.flows.tables import Col, json_output, print_table

    with json_output(as_json) as out:
        _, name, uri = _ctx(ctx, name, tracking_uri)
        from damage.model_registry import list_versions

        versions = run_guarded(list_versions, uri, name)
        out.append([{"name": name, "version": v.version, "aliases": list(v.aliases), "gate": v.validation_status,
                     "approval": v.approval, "rolled_back": "rolled_back_at" in v.tags,
                     "by": v.tags.get("approved_by") or v.tags.get("rejected_by"), "metrics": v.metrics,
                     "parent": v.tags.get("lineage.parent_version"),
                     "created": v.created_at, "run_id": v.run_id, "tags": v.tags} for v in versions])
    if as_json:
        return
    rows = []
    for v in versions:
        m = v.metrics
        rows.append({"version": v.version, "aliases": ",".join(v.aliases) or "-", "gate": v.validation_status,
                     "approval": v.approval + (" (rolled back)" if "rolled_back_at" in v.tags else ""),
                     "by": v.tags.get("approved_by") or v.tags.get("rejected_by") or "",
                     "mask": _fmt_metric(m.get("mask/mAP50-95")), "box": _fmt_metric(m.get("box/mAP50-95")),
                     "parent": v.tags.get("lineage.parent_version", "-"),
                     "created": v.created_at[:16].replace("T", " "), "run": (v.run_id or "")[:8]})
    # Priority 1 columns are always shown in full; higher numbers are dropped first on a narrow terminal.
    cols = [Col("version", "ver", 1, "right"), Col("aliases", "aliases", 1), Col("gate", "gate", 1),
            Col("approval", "approval", 1), Col("mask", "mask mAP", 2, "right"), Col("box", "box mAP", 3, "right"),
            Col("by", "by", 4), Col("parent", "parent", 4), Col("created", "created", 5), Col("run", "run", 6)]
    print_table(console, f"{name} @ {uri}", cols, rows)
    console.print(f"{len(versions)} version(s) of '{name}'  (mAP = mAP50-95)", highlight=False)


ModelArg = Annotated[str, typer.Argument(help="Registered model name.")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why (recorded).")]


def _approvers(ctx) -> list[str]:
    """``registry.approvers`` of the config file, never of the caller's ``--set`` (refused, naming the key)."""
    from damage.flows.common import fail, shared
    from damage.tasks.core.config_load import CONFIG_ENV, load_config, parse_override

    for item in shared(ctx).sets:
        if parse_override(item)[0] in ("registry", "registry.approvers"):
            fail("--set registry.approvers is not allowed: the approver list comes from the config file of the "
                 "worker/server (and the MLflow server's permissions on the approval records), not the caller")
    return load_config(shared(ctx).config or os.environ.get(CONFIG_ENV) or None).registry.approvers


def _decide(ctx, decision, name: str, version: str, by: str, reason: str, tracking_uri: str | None):
    """Run ``approve_frozen`` or ``reject`` with the config file's approvers and lock timeout."""
    approvers = _approvers(ctx)
    cfg, name, uri = _ctx(ctx, name, tracking_uri)
    v = run_guarded(decision, uri, name, version, by, reason, approvers=approvers,
                    lock_timeout_s=cfg.registry.lock_timeout_s)
    return cfg, name, uri, v


@registry_app.command("approve")
def approve_(
    ctx: typer.Context,
    name: ModelArg,
    version: Annotated[str, typer.Argument(help="Version at 'staging' that passed the gate.")],
    by: Annotated[str, typer.Option("--by", help="Who approves (recorded).")],
    reason: ReasonOpt,
    tracking_uri: UriOpt = None,
) -> None:
    """Move 'production' to the staged version (only a staged, gate-passed version); its files are frozen
    and hashed into the approval record ('<name>-approved'), which serving verifies. The evidence (offline
    metrics, then the shadow report on production traffic) is printed first."""
    from damage.model_registry.frozen import approve_frozen
    from damage.model_registry.serving import evidence_lines

    cfg, name, uri = _ctx(ctx, name, tracking_uri)
    console.print(f"evidence for '{name}' version {version}:\n  " + "\n  ".join(evidence_lines(name, version, uri)),
                  highlight=False, soft_wrap=True)
    cfg, name, uri, v = _decide(ctx, approve_frozen, name, version, by, reason, tracking_uri)
    console.print(f"approved '{name}' version {v.version}: now 'production' (by {by}: {reason}) at {uri}",
                  highlight=False, soft_wrap=True)
    from damage.tasks.nightly.reporting import notify_promotion

    notify_promotion(cfg, name, v.version, by, reason, uri)  # best effort: never fails the approval


@registry_app.command("reject")
def reject_(
    ctx: typer.Context,
    name: ModelArg,
    version: Annotated[str, typer.Argument(help="Version to reject (never approvable afterwards).")],
    by: Annotated[str, typer.Option("--by", help="Who rejects (recorded).")],
    reason: ReasonOpt,
    tracking_uri: UriOpt = None,
) -> None:
    """Mark a version rejected and take it off 'staging'."""
    from damage.model_registry import reject

    _, name, uri, v = _decide(ctx, reject, name, version, by, reason, tracking_uri)
    console.print(f"rejected '{name}' version {v.version} (by {by}: {reason}) at {uri}", highlight=False,
                  soft_wrap=True)


@registry_app.command("rollback")
def rollback_(
    ctx: typer.Context,
    name: NameArg = None,
    by: Annotated[str | None, typer.Option("--by", help="Who rolls back (default: MLflow user or OS user).")] = None,
    reason: ReasonOpt = "rollback",
    to: Annotated[str | None, typer.Option("--to", help="Explicit earlier approved version.")] = None,
    tracking_uri: UriOpt = None,
) -> None:
    """Move 'production' back to the previously approved version."""
    approvers = _approvers(ctx)
    cfg, name, uri = _ctx(ctx, name, tracking_uri)
    from damage.model_registry import current_identity
    from damage.model_registry.frozen import rollback_frozen

    who = by or current_identity() or getpass.getuser()
    move = run_guarded(rollback_frozen, uri, name, who, reason, to=to, approvers=approvers,
                       lock_timeout_s=cfg.registry.lock_timeout_s)
    console.print(f"rolled back '{name}': production {move.version_from} -> {move.version_to} "
                  f"(by {who}: {reason}) at {uri}", highlight=False, soft_wrap=True)


@registry_app.command("history")
def history_(ctx: typer.Context, name: NameArg = None, tracking_uri: UriOpt = None, as_json: JsonOpt = False) -> None:
    """Print every alias move: when, which alias, from -> to, who and why."""
    from dataclasses import asdict

    from damage.flows.tables import Col, clip_clauses, json_output, print_table

    with json_output(as_json) as out:
        _, name, uri = _ctx(ctx, name, tracking_uri)
        from damage.model_registry import history

        moves = run_guarded(history, uri, name)
        out.append([asdict(m) for m in moves])
    if as_json:
        return
    rows, last = [], None
    for m in moves:
        # one approval moves two aliases with one reason: print it once; long gate reasons are clipped at a
        # clause (whole words; --json has every clause), so one approval fits a 40-line screen
        same = last is not None and (m.at[:16], m.action, m.by, m.reason) == (last.at[:16], last.action, last.by,
                                                                               last.reason)
        rows.append({"seq": str(m.seq), "at": m.at[:16].replace("T", " "), "alias": m.alias,
                     "from": m.version_from or "-", "to": m.version_to or "-", "action": m.action, "by": m.by,
                     "identity": m.identity or "-", "reason": "(as above)" if same else clip_clauses(m.reason)})
        last = m
    # reason gets at least 30 characters: lower-priority columns drop first, and no word is broken
    cols = [Col("seq", "#", 2, "right"), Col("at", "when (UTC)", 3), Col("alias", "alias", 1),
            Col("from", "from", 1, "right"), Col("to", "to", 1, "right"), Col("action", "action", 1),
            Col("by", "by", 2), Col("identity", "MLflow user", 4), Col("reason", "reason", 1, wrap=True, min_width=30)]
    print_table(console, f"alias history of {name} @ {uri}", cols, rows)
    console.print(f"{len(moves)} move(s)", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the ``registry`` command group to the ``damage`` CLI."""
    app.add_typer(registry_app, name="registry")
