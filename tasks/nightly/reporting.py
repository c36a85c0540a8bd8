"""What a nightly run tells people: links between its MLflow and Prefect runs, the run summary as
a Prefect markdown artifact, a skipped run shown as skipped, and notifications.

Plain functions of the pipeline's objects, wrapped as tasks by ``flows/nightly.py``. None of them
fails the pipeline on a UI or network problem (they log a warning instead).
"""

from __future__ import annotations

import logging
from typing import Any

from damage.tasks.core.config import Config
from damage.tasks.core.display import fmt_metric
from damage.tasks.nightly.pipeline import PipelineRun

log = logging.getLogger(__name__)

NOTE_TAG = "mlflow.note.content"  # the MLflow run description, rendered as markdown by the UI
STATUS_TAG = "damage.status"


def run_links(cfg: Config, run: PipelineRun) -> dict[str, str | None]:
    """``mlflow_run_url`` (model-training view) and ``prefect_flow_run_url`` (None outside Prefect)."""
    from damage.tasks.core import links
    from damage.tasks.core.prefect_ui import flow_run_id

    base = links.mlflow_base(cfg.mlflow.ui_url, run.tracking_uri)
    fid = flow_run_id()
    return {"mlflow_run_url": links.mlflow_run_url(run.experiment_id, run.run_id, base),
            "mlflow_experiment_url": links.mlflow_experiment_url(run.experiment_id, base),
            "prefect_flow_run_url": links.prefect_flow_run_url(fid) if fid else None,
            "prefect_flow_run_id": fid}


def link_runs(cfg: Config, run: PipelineRun) -> dict[str, str | None]:
    """Link the MLflow parent run and the Prefect flow run both ways, with clickable URLs.

    The MLflow run's description (markdown) links to the flow run and carries the URL tags; the
    flow run gets a link artifact to the MLflow run and an ``mlflow-run:<id>`` tag. Also starts
    forwarding the project's loggers to the flow run's logs.
    """
    from damage.tasks.core import tracking
    from damage.tasks.core.prefect_ui import forward_project_logs, link_flow_run

    forward_project_logs()
    urls = run_links(cfg, run)
    c = tracking.client(run.tracking_uri)
    tags = {"mlflow_run_url": urls["mlflow_run_url"]}
    note = f"Nightly pipeline run. [MLflow run]({urls['mlflow_run_url']})"
    if urls["prefect_flow_run_url"]:
        tags["prefect.flow_run_url"] = urls["prefect_flow_run_url"]
        note += f" · [Prefect flow run]({urls['prefect_flow_run_url']})"
    tags[NOTE_TAG] = note
    name = None
    try:
        name = c.get_run(run.run_id).info.run_name
        if urls["prefect_flow_run_url"] and name:
            tags["prefect.flow_run_name"] = name  # the flow run is renamed after this run, below
        tracking.set_tags(c, run.run_id, tags)
    except Exception as e:
        log.warning("MLflow run %s: links not set: %s", run.run_id, e)
    link_flow_run(urls["mlflow_run_url"], run.run_id, name)
    log.info("MLflow run %s: %s", run.run_id, urls["mlflow_run_url"])
    return urls


# What each nested step run holds that people look for from the parent run (its description lists them).
STEP_REPORTS = {"validate": "data-gate report (HTML, report.json, profile)", "train": "training curves, weights",
                "evaluate": "per-class metrics, PR curves, confusion matrix (trained .pt)",
                "label-issues": "suspected label errors", "sweep": "operating-point sweep (heatmap, PR)",
                "export": "ONNX export and parity", "explain": "explanation overlays and their fidelity",
                "compress": "compression variants (table, Pareto plot)", "promotion-gate": "promotion-gate decision"}


def link_step_reports(cfg: Config, run: PipelineRun) -> str:
    """Add links to the nested step runs' reports to the parent run's description (the run people open
    first; its runs list opens collapsed). Returns the description."""
    from damage.tasks.core import links, tracking

    c = tracking.client(run.tracking_uri)
    base = links.mlflow_base(cfg.mlflow.ui_url, run.tracking_uri)
    children = c.search_runs([run.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.run_id}'",
                             order_by=["attributes.start_time ASC"])
    lines = []
    for child in children:
        step = child.data.tags.get("damage.step", "")
        if step in STEP_REPORTS:
            url = links.mlflow_run_url(run.experiment_id, child.info.run_id, base)
            lines.append(f"- [{step}]({url}): {STEP_REPORTS[step]}")
    note = c.get_run(run.run_id).data.tags.get(NOTE_TAG, "")
    if lines and "### Step reports" not in note:
        note = note + "\n\n### Step reports\n\n" + "\n".join(lines)
        tracking.set_tags(c, run.run_id, {NOTE_TAG: note})
    return note


def mark_skipped(run: PipelineRun, reason: str) -> None:
    """Show a skipped nightly as skipped in MLflow: run name ``...-skipped``, ``damage.status=skipped``
    and the reason as the run description. (The flow itself ends in a ``Completed`` state named
    ``Skipped``, so Prefect shows it too.)"""
    from damage.tasks.core import tracking

    c = tracking.client(run.tracking_uri)
    name = c.get_run(run.run_id).info.run_name or "nightly"
    if not name.endswith("-skipped"):
        c.update_run(run.run_id, name=f"{name}-skipped")
    tracking.set_tags(c, run.run_id, {STATUS_TAG: "skipped", NOTE_TAG: f"**Skipped:** {reason}"})


