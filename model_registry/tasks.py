"""Prefect task wrappers around the registry functions (the plain functions stay Prefect-free).

Made by ``damage.tasks.core.prefect_tasks.as_task``; caching is off: every call reads or moves live registry state.
"""

from __future__ import annotations

from collections.abc import Sequence

from damage.model_registry.gate import gate_candidate
from damage.model_registry.registry import VersionInfo, approve, reject
from damage.tasks.core.prefect_tasks import as_task


def decide(client, name: str, version: str | int, approved: bool, by: str, reason: str, *,
           approvers: Sequence[str] | None = None, lock_timeout_s: float = 60.0) -> VersionInfo:
    """Apply a human decision: ``approve`` when ``approved`` else ``reject`` (same code as the CLI)."""
    if approved:
        return approve(client, name, version, by, reason, approvers=approvers, lock_timeout_s=lock_timeout_s)
    return reject(client, name, version, by, reason, approvers=approvers, lock_timeout_s=lock_timeout_s)


gate_task = as_task(gate_candidate, "registry-gate")
decide_task = as_task(decide, "registry-decide")
