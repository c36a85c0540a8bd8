"""Approved means frozen: what an approver approved is, byte for byte, what is served and fine-tuned from.

The pipeline account can change a version's artifacts and tags after approval, and it holds EDIT
on ``damage-seg`` (it must, to register versions and move ``staging``), which also lets it move
``production`` there. So the approval record does not live there. At approval:

1. ``freeze_version`` downloads the version's whole source folder (ONNX, ``.pt``, metadata files),
   hashes every file (SHA-256) and copies the folder into a run of the experiment
   ``<name>-approved``, registered as a version of the model ``<name>-approved`` whose tags are the
   approval record: ``approval.source_version``, ``approved_by``, ``approved_via`` (the MLflow
   account), ``approved_at``, ``reason`` and one ``sha256.<relative path>`` per file.
2. ``damage.model_registry.auth.provision`` makes that model and that experiment writable by the
   approvers only (MANAGE) and read-only for the pipeline: the MLflow server refuses the
   pipeline's writes there (alias moves included), server-side.
3. The ``production`` alias of ``<name>-approved`` is the last approval record; the ``production``
   alias of ``<name>`` must name its ``approval.source_version``.

Readers of production (``damage serve``, ``damage predict models:/...``, ``train.init``, the drift
reference) call ``fetch_approved``: it checks the alias against the record (``check_production``),
downloads the frozen copy and verifies every file's hash; a mismatch, a missing or an extra file is
refused, naming the file. The Ray Serve server calls the same function.

Example:
    >>> local = fetch_approved(client, "damage-seg", "production")  # doctest: +SKIP
    >>> onnx = local / "model.onnx"  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from damage.model_registry.errors import AccessDenied, RegistryError
from damage.model_registry.moves import approve, rollback
from damage.model_registry.registry import (
    PRODUCTION,
    STAGING,
    T_APPROVED_AT,
    T_APPROVED_BY,
    T_APPROVED_VIA,
    T_REASON,
    alias_version,
    current_identity,
    ensure_registered_model,
    get_client,
    mlflow_errors,
    now_iso,
)

APPROVED_SUFFIX = "-approved"
T_SOURCE_VERSION = "approval.source_version"  # the version of <name> this record approved
T_SHA = "sha256."  # one tag per frozen file: sha256.<relative path> -> hex digest
T_FROZEN_AS = "approval.frozen_as"  # on the source version: its record in <name>-approved (informational)


class ApprovalMismatch(RegistryError):
    """What would be served differs from what was approved (a file, or the production alias)."""


def approved_name(name: str) -> str:
    """The approval-record model (and experiment) of ``name``: ``damage-seg`` -> ``damage-seg-approved``."""
    return f"{name}{APPROVED_SUFFIX}"


def hash_tree(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` (POSIX separators, sorted)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            h = hashlib.sha256()
            with p.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[p.relative_to(root).as_posix()] = h.hexdigest()
    return out


def _download_dir(client: MlflowClient, uri: str, dst: Path) -> Path:
    import mlflow.artifacts

    with mlflow_errors(client, f"download {uri}"):
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst),
                                                        tracking_uri=client.tracking_uri))


def _ensure_experiment(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    with mlflow_errors(client, f"create experiment '{name}'"):
        try:
            return client.create_experiment(name)
        except MlflowException as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
                raise
            return client.get_experiment_by_name(name).experiment_id


def freeze_version(client: MlflowClient | str, name: str, version: str | int, by: str, reason: str) -> str:
    """Copy ``version``'s source folder into ``<name>-approved`` with its hashes; returns the record's version.

    The record gets no alias here (``approve_frozen`` moves it after the main alias). Run as an
    approver: against a provisioned server the pipeline account is refused (HTTP 403).
    """
    c = get_client(client)
    version, rec_name = str(version), approved_name(name)
    try:
        mv = c.get_model_version(name, version)
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(e.error_code):
            raise RegistryError(f"registered model '{name}' has no version {version}") from None
        with mlflow_errors(c, f"read '{name}' version {version}"):
            raise
    with tempfile.TemporaryDirectory(prefix="freeze-") as d:
        local = _download_dir(c, mv.source, Path(d))
        if local.is_file():
            raise RegistryError(f"'{name}' version {version}: source {mv.source} is a file, expected a folder")
        hashes = hash_tree(local)
        if not hashes:
            raise RegistryError(f"'{name}' version {version}: source {mv.source} holds no files to freeze")
        exp_id = _ensure_experiment(c, rec_name)
        with mlflow_errors(c, f"write the approval record of '{name}' version {version}"):
            run = c.create_run(exp_id, run_name=f"{name}-v{version}-approved",
                               tags={T_SOURCE_VERSION: version, "source_model": name})
            c.log_artifacts(run.info.run_id, str(local), "model")
            c.set_terminated(run.info.run_id)
        ensure_registered_model(c, rec_name)
        tags = {T_SOURCE_VERSION: version, T_APPROVED_BY: by, T_APPROVED_AT: now_iso(),
                T_APPROVED_VIA: current_identity() or "(local store, no account)", T_REASON: reason[:2000],
                **{f"{T_SHA}{rel}": h for rel, h in hashes.items()}}
        with mlflow_errors(c, f"register the approval record of '{name}' version {version}"):
            rec = c.create_model_version(rec_name, source=f"{run.info.artifact_uri.rstrip('/')}/model",
                                         run_id=run.info.run_id, tags=tags)
    try:  # informational only (the pipeline can edit it): the record is the truth
        c.set_model_version_tag(name, version, T_FROZEN_AS, str(rec.version))
    except MlflowException:
        pass
    return str(rec.version)


def record_for(c: MlflowClient, name: str, version: str) -> str | None:
    """The newest approval record of ``name`` ``version``, or None."""
    rec_name = approved_name(name).replace("'", "\\'")
    try:
        found = c.search_model_versions(f"name='{rec_name}'")
    except MlflowException:
        return None
    hits = [int(m.version) for m in found if (m.tags or {}).get(T_SOURCE_VERSION) == str(version)]
    return str(max(hits)) if hits else None


def _set_record_alias(c: MlflowClient, name: str, record: str) -> None:
    with mlflow_errors(c, f"move alias '{PRODUCTION}' of '{approved_name(name)}'"):
        c.set_registered_model_alias(approved_name(name), PRODUCTION, record)


def approve_frozen(client: MlflowClient | str, name: str, version: str | int, by: str, reason: str, *,
                   approvers=None, lock_timeout_s: float = 60.0):
    """``approve`` with the approval frozen: record first (refused for a non-approver by the server),
    then the ``production`` move, then the record's alias. Returns the approved ``VersionInfo``."""
    from damage.model_registry.registry import check_approver

    c = get_client(client)
    check_approver(name, approvers, f"approve version {version} of", c.tracking_uri, by)
    if not by.strip() or not reason.strip():  # approve's own checks, before anything is written
        return approve(c, name, version, by, reason, approvers=approvers, lock_timeout_s=lock_timeout_s)
    staged = alias_version(c, name, STAGING)
    if staged != str(version):  # approve refuses it (with its message) before any write; no record either
        return approve(c, name, version, by, reason, approvers=approvers, lock_timeout_s=lock_timeout_s)
    record = freeze_version(c, name, version, by, reason)
    info = approve(c, name, version, by, reason, approvers=approvers, lock_timeout_s=lock_timeout_s)
    _set_record_alias(c, name, record)
    return info


