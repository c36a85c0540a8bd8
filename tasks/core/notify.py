"""Notifications through Apprise (shipped with Prefect): nightly failure, approval wait, promotion.

``notify.urls`` in the config lists Apprise URLs (``json://host/path``, ``slack://...``,
``mailto://...``); ``notify.events`` picks which events send. Sending is best effort: a failed or
slow send is logged as a warning and **never fails the pipeline** (``send`` does not raise).
The URLs are secrets (``SecretStr`` in the config): they are never logged.

Example:
    >>> send(cfg.notify, "failure", "damage nightly failed", "step train: ...")
    True
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from damage.tasks.core.config import NotifyConfig
from damage.tasks.core.display import fmt_metric

log = logging.getLogger(__name__)

EVENT_TYPES = {"failure": "failure", "approval": "info", "promotion": "success", "serving": "warning"}  # Apprise NotifyType values
_SHOWN_METRICS = ("box/mAP50", "box/mAP50-95", "mask/mAP50", "mask/mAP50-95", "latency_ms")


def send(cfg: NotifyConfig, event: str, title: str, body: str) -> bool:
    """Send ``title`` / ``body`` (markdown) to every URL of ``cfg`` if ``event`` is enabled.

    Returns:
        True when every URL accepted the message; False when none is configured, the event is
        off, or any send failed (logged, never raised).
    """
    if event not in EVENT_TYPES:
        raise ValueError(f"unknown notification event '{event}' (known: {', '.join(EVENT_TYPES)})")
    urls = [u.get_secret_value() for u in cfg.urls]
    if not urls or event not in cfg.events:
        return False
    try:
        import apprise

        box = apprise.Apprise()
        bad = sum(1 for u in urls if not box.add(u))
        if bad:
            log.warning("notify: %d of %d Apprise URL(s) not understood (URLs are not shown: secrets)", bad, len(urls))
        if not len(box):
            return False
        ok = bool(box.notify(body=body, title=title, notify_type=EVENT_TYPES[event],
                             body_format=apprise.NotifyFormat.MARKDOWN, timeout=cfg.timeout_s))
        if not ok:
            log.warning("notify: sending the %s message failed for at least one URL", event)
        return ok and not bad
    except Exception as e:  # a notification must never fail the run it reports on
        log.warning("notify: %s message not sent: %s: %s", event, type(e).__name__, e)
        return False


def _metrics_lines(metrics: Mapping[str, Any]) -> str:
    rows = [f"- {k}: {fmt_metric(float(metrics[k]), k)}" for k in _SHOWN_METRICS if metrics.get(k) is not None]
    return "\n".join(rows) or "- (no metrics)"


def failure_message(step: str | None, error: str, link: str | None) -> tuple[str, str]:
    """(title, body) of a failed nightly run."""
    body = f"**Step:** {step or 'unknown (outside the steps)'}\n\n**Error:** {error[:1500]}"
    if link:
        body += f"\n\n[MLflow run]({link})"
    return f"damage nightly FAILED at {step or 'unknown step'}", body


def approval_message(model: str, version: str | int, metrics: Mapping[str, Any], link: str | None,
                     reasons: list[str] | None = None) -> tuple[str, str]:
    """(title, body) of a version waiting for a human approval, with the command that approves it."""
    body = (f"'{model}' version {version} passed the automatic gate and is in **staging**.\n\n"
            f"{_metrics_lines(metrics)}\n\n")
    if reasons:
        body += "Gate: " + "; ".join(reasons) + "\n\n"
    body += (f"Approve: `damage registry approve {model} {version} --by YOU --reason \"...\"`\n"
             f"Reject: `damage registry reject {model} {version} --by YOU --reason \"...\"`")
    if link:
        body += f"\n\n[Model version]({link})"
    return f"damage: {model} v{version} waits for approval", body


def promotion_message(model: str, version: str | int, by: str, reason: str, link: str | None) -> tuple[str, str]:
    """(title, body) of a version moved to production."""
    body = f"'{model}' version {version} is now **production** (by {by}: {reason})."
    if link:
        body += f"\n\n[Model version]({link})"
    return f"damage: {model} v{version} promoted to production", body


def failed_step(tracking_uri: str | None, parent_run_id: str) -> str | None:
    """The step whose nested MLflow run FAILED under ``parent_run_id`` (None if none did)."""
    try:
        from damage.tasks.core import tracking

        c = tracking.client(tracking_uri)
        exp = c.get_run(parent_run_id).info.experiment_id
        runs = c.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' "
                                                   "and attributes.status = 'FAILED'")
        return runs[0].data.tags.get("damage.step") or runs[0].info.run_name if runs else None
    except Exception:
        return None
