"""Promotion flow: automatic gate, then a pause for a human decision in the Prefect UI.

The flow runs the gate for one registered version; when it passes, the run pauses with an
``ApprovalInput`` form (approve yes/no, approver name, reason). Resuming it (UI, or
``resume_flow_run(flow_run_id, run_input={...})``) applies the decision through the same
``approve``/``reject`` functions as ``damage registry approve|reject``.

In a basic-auth deployment the process that resumes must run as an MLflow account listed in
``registry.approvers`` (see infra/mlflow-auth/README.md), because it is this process that
moves the ``production`` alias, and the form's ``approver`` must be that account's name.
The gate rule and the approver list come from the worker's config, never from run parameters.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput

from damage.model_registry.tasks import decide_task, gate_task
from damage.tasks.core.config import RegistryConfig, worker_registry_config


class ApprovalInput(RunInput):
    """What the approver fills in when resuming the paused promotion."""

    approve: bool
    approver: str
    reason: str


def resolve_evaluator(spec: str) -> Callable[[Path], dict[str, float]]:
    """``"package.module:function"`` -> the callable (for deployments, where callables can't be parameters)."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"evaluator '{spec}' must look like 'package.module:function'")
    return getattr(importlib.import_module(module), attr)


@flow(name="promote", log_prints=True)
def promote(model_name: str, version: str, tracking_uri: str,
            evaluate_fn: Callable[[Path], dict[str, float]] | None = None, evaluator: str | None = None,
            wait_for_approval: bool = True) -> dict[str, Any]:
    """Gate ``version`` against production; if it passes, pause for approval and apply the answer.

    The gate thresholds and the approver list are the worker's own (``worker_registry_config``:
    pinned by the serving process, else ``$DAMAGE_CONFIG``, else ``configs/default.yaml``); a run
    parameter cannot change them, so a failed candidate cannot be re-gated with a looser rule.

    Args:
        model_name: registered model.
        version: candidate version.
        tracking_uri: MLflow tracking/registry URI.
        evaluate_fn: ``onnx_path -> metrics`` evaluator (in-process callers).
        evaluator: ``"module:function"`` evaluator (deployments); used when ``evaluate_fn`` is None.
        wait_for_approval: pause for a human decision after a pass.

    Returns:
        ``{"gate": GateDecision dict, "decision": "approved"|"rejected"|None, "by", "reason"}``.
    """
    cfg = worker_registry_config()
    fn = evaluate_fn or resolve_evaluator(evaluator or "")
    decision = gate_task(tracking_uri, model_name, version, fn, cfg)
    result: dict[str, Any] = {"gate": decision.to_dict(), "decision": None, "by": None, "reason": None}
    if not (decision.passed and wait_for_approval):
        return result
    result.update(await_approval(model_name, version, tracking_uri, cfg, decision.reasons))
    return result


def await_approval(model_name: str, version: str, tracking_uri: str, cfg: RegistryConfig,
                   reasons: list[str]) -> dict[str, Any]:
    """Pause the current flow run for a human decision and apply it (approve or reject).

    Used by ``promote`` and by ``nightly`` when ``registry.wait_for_approval`` is on.
    """
    from damage.model_registry.serving import evidence_lines

    evidence = evidence_lines(model_name, version, tracking_uri)
    form = ApprovalInput.with_initial_data(
        description=f"**{model_name} version {version}** passed the gate and is at `staging`.\n\n"
                    + "\n".join(f"- {r}" for r in reasons)
                    + "\n\n**Evidence** (offline metrics, then the shadow report on production traffic):\n\n"
                    + "\n".join(f"- {line}" for line in evidence)
                    + "\n\nApprove to move `production` to it, or reject it.",
        approve=False, approver="", reason="")
    answer = pause_flow_run(wait_for_input=form, timeout=cfg.approval_timeout_s, poll_interval=cfg.approval_poll_s,
                            key=f"approve-{model_name}-{version}")
    info = decide_task(tracking_uri, model_name, version, answer.approve, answer.approver.strip(), answer.reason,
                       approvers=cfg.approvers, lock_timeout_s=cfg.lock_timeout_s)
    return {"decision": info.approval, "by": answer.approver, "reason": answer.reason}