def rollback_frozen(client: MlflowClient | str, name: str, by: str, reason: str = "rollback", *, to=None,
                    approvers=None, lock_timeout_s: float = 60.0):
    """``rollback``, then the record's alias to the target's approval record (frozen now if it has none)."""
    c = get_client(client)
    move = rollback(c, name, by, reason, to=to, approvers=approvers, lock_timeout_s=lock_timeout_s)
    record = record_for(c, name, str(move.version_to)) or freeze_version(c, name, move.version_to, by, reason)
    _set_record_alias(c, name, record)
    return move


def check_production(client: MlflowClient | str, name: str,
                     notify: Callable[[str], object] | None = None) -> str | None:
    """The approval record of ``production``, after checking that ``<name>@production`` is what it approved.

    Returns:
        The record's version in ``<name>-approved`` (None when nothing was ever approved and
        ``<name>`` has no ``production`` either).

    Raises:
        ApprovalMismatch: the alias moved outside ``approve``/``rollback`` (or nothing was
            approved but ``production`` is set); ``notify(message)`` is called first.
    """
    c = get_client(client)
    record = alias_version(c, approved_name(name), PRODUCTION)
    current = alias_version(c, name, PRODUCTION)
    approved = None
    if record is not None:
        approved = (c.get_model_version(approved_name(name), record).tags or {}).get(T_SOURCE_VERSION)
    if current != approved:
        msg = (f"'{name}@{PRODUCTION}' is version {current or 'unset'} but the last approval record "
               f"('{approved_name(name)}' version {record or 'none'}) approved version {approved or 'none'}: the "
               f"alias moved outside `damage registry approve`/`rollback`; refusing to use it")
        if notify is not None:
            notify(msg)
        raise ApprovalMismatch(msg)
    return record


