"""Versions, aliases, approvals, rollback and the alias-move history of one registered model.

Every function takes an ``MlflowClient`` or a tracking URI (``get_client``): nothing here reads
a global tracking URI. Alias moves happen under ``registry_lock`` and re-read the state they
depend on inside the lock, so racing processes serialise and see each other's moves.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from damage.model_registry.errors import AccessDenied, RegistryError
from damage.model_registry.identity import confirmed_identity
from damage.model_registry.lock import LOCK_SUFFIX
from damage.tasks.core.secrets import redact_uri

STAGING = "staging"
PRODUCTION = "production"

# Version tags (see the package docstring for the full schema).
T_VALIDATION = "validation_status"  # pending | passed | failed
T_APPROVAL = "approval"  # pending | approved | rejected
T_APPROVED_BY = "approved_by"
T_APPROVED_AT = "approved_at"
T_APPROVED_VIA = "approved_via"  # the MLflow account that made the move
T_APPROVAL_SEQ = "approval_seq"  # history sequence number of the approval (orders approvals)
T_REJECTED_BY = "rejected_by"
T_REJECTED_AT = "rejected_at"
T_REASON = "reason"
T_ROLLED_BACK_AT = "rolled_back_at"
T_ROLLED_BACK_BY = "rolled_back_by"
T_ARTIFACT_ONNX = "artifact.onnx"
T_ARTIFACT_PT = "artifact.pt"
T_PARENT = "lineage.parent_version"  # the production version this one's training started from ("none": scratch)
METRIC_PREFIX = "metric."
THRESHOLD_PREFIX = "threshold."
LINEAGE_REQUIRED = ("dataset_fingerprint", "config_hash", "code_version")

# Registered-model tags: one tag per alias move. One JSON list in one tag would hit the
# 5000-character column of registered_model_tags in the SQL stores after ~30 moves; one tag
# per move keeps each write small and atomic, and the lock makes sequence numbers unique.
HISTORY_PREFIX = "alias_history."
HISTORY_LIMIT = 500
REASON_MAX = 2000


@dataclass(frozen=True)
class AliasMove:
    """One move of an alias: ``version_from`` -> ``version_to`` (None = unset)."""

    seq: int
    alias: str
    version_from: str | None
    version_to: str | None
    action: str  # gate | approve | reject | rollback
    by: str
    identity: str | None
    at: str
    reason: str

    def to_json(self) -> str:
        return json.dumps({"seq": self.seq, "alias": self.alias, "from": self.version_from,
                           "to": self.version_to, "action": self.action, "by": self.by,
                           "identity": self.identity, "at": self.at, "reason": self.reason},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AliasMove:
        d = json.loads(text)
        return cls(int(d["seq"]), d["alias"], d.get("from"), d.get("to"), d.get("action", ""),
                   d.get("by", ""), d.get("identity"), d.get("at", ""), d.get("reason", ""))


@dataclass(frozen=True)
class VersionInfo:
    """A registered model version as this package sees it."""

    name: str
    version: str
    run_id: str | None
    source: str
    aliases: tuple[str, ...]
    tags: dict[str, str] = field(default_factory=dict)
    created_at: str = ""

    @property
    def approval(self) -> str:
        return self.tags.get(T_APPROVAL, "pending")

    @property
    def validation_status(self) -> str:
        return self.tags.get(T_VALIDATION, "pending")

    @property
    def metrics(self) -> dict[str, float]:
        out = {}
        for k, v in self.tags.items():
            if k.startswith(METRIC_PREFIX):
                try:
                    out[k[len(METRIC_PREFIX):]] = float(v)
                except ValueError:
                    pass
        return out


def get_client(client_or_uri: MlflowClient | str | None) -> MlflowClient:
    """An ``MlflowClient`` with tracking and registry URI both set explicitly.

    Args:
        client_or_uri: an existing client (returned as is) or a tracking URI
            (``sqlite:///...``, ``postgresql://...``, ``http://host:5000``).
    """
    if isinstance(client_or_uri, MlflowClient):
        return client_or_uri
    if not client_or_uri:
        raise RegistryError("no MLflow tracking URI given (set mlflow.tracking_uri or MLFLOW_TRACKING_URI)")
    return MlflowClient(tracking_uri=client_or_uri, registry_uri=client_or_uri)


def current_identity() -> str | None:
    """The MLflow account this process authenticates as (basic auth), or None when anonymous.

    MLflow's REST client reads the credentials per request from ``MLFLOW_TRACKING_USERNAME``/
    ``MLFLOW_TRACKING_PASSWORD`` or ``~/.mlflow/credentials``; this reads the same source.
    """
    from mlflow.utils.credentials import read_mlflow_creds

    return read_mlflow_creds().username or None


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _code(e: MlflowException) -> str:
    return str(getattr(e, "error_code", ""))


def _denied(e: MlflowException) -> bool:
    code = _code(e)
    return "PERMISSION_DENIED" in code or "UNAUTHENTICATED" in code or e.get_http_status_code() in (401, 403)


@contextmanager
def mlflow_errors(client: MlflowClient, what: str) -> Iterator[None]:
    """Turn the server's 401/403 into an ``AccessDenied`` that names the user and the action."""
    try:
        yield
    except MlflowException as e:
        if _denied(e):
            who = current_identity() or "(anonymous)"
            raise AccessDenied(
                f"MLflow server {redact_uri(client.tracking_uri)} refused to let user '{who}' {what} "
                f"({_code(e) or e.get_http_status_code()}); ask an MLflow admin for the permission "
                f"(see infra/mlflow-auth/README.md)"
            ) from None
        raise


def check_approver(model_name: str, approvers: Sequence[str] | None, action: str,
                   tracking_uri: str | None = None, by: str | None = None) -> str | None:
    """Refuse a ``production`` move unless the current MLflow user is a configured approver.

    MLflow's permissions are per registered model, not per alias: the pipeline account needs
    EDIT to set ``staging`` and EDIT also allows ``production``. This is the client-side half of
    the policy (see infra/mlflow-auth/README.md for what the server enforces). It fails closed:

    * against a tracking server (``http(s)://``) an empty approver list refuses every move
      (nobody was named, so nobody may approve);
    * with a list, the authenticated MLflow user must be on it;
    * ``by`` must be the identity (against a server: the account the server confirms, ``confirmed_identity``).

    Args:
        model_name: the model whose production alias would move.
        approvers: allowed MLflow user names (``registry.approvers``); empty/None is only
            accepted for a local store (``sqlite:``, a path), where there are no accounts.
        action: verb for the message.
        tracking_uri: where the move would happen (decides whether an empty list is allowed).
        by: the name the caller gave for the record (``--by``); None = not checked.

    Returns: the MLflow identity in use (None when anonymous).
    """
    who, remote = current_identity(), str(tracking_uri or "").lower().startswith(("http://", "https://"))
    if remote and not approvers:
        raise AccessDenied(
            f"refusing to {action} '{model_name}' at {redact_uri(str(tracking_uri))}: no approvers are configured "
            f"(registry.approvers is empty in this worker's config); list the MLflow accounts that may move "
            f"'{PRODUCTION}'"
        )
    if approvers and who not in approvers:
        raise AccessDenied(
            f"MLflow user '{who or '(anonymous)'}' may not {action} '{model_name}': only "
            f"{', '.join(approvers)} may move the '{PRODUCTION}' alias (registry.approvers); "
            f"set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD to an approver account"
        )
    if remote and confirmed_identity(str(tracking_uri)) != who:  # the server's word, not the variable's
        raise AccessDenied(f"the MLflow server does not confirm '{who}' as this process's account")
    if who and by is not None and by.strip() != who:
        raise AccessDenied(
            f"--by '{by.strip()}' does not match the authenticated MLflow user '{who}'; a decision on "
            f"'{model_name}' is recorded under the account that makes it (pass --by {who})"
        )
    return who


def version_info(client: MlflowClient, name: str, version: str | int) -> VersionInfo:
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in _code(e):
            raise RegistryError(f"registered model '{name}' has no version {version}") from None
        with mlflow_errors(client, f"read '{name}' version {version}"):
            raise
    return _info(mv)


def _info(mv) -> VersionInfo:
    created = ""
    if getattr(mv, "creation_timestamp", None):
        created = datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).isoformat(timespec="seconds")
    return VersionInfo(name=mv.name, version=str(mv.version), run_id=mv.run_id, source=mv.source,
                       aliases=tuple(getattr(mv, "aliases", None) or ()), tags=dict(mv.tags or {}),
                       created_at=created)


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """Version number the alias points to, or None if unset (or the model does not exist)."""
    try:
        rm = client.get_registered_model(name)
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in _code(e):
            return None
        raise
    aliases = rm.aliases or {}
    v = aliases.get(alias)
    return str(v) if v is not None else None