def summary_markdown(summary: dict[str, Any], links: dict[str, str | None] | None = None) -> str:
    """The nightly summary as markdown: figures, per-class AP, gate decision, links."""
    links = links or {}
    m = summary.get("metrics") or {}
    out = ["# Nightly run", "", "| | |", "|---|---|"]
    art = summary.get("registered_artifact") or {}
    if art:  # which artifact every figure below belongs to
        out.append(f"| registered artifact | {art.get('precision')} ({art.get('kind')}) |")
    for k in ("box/mAP50", "box/mAP50-95", "mask/mAP50", "mask/mAP50-95"):
        out.append(f"| {k} | {fmt_metric(m.get(k), k)} |")
    dmg = summary.get("damage_pct_mae") or {}
    if dmg:
        out.append(f"| damage_pct_mae (points per vehicle) | {fmt_metric(dmg.get('mae'))} |")
    out.append(f"| latency_ms (pre+inference+post per image) | {fmt_metric(m.get('latency_ms'), 'latency_ms')} |")
    op = summary.get("operating_point") or {}
    if op:
        out.append(f"| operating point | conf {op.get('conf')}, iou {op.get('iou')} ({op.get('objective')}) |")
    out.append(f"| epochs / imgsz | {summary.get('epochs_run')} / {summary.get('imgsz')} |")
    out.append(f"| dataset | `{summary.get('dataset_fingerprint')}` |")
    per_class = summary.get("per_class") or []
    if per_class:
        keys = ("box/AP50", "box/AP50-95", "mask/AP50", "mask/AP50-95")
        out += ["", "## Per class", "", "| class | instances | " + " | ".join(keys) + " |",
                "|---|---|" + "---|" * len(keys)]
        for r in per_class:
            out.append(f"| {r.get('class')} | {r.get('instances')} | " + " | ".join(fmt_metric(r.get(k), k) for k in keys) + " |")
    promo = summary.get("promotion") or {}
    out += ["", "## Promotion gate", ""]
    if promo:
        out.append(f"**{'passed: staging' if promo.get('passed') else 'failed: stays pending'}** — "
                   + "; ".join(promo.get("reasons") or []))
    name, ver = summary.get("registered_model"), summary.get("registered_version")
    out += ["", "## Links", ""]
    if links.get("mlflow_run_url"):
        out.append(f"- [MLflow run {summary.get('mlflow_run_id')}]({links['mlflow_run_url']})")
    if name and ver:
        from damage.tasks.core.links import mlflow_version_url

        base = (links.get("mlflow_run_url") or "").split("/#/")[0] or None
        out.append(f"- [{name} version {ver}]({mlflow_version_url(name, ver, base)})")
        out.append(f"- approve: `damage registry approve {name} {ver} --by YOU --reason \"...\"`")
    return "\n".join(out) + "\n"


def publish_summary(summary: dict[str, Any], links: dict[str, str | None] | None = None) -> str:
    """Markdown artifact ``nightly-summary`` on the flow run; returns the markdown."""
    from damage.tasks.core.prefect_ui import publish_markdown

    md = summary_markdown(summary, links)
    publish_markdown(md, key="nightly-summary", description="Nightly run: figures, per-class AP, gate, links")
    return md


def notify_failure(cfg: Config, run: PipelineRun, error: str) -> bool:
    """Tell ``notify.urls`` that the nightly failed: the step (its FAILED MLflow run), the error, a link."""
    from damage.tasks.core.notify import failed_step, failure_message, send

    if not cfg.notify.urls:
        return False
    title, body = failure_message(failed_step(run.tracking_uri, run.run_id), error,
                                  run_links(cfg, run)["mlflow_run_url"])
    return send(cfg.notify, "failure", title, body)


def notify_approval(cfg: Config, run: PipelineRun, version, metrics: dict[str, Any], decision) -> bool:
    """Tell ``notify.urls`` that a version passed the gate and waits for a human (only on a pass)."""
    from damage.tasks.core.links import mlflow_base, mlflow_version_url
    from damage.tasks.core.notify import approval_message, send

    if not cfg.notify.urls or not getattr(decision, "passed", False):
        return False
    link = mlflow_version_url(version.name, version.version, mlflow_base(cfg.mlflow.ui_url, run.tracking_uri))
    title, body = approval_message(version.name, version.version, metrics, link, list(decision.reasons))
    return send(cfg.notify, "approval", title, body)


def notify_promotion(cfg: Config, name: str, version: str | int, by: str, reason: str,
                     tracking_uri: str | None = None) -> bool:
    """Tell ``notify.urls`` that ``version`` of ``name`` is now production."""
    from damage.tasks.core.links import mlflow_base, mlflow_version_url
    from damage.tasks.core.notify import promotion_message, send

    if not cfg.notify.urls:
        return False
    link = mlflow_version_url(name, version, mlflow_base(cfg.mlflow.ui_url, tracking_uri))
    return send(cfg.notify, "promotion", *promotion_message(name, version, by, reason, link))