def verify_tree(local: Path, expected: dict[str, str], what: str) -> None:
    """Refuse unless ``local`` holds exactly the files of ``expected`` with those hashes (names the file)."""
    got = hash_tree(local)
    for rel, h in expected.items():
        if rel not in got:
            raise ApprovalMismatch(f"{local / rel}: missing from {what}: refusing to use it")
        if got[rel] != h:
            raise ApprovalMismatch(f"{local / rel}: differs from what was approved ({what}; sha256 {got[rel][:12]}... "
                                   f"!= approved {h[:12]}...): refusing to use it")
    extra = sorted(set(got) - set(expected))
    if extra:
        raise ApprovalMismatch(f"{local / extra[0]}: not part of what was approved ({what}): refusing to use it")


def fetch_approved(client: MlflowClient | str, name: str, alias_or_version: str = PRODUCTION,
                   dst: str | Path | None = None, notify: Callable[[str], object] | None = None) -> Path:
    """Download the frozen, approved copy of a version and verify it; returns the local folder.

    Args:
        client: client or tracking URI.
        name: the registered model (``damage-seg``), not its ``-approved`` twin.
        alias_or_version: ``production`` (checked against the approval record with
            ``check_production``) or a version number of ``name`` that was approved.
        dst: where to download (a new folder inside it; default: a new temporary folder, left for the caller).
        notify: called with the message before an ``ApprovalMismatch`` on alias drift.

    Returns:
        The folder with the approved files (``model.onnx``, ``model.pt``, metadata...).

    Raises:
        ApprovalMismatch: alias drift, or a file missing, extra or changed (the message names it).
        RegistryError: nothing approved under that alias/version.
    """
    c = get_client(client)
    target = str(alias_or_version)
    if target.isdigit():
        record = record_for(c, name, target)
    elif target == PRODUCTION:
        record = check_production(c, name, notify)
    else:
        raise RegistryError(f"fetch_approved: '{target}' is neither '{PRODUCTION}' nor a version number")
    if record is None:
        raise RegistryError(f"'{name}' {target}: no approval record in '{approved_name(name)}' (nothing approved)")
    rec = c.get_model_version(approved_name(name), record)
    tags = rec.tags or {}
    expected = {k[len(T_SHA):]: v for k, v in tags.items() if k.startswith(T_SHA)}
    if not expected:
        raise ApprovalMismatch(f"'{approved_name(name)}' version {record}: the approval record lists no file hashes")
    if dst is not None:
        Path(dst).mkdir(parents=True, exist_ok=True)
    where = Path(tempfile.mkdtemp(prefix="approved-", dir=dst))  # fresh: no file left from an earlier fetch
    local = _download_dir(c, rec.source, where)
    verify_tree(local, expected, f"'{name}' version {tags.get(T_SOURCE_VERSION)} approved by "
                                 f"{tags.get(T_APPROVED_BY)} (record {record})")
    return local


def approved_file(local: Path, suffix: str) -> Path:
    """The one ``suffix`` file (``.onnx``, ``.pt``) of a folder ``fetch_approved`` returned.

    Raises:
        ApprovalMismatch: none, or more than one.
    """
    found = sorted(p for p in Path(local).rglob(f"*{suffix}") if p.is_file())
    if len(found) != 1:
        raise ApprovalMismatch(f"{local}: the approved files hold {len(found)} '{suffix}' files, expected one")
    return found[0]


def fetch_approved_uri(client: MlflowClient | str, uri: str, dst: str | Path | None = None,
                       notify: Callable[[str], object] | None = None) -> Path:
    """``fetch_approved`` for ``models:/NAME@production`` or ``models:/NAME/VERSION``.

    Raises:
        RegistryError: another URI form (another alias, ``runs:/``...): only approved versions are served.
    """
    rest = uri[len("models:/"):] if uri.startswith("models:/") else ""
    name, at, alias = rest.partition("@")
    if not at:
        name, _, alias = rest.rpartition("/")
    if not name or not (alias == PRODUCTION or alias.isdigit()):
        raise RegistryError(f"{uri}: only models:/NAME@{PRODUCTION} or models:/NAME/VERSION of an approved version "
                            f"can be served")
    return fetch_approved(client, name, alias, dst, notify)


__all__ = ["approved_file", "fetch_approved_uri", "APPROVED_SUFFIX", "AccessDenied", "ApprovalMismatch", "approve_frozen", "approved_name",
           "check_production", "fetch_approved", "freeze_version", "hash_tree", "rollback_frozen", "verify_tree"]