def alias_source_run(client: MlflowClient, name: str, alias: str) -> tuple[str, str] | None:
    """(version, pipeline run id that produced it: its ``source_run_id`` tag) of the version
    ``alias`` points to; None when the alias is unset or the model does not exist."""
    version = alias_version(client, name, alias)
    if version is None:
        return None
    info = version_info(client, name, version)
    return version, info.tags.get("source_run_id") or info.run_id


def set_version_tags(client: MlflowClient, name: str, version: str, tags: Mapping[str, object]) -> None:
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, str(v))


def history_tags(client: MlflowClient, name: str) -> dict[int, str]:
    tags = client.get_registered_model(name).tags or {}
    out = {}
    for k, v in tags.items():
        if k.startswith(HISTORY_PREFIX):
            try:
                out[int(k[len(HISTORY_PREFIX):])] = v
            except ValueError:
                pass
    return out


def append_history(client: MlflowClient, name: str, moves: Sequence[dict], limit: int = HISTORY_LIMIT) -> list[AliasMove]:
    """Record alias moves (call with the registry lock held: sequence numbers come from a read)."""
    existing = history_tags(client, name)
    seq = max(existing, default=0)
    written = []
    for m in moves:
        seq += 1
        move = AliasMove(seq=seq, at=now_iso(), identity=current_identity(),
                         reason=(m.get("reason") or "")[:REASON_MAX],
                         **{k: v for k, v in m.items() if k != "reason"})
        client.set_registered_model_tag(name, f"{HISTORY_PREFIX}{seq:06d}", move.to_json())
        written.append(move)
    # Bound the history: drop the oldest entries beyond the limit.
    for old in sorted(existing)[: max(0, len(existing) + len(written) - limit)]:
        client.delete_registered_model_tag(name, f"{HISTORY_PREFIX}{old:06d}")
    return written


