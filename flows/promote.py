"""Promotion flow: automatic gate, then a wait for a human decision made with the human's own login.

The flow runs the gate for one registered version with the **worker's** config: the tracking URI,
the evaluator (``Evaluator.from_config`` on the worker's dataset) and the gate rule never come from
run parameters (``damage.tasks.core.run_params``). When the gate passes, the run pauses with a form that
carries no decision and no credentials: it shows the command an approver runs with their own MLflow
account (``damage registry approve NAME VERSION --by ME --reason ...``). Resuming it only asks the
flow to look at the registry: it reports the recorded decision (approved by whom, through which
MLflow account), or pauses again while the version is still pending. The worker never approves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput

from damage.model_registry.tasks import decision_task, gate_task
from damage.tasks.core.config import ConfigError, RegistryConfig
from damage.tasks.core.prefect_tasks import as_task as _t


class ApprovalCheck(RunInput):
    """Resume after approving or rejecting with your own MLflow login; nothing here is a decision."""

    checked: bool = True


def approval_command(model_name: str, version: str) -> str:
    """The command an approver runs with their own MLflow account."""
    return (f"MLFLOW_TRACKING_USERNAME=<you> MLFLOW_TRACKING_PASSWORD=... damage registry approve {model_name} "
            f"{version} --by <you> --reason '...'   (or: damage registry reject ...)")


@flow(name="promote", log_prints=True)
def promote(model_name: str, version: str, evaluate_fn: Callable[[Path], dict[str, float]] | None = None,
            wait_for_approval: bool = True) -> dict[str, Any]:
    """Gate ``version`` against production with the worker's evaluator; if it passes, wait for a human decision.

    Args:
        model_name: registered model; must be the worker's ``registry.model_name``.
        version: candidate version.
        evaluate_fn: ``onnx_path -> metrics`` for in-process callers (tests); a deployment run cannot
            pass a callable, and the worker's evaluator is used.
        wait_for_approval: wait for a human decision after a pass.

    Returns:
        ``{"gate": GateDecision dict, "decision": "approved"|"rejected"|None, "by", "reason"}``.
    """
    from damage.model_registry.steps import gate_evaluate_fn
    from damage.tasks.nightly.pipeline import prepare_dataset, prepare_state

    cfg, paths = _t(prepare_state, "prepare-state")(None, None)  # the worker's config, nothing from the run
    if model_name != cfg.registry.model_name:
        raise ConfigError(f"run parameter model_name '{model_name}' is not this worker's registry.model_name "
                          f"'{cfg.registry.model_name}'")
    from damage.tasks.core import tracking

    tracking_uri = tracking.client(cfg.mlflow.tracking_uri).tracking_uri
    if evaluate_fn is None:
        evaluate_fn = gate_evaluate_fn(cfg, _t(prepare_dataset, "prepare-dataset", retries=3)(cfg, paths))
    decision = gate_task(tracking_uri, model_name, version, evaluate_fn, cfg.registry)
    result: dict[str, Any] = {"gate": decision.to_dict(), "decision": None, "by": None, "reason": None}
    if not (decision.passed and wait_for_approval):
        return result
    result.update(await_approval(model_name, version, tracking_uri, cfg.registry, decision.reasons))
    return result


def await_approval(model_name: str, version: str, tracking_uri: str, cfg: RegistryConfig,
                   reasons: list[str]) -> dict[str, Any]:
    """Pause until the version is approved or rejected in the registry by an approver's own login.

    Used by ``promote`` and by ``nightly`` when ``registry.wait_for_approval`` is on. Each resume
    re-reads the registry; a version still pending pauses again until ``approval_timeout_s``.
    """
    from damage.model_registry.serving import evidence_lines

    evidence = evidence_lines(model_name, version, tracking_uri)
    deadline = time.monotonic() + cfg.approval_timeout_s
    for attempt in range(10**6):
        found = decision_task(tracking_uri, model_name, version, cfg.approvers)
        if found is not None:
            return found
        left = int(deadline - time.monotonic())
        if left <= 0:
            break
        form = ApprovalCheck.with_initial_data(
            description=f"**{model_name} version {version}** passed the gate and is at `staging`.\n\n"
                        + "\n".join(f"- {r}" for r in reasons)
                        + "\n\n**Evidence** (offline metrics, then the shadow report on production traffic):\n\n"
                        + "\n".join(f"- {line}" for line in evidence)
                        + "\n\nDecide with **your own** MLflow account (this form approves nothing):\n\n"
                        + f"```\n{approval_command(model_name, version)}\n```\n\nThen resume this run.",
            checked=True)
        print(f"waiting for a decision on '{model_name}' version {version}: {approval_command(model_name, version)}")
        pause_flow_run(wait_for_input=form, timeout=left, poll_interval=cfg.approval_poll_s,
                       key=f"approve-{model_name}-{version}-{attempt}")
    return {"decision": None, "by": None, "reason": "no decision before registry.approval_timeout_s"}
