"""The moves of the ``staging`` and ``production`` aliases: stage (the gate), approve, reject, roll back.

Each move checks who may make it (``check_approver``), happens under the registry lock, writes its tags before
it moves the alias, and appends to the alias history (``registry.append_history``). Serving and the nightly read
production through ``model_registry.frozen``, which wraps ``approve``/``rollback`` with the approval record.
"""

from __future__ import annotations

from collections.abc import Sequence

from mlflow.tracking import MlflowClient

from damage.model_registry.errors import PromotionRefused, RegistryError
from damage.model_registry.lock import registry_lock
from damage.model_registry.registry import (
    PRODUCTION,
    REASON_MAX,
    STAGING,
    T_APPROVAL,
    T_APPROVAL_SEQ,
    T_APPROVED_AT,
    T_APPROVED_BY,
    T_APPROVED_VIA,
    T_REASON,
    T_REJECTED_AT,
    T_REJECTED_BY,
    T_ROLLED_BACK_AT,
    T_ROLLED_BACK_BY,
    AliasMove,
    VersionInfo,
    alias_version,
    append_history,
    check_approver,
    get_client,
    history_tags,
    list_versions,
    mlflow_errors,
    move_alias,
    now_iso,
    set_version_tags,
    version_info,
)


def _need(value: str, what: str) -> str:
    if not value or not value.strip():
        raise RegistryError(f"{what} is required")
    return value.strip()


def set_staging(client: MlflowClient, name: str, version: str | int, by: str, reason: str,
                *, lock_timeout_s: float = 60.0) -> AliasMove:
    """Move ``staging`` to a version that passed the gate (used by ``gate_candidate``)."""
    version = str(version)
    with registry_lock(client, name, holder=by, timeout_s=lock_timeout_s):
        info = version_info(client, name, version)
        if info.validation_status != "passed":
            raise PromotionRefused(f"'{name}' version {version} did not pass the gate "
                                   f"(validation_status={info.validation_status}); it cannot go to {STAGING}")
        if info.approval == "rejected":
            raise PromotionRefused(f"'{name}' version {version} was rejected; it cannot go to {STAGING}")
        before = move_alias(client, name, STAGING, version, f"set alias '{STAGING}' of '{name}'")
        return append_history(client, name, [dict(alias=STAGING, version_from=before, version_to=version,
                                                   action="gate", by=by, reason=reason)])[0]


def approve(client: MlflowClient | str, name: str, version: str | int, by: str, reason: str, *,
            approvers: Sequence[str] | None = None, lock_timeout_s: float = 60.0) -> VersionInfo:
    """Move ``production`` to ``version``: the only way a version reaches production here.

    The version must currently hold ``staging`` and carry ``validation_status=passed``; it must
    not have been rejected. ``staging`` is cleared (the version left staging for production).
    Checks and moves run under the registry lock, so two racing approvals serialise and the
    second sees the first one's result.

    Args:
        client: client or tracking URI.
        name: registered model name.
        version: version number.
        by: the human approving (recorded in ``approved_by`` and the history).
        reason: why (recorded in ``reason`` and the history).
        approvers: MLflow accounts allowed to move production (``registry.approvers``).
        lock_timeout_s: wait for the registry lock at most this long.

    Raises:
        PromotionRefused: not at staging, not gated, or rejected.
        AccessDenied: the MLflow user is not an approver, or the server refused the move.
    """
    c = get_client(client)
    by, reason, version = _need(by, "approver name (--by)"), _need(reason, "reason (--reason)"), str(version)
    identity = check_approver(name, approvers, f"approve version {version} of", c.tracking_uri, by)
    with registry_lock(c, name, holder=by, timeout_s=lock_timeout_s):
        info = version_info(c, name, version)
        if info.approval == "rejected":
            raise PromotionRefused(f"'{name}' version {version} was rejected by {info.tags.get(T_REJECTED_BY)} "
                                   f"and cannot be approved")
        if info.validation_status != "passed":
            raise PromotionRefused(f"'{name}' version {version} has not passed the gate "
                                   f"(validation_status={info.validation_status}) and cannot be approved")
        staged = alias_version(c, name, STAGING)
        if staged != version:
            where = f"version {staged}" if staged else "no version"
            raise PromotionRefused(f"'{name}' version {version} is not at '{STAGING}' ({STAGING} is {where}); "
                                   f"only the staged version can be approved")
        # Tags first, alias second: a crash in between leaves an approved version still at
        # staging (approve again to finish), never an unapproved version in production. The
        # history sequence number is reserved under the lock so the tag can carry it.
        seq = max(history_tags(c, name), default=0) + 1
        with mlflow_errors(c, f"tag '{name}' version {version} as approved"):
            set_version_tags(c, name, version, {T_APPROVAL: "approved", T_APPROVED_BY: by, T_APPROVED_AT: now_iso(),
                                         T_APPROVED_VIA: identity or "(local store, no account)",
                                         T_APPROVAL_SEQ: seq, T_REASON: reason[:REASON_MAX]})
        what = f"move alias '{PRODUCTION}' of '{name}'"
        before = move_alias(c, name, PRODUCTION, version, what)
        move_alias(c, name, STAGING, None, f"clear alias '{STAGING}' of '{name}'")
        append_history(c, name, [
            dict(alias=PRODUCTION, version_from=before, version_to=version, action="approve", by=by, reason=reason),
            dict(alias=STAGING, version_from=version, version_to=None, action="approve", by=by, reason=reason),
        ])
        return version_info(c, name, version)