def move_alias(client: MlflowClient, name: str, alias: str, to: str | None, what: str) -> str | None:
    """Point ``alias`` at ``to`` (None = delete it); returns where it pointed before."""
    before = alias_version(client, name, alias)
    with mlflow_errors(client, what):
        if to is None:
            if before is not None:
                client.delete_registered_model_alias(name, alias)
        else:
            client.set_registered_model_alias(name, alias, to)
    return before


def _copy_as(src: Path, dst: Path) -> None:
    try:
        dst.hardlink_to(src)  # no copy of large weights when on the same filesystem
    except OSError:
        shutil.copyfile(src, dst)


def ensure_registered_model(client: MlflowClient, name: str) -> None:
    """Create the registered model if it does not exist yet (concurrency-safe)."""
    if name.endswith(LOCK_SUFFIX):
        raise RegistryError(f"model name '{name}' ends with '{LOCK_SUFFIX}', reserved for registry locks")
    try:
        client.get_registered_model(name)
        return
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" not in _code(e):
            raise
    try:
        with mlflow_errors(client, f"create registered model '{name}'"):
            client.create_registered_model(name, description="vehicle-damage segmentation (damage pipeline)")
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in _code(e):
            raise


LogModelFn = Callable[[str, Path, Path | None], tuple[str, str]]


