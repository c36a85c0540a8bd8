"""Prefect task wrappers around the registry functions (the plain functions stay Prefect-free).

Made by ``damage.tasks.core.prefect_tasks.as_task``; caching is off: every call reads or moves live registry state.
"""

from __future__ import annotations

from collections.abc import Sequence

from damage.model_registry.frozen import approve_frozen as approve
from damage.model_registry.gate import gate_candidate
from damage.model_registry.moves import reject
from damage.model_registry.registry import VersionInfo
from damage.tasks.core.prefect_tasks import as_task


def decide(client, name: str, version: str | int, approved: bool, by: str, reason: str, *,
           approvers: Sequence[str] | None = None, lock_timeout_s: float = 60.0) -> VersionInfo:
    """Apply a human decision: ``approve`` when ``approved`` else ``reject`` (same code as the CLI)."""
    if approved:
        return approve(client, name, version, by, reason, approvers=approvers, lock_timeout_s=lock_timeout_s)
    return reject(client, name, version, by, reason, approvers=approvers, lock_timeout_s=lock_timeout_s)


gate_task = as_task(gate_candidate, "registry-gate")
decide_task = as_task(decide, "registry-decide")


def recorded_decision(client, name: str, version: str | int, approvers: Sequence[str] | None = None) -> dict | None:
    """The decision recorded on a version by an approver's own login, or None while it is pending.

    An approval counts only with its record in ``<name>-approved`` (``damage.model_registry.frozen``: only
    approvers can write there) made by a configured approver's account: the pipeline account can
    write the version's own tags too.
    """
    from damage.model_registry.frozen import approved_name, record_for
    from damage.model_registry.registry import (
        T_APPROVED_BY,
        T_APPROVED_VIA,
        T_REASON,
        T_REJECTED_BY,
        get_client,
        list_versions,
    )

    info = {v.version: v for v in list_versions(get_client(client), name)}.get(str(version))
    if info is None or info.approval not in ("approved", "rejected"):
        return None
    via = info.tags.get(T_APPROVED_VIA)
    if info.approval == "approved":
        c = get_client(client)
        record = record_for(c, name, str(version))
        via = (c.get_model_version(approved_name(name), record).tags or {}).get(T_APPROVED_VIA) if record else None
        if record is None or (approvers and via not in approvers):
            return None
    by = info.tags.get(T_APPROVED_BY if info.approval == "approved" else T_REJECTED_BY)
    return {"decision": info.approval, "by": by, "reason": info.tags.get(T_REASON), "via": via}


decision_task = as_task(recorded_decision, "registry-decision")