def reject(client: MlflowClient | str, name: str, version: str | int, by: str, reason: str, *,
           approvers: Sequence[str] | None = None, lock_timeout_s: float = 60.0) -> VersionInfo:
    """Mark a version ``approval=rejected`` (it can never be approved) and take it off ``staging``.

    Raises:
        PromotionRefused: the version is in production (use ``rollback``) or already approved.
    """
    c = get_client(client)
    by, reason, version = _need(by, "name (--by)"), _need(reason, "reason (--reason)"), str(version)
    check_approver(name, approvers, f"reject version {version} of", c.tracking_uri, by)
    with registry_lock(c, name, holder=by, timeout_s=lock_timeout_s):
        info = version_info(c, name, version)
        if alias_version(c, name, PRODUCTION) == version:
            raise PromotionRefused(f"'{name}' version {version} is in production; use rollback instead of reject")
        if info.approval == "approved":
            raise PromotionRefused(f"'{name}' version {version} was already approved; it cannot be rejected")
        with mlflow_errors(c, f"tag '{name}' version {version}"):
            set_version_tags(c, name, version, {T_APPROVAL: "rejected", T_REJECTED_BY: by, T_REJECTED_AT: now_iso(),
                                         T_REASON: reason[:REASON_MAX]})
        if alias_version(c, name, STAGING) == version:
            move_alias(c, name, STAGING, None, f"clear alias '{STAGING}' of '{name}'")
            append_history(c, name, [dict(alias=STAGING, version_from=version, version_to=None,
                                           action="reject", by=by, reason=reason)])
        return version_info(c, name, version)


def rollback(client: MlflowClient | str, name: str, by: str, reason: str = "rollback", *,
             to: str | int | None = None, approvers: Sequence[str] | None = None,
             lock_timeout_s: float = 60.0) -> AliasMove:
    """Move ``production`` back to the previously approved version.

    The current production version is tagged ``rolled_back_at``/``rolled_back_by`` and is no
    longer a rollback target, so repeated rollbacks walk back through earlier approvals.

    Args:
        to: explicit target version (must have been approved); default: the most recently
            approved version other than the current one that was not rolled back itself.

    Raises:
        RegistryError: nothing in production, or no earlier approved version.
    """
    c = get_client(client)
    by = _need(by, "name (--by)")
    check_approver(name, approvers, "roll back", c.tracking_uri, by)  # identity: recorded by append_history
    with registry_lock(c, name, holder=by, timeout_s=lock_timeout_s):
        current = alias_version(c, name, PRODUCTION)
        if current is None:
            raise RegistryError(f"'{name}' has no '{PRODUCTION}' version to roll back")
        if to is not None:
            target = version_info(c, name, to)
            if target.approval != "approved" or T_APPROVAL_SEQ not in target.tags:
                raise PromotionRefused(f"'{name}' version {to} was never approved; cannot roll back to it")
        else:
            candidates = [v for v in list_versions(c, name)
                          if v.approval == "approved" and v.version != current and T_ROLLED_BACK_AT not in v.tags]
            if not candidates:
                raise RegistryError(f"'{name}' has no earlier approved version to roll back to "
                                    f"(production is version {current})")
            target = max(candidates, key=lambda v: (int(v.tags.get(T_APPROVAL_SEQ, 0) or 0), int(v.version)))
        if target.version == current:
            raise PromotionRefused(f"'{name}' version {current} is already in production")
        move_alias(c, name, PRODUCTION, target.version, f"move alias '{PRODUCTION}' of '{name}'")
        move = append_history(c, name, [dict(alias=PRODUCTION, version_from=current, version_to=target.version,
                                              action="rollback", by=by, reason=reason)])[0]
        set_version_tags(c, name, current, {T_ROLLED_BACK_AT: move.at, T_ROLLED_BACK_BY: by})
        for key in (T_ROLLED_BACK_AT, T_ROLLED_BACK_BY):  # back in production: a rollback target again
            if key in target.tags:
                c.delete_model_version_tag(name, target.version, key)
        return move