def register_candidate(client_or_uri: MlflowClient | str, model_name: str, run_id: str, onnx_path: str | Path,
                       pt_path: str | Path | None, metrics: Mapping[str, float], thresholds: Mapping[str, float],
                       lineage: Mapping[str, str], *, log_model_fn: LogModelFn | None = None,
                       description: str | None = None) -> VersionInfo:
    """Log the candidate's files to its run and create a registry version with its tags.

    The files are logged as ``model/model.onnx`` and ``model/model.pt`` artifacts of ``run_id``
    and the version's source is that ``model/`` directory. Tags: ``metric.<key>``,
    ``threshold.<key>``, the lineage keys, ``validation_status=pending``, ``approval=pending``,
    ``artifact.onnx``/``artifact.pt`` (full URIs).

    Args:
        client_or_uri: client or tracking URI.
        model_name: registered model name (created if missing).
        run_id: MLflow run that produced the candidate.
        onnx_path: exported ONNX file.
        pt_path: PyTorch checkpoint (None for variants that only exist as ONNX).
        metrics: evaluation metrics, e.g. ``{"mask/mAP50-95": 0.41}``.
        thresholds: chosen operating point, e.g. ``{"conf": 0.4, "iou": 0.5}``.
        lineage: ``dataset_fingerprint``, ``config_hash``, ``code_version`` (required),
            ``source_run_id`` (default: ``run_id``), ``compressed_from`` (compressed variants).
        log_model_fn: optional hook ``(run_id, onnx, pt) -> (source_uri, onnx_relpath)`` that logs
            the model its own way (e.g. an MLflow pyfunc); replaces the plain artifact logging.
        description: version description.

    Returns:
        The new version.

    Example:
        >>> v = register_candidate("http://127.0.0.1:5000", "damage-seg", run_id, "best.onnx", "best.pt",
        ...                        {"mask/mAP50-95": 0.4}, {"conf": 0.4}, {"dataset_fingerprint": "ab",
        ...                        "config_hash": "cd", "code_version": "ef"})
    """
    onnx_path = Path(onnx_path)
    pt = Path(pt_path) if pt_path is not None else None
    for p in (onnx_path, pt):
        if p is not None and not p.is_file():
            raise RegistryError(f"{p}: model file not found, cannot register it")
    missing = [k for k in LINEAGE_REQUIRED if not lineage.get(k)]
    if missing:
        raise RegistryError(f"lineage for '{model_name}' lacks {', '.join(missing)} (needed on every version)")
    c = get_client(client_or_uri)
    try:
        run = c.get_run(run_id)
    except MlflowException as e:
        raise RegistryError(f"MLflow run {run_id} not found at {redact_uri(c.tracking_uri)}: {e.message}") from None
    existing = version_from_run(c, model_name, run_id)
    if existing is not None:  # a retried task or flow: the run already has its version, never a second one
        return existing

    with mlflow_errors(c, f"log model files to run {run_id}"):
        if log_model_fn is not None:
            source, onnx_rel = log_model_fn(run_id, onnx_path, pt)
            pt_rel = None
        else:
            with tempfile.TemporaryDirectory(prefix="register-") as d:
                _copy_as(onnx_path, Path(d, "model.onnx"))
                if pt is not None:
                    _copy_as(pt, Path(d, "model.pt"))
                c.log_artifacts(run_id, d, "model")
            source, onnx_rel, pt_rel = f"{run.info.artifact_uri.rstrip('/')}/model", "model.onnx", "model.pt"

    tags: dict[str, str] = {f"{METRIC_PREFIX}{k}": repr(float(v)) for k, v in metrics.items()}
    tags.update({f"{THRESHOLD_PREFIX}{k}": str(v) for k, v in thresholds.items()})
    tags.update({k: str(v) for k, v in lineage.items() if v not in (None, "")})
    tags.setdefault("source_run_id", run_id)
    tags.update({T_VALIDATION: "pending", T_APPROVAL: "pending", T_ARTIFACT_ONNX: f"{source}/{onnx_rel}"})
    if pt is not None and pt_rel:
        tags[T_ARTIFACT_PT] = f"{source}/{pt_rel}"

    ensure_registered_model(c, model_name)
    with mlflow_errors(c, f"create a version of '{model_name}'"):
        mv = c.create_model_version(model_name, source=source, run_id=run_id, tags=tags, description=description)
    return _info(mv)


def version_from_run(client: MlflowClient, model_name: str, run_id: str) -> VersionInfo | None:
    """The version of ``model_name`` registered from ``run_id`` (the oldest if several), or None.

    Registration is keyed by its source run: a retry after ``create_model_version`` succeeded
    but its reply was lost (or after a later step failed) finds the version instead of making
    a second one.
    """
    safe_name, safe_run = model_name.replace("'", "\\'"), run_id.replace("'", "")
    try:
        with mlflow_errors(client, f"search versions of '{model_name}'"):
            found = client.search_model_versions(f"name='{safe_name}' and run_id='{safe_run}'")
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in _code(e):
            return None
        raise
    found = [mv for mv in found if mv.run_id == run_id and mv.name == model_name]
    return _info(min(found, key=lambda mv: int(mv.version))) if found else None


def _download(client: MlflowClient, name: str, version: str | int, uri: str, dst_dir: str | Path) -> Path:
    """Download one artifact of a version; access denials propagate, other failures are RegistryError."""
    import mlflow.artifacts

    with mlflow_errors(client, f"download {uri}"):
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst_dir),
                                                        tracking_uri=client.tracking_uri)
        except MlflowException as e:
            if _denied(e):
                raise
            raise RegistryError(f"'{name}' version {version}: cannot download {uri}: {e.message}") from None
    return Path(local)


def download_onnx(client: MlflowClient, name: str, version: str | int, dst_dir: str | Path) -> Path:
    """Download the version's ONNX file into ``dst_dir``; returns its local path."""
    info = version_info(client, name, version)
    uri = info.tags.get(T_ARTIFACT_ONNX) or f"{info.source.rstrip('/')}/model.onnx"
    return _download(client, name, version, uri, dst_dir)


def download_pt(client: MlflowClient, name: str, version: str | int, dst_dir: str | Path) -> Path:
    """Download the version's PyTorch checkpoint (``artifact.pt``) into ``dst_dir``; returns its local path.

    Raises:
        RegistryError: the version has no ``.pt`` (e.g. an INT8 variant that only exists as ONNX)
            or it cannot be downloaded.
    """
    info = version_info(client, name, version)
    uri = info.tags.get(T_ARTIFACT_PT)
    if not uri:
        raise RegistryError(f"'{name}' version {version} has no PyTorch checkpoint ({T_ARTIFACT_PT} tag missing)")
    Path(dst_dir).mkdir(parents=True, exist_ok=True)
    return _download(client, name, version, uri, dst_dir)


def list_versions(client_or_uri: MlflowClient | str, name: str) -> list[VersionInfo]:
    """All versions of ``name`` (newest first) with aliases and tags."""
    c = get_client(client_or_uri)
    safe = name.replace("'", "\\'")
    with mlflow_errors(c, f"list versions of '{name}'"):
        versions = c.search_model_versions(f"name='{safe}'", max_results=10000)
    aliases: dict[str, list[str]] = {}
    try:
        for alias, v in (c.get_registered_model(name).aliases or {}).items():
            aliases.setdefault(str(v), []).append(alias)
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in _code(e):
            raise RegistryError(f"no registered model named '{name}' at {redact_uri(c.tracking_uri)}") from None
        raise
    out = []
    for mv in versions:
        info = _info(mv)
        # search results may omit aliases; the registered model's alias map is authoritative
        out.append(VersionInfo(**{**info.__dict__, "aliases": tuple(sorted(aliases.get(info.version, [])))}))
    return sorted(out, key=lambda i: int(i.version), reverse=True)


def history(client_or_uri: MlflowClient | str, name: str) -> list[AliasMove]:
    """Every recorded alias move of ``name``, oldest first (bounded to the last ``HISTORY_LIMIT``)."""
    c = get_client(client_or_uri)
    try:
        with mlflow_errors(c, f"read '{name}'"):
            tags = history_tags(c, name)
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in _code(e):
            raise RegistryError(f"no registered model named '{name}' at {redact_uri(c.tracking_uri)}") from None
        raise
    return [AliasMove.from_json(tags[s]) for s in sorted(tags)]
