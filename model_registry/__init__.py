"""Everything that talks to the MLflow model registry: register, gate, approve, reject, roll back.

Stages as aliases
-----------------
MLflow deprecated model-version *stages*; this package uses registered-model *aliases*:

=============  ==============  ============================================================
old stage      alias           who moves it
=============  ==============  ============================================================
None           (no alias)      ``register_candidate``: new version, ``approval=pending``
Staging        ``staging``     ``gate_candidate`` on a pass (pipeline account)
Production     ``production``  ``approve`` (from ``staging`` only) and ``rollback`` (approvers)
Archived       (no alias)      a version loses its alias when another takes it
=============  ==============  ============================================================

Serve with ``models:/<name>@production``. At most one version holds each alias.

Tags on each version
--------------------
``metric.<key>`` (evaluation metrics), ``threshold.<key>`` (operating point), lineage
(``dataset_fingerprint``, ``config_hash``, ``code_version``, ``source_run_id``,
``lineage.parent_version``: the version training started from; ``compressed_from``: the source
run's variant a compressed version was made from), ``artifact.onnx``/``artifact.pt`` (URIs of ``model/model.onnx`` and
``model/model.pt`` in the source run), ``validation_status`` (pending|passed|failed),
``gate.*`` (decision, reasons, both sides' figures), ``approval`` (pending|approved|rejected),
``approved_by``, ``approved_at``, ``approved_via`` (MLflow account), ``reason``,
``rejected_by``/``rejected_at``, ``rolled_back_by``/``rolled_back_at``.

History
-------
Each alias move is a registered-model tag ``alias_history.<seq>`` holding one JSON entry
(alias, from, to, action, by, MLflow identity, time, reason); the last 500 are kept.
``history(name)`` returns them in order.

Concurrency
-----------
Alias moves run under ``registry_lock`` (a ``<name>.lock`` registered model whose creation is
atomic on the server) and re-check their preconditions inside it; see ``damage.model_registry.lock``.

Modules: ``registry`` (versions, aliases, approvals), ``gate`` (automatic gate), ``lock``,
``auth`` (basic-auth setup helpers), ``tasks`` (Prefect task wrappers; imports prefect),
``frozen`` (approval records: ``approve``/``rollback`` here are its frozen versions, and
``fetch_approved`` is how production is read).
"""

from damage.model_registry.errors import AccessDenied, PromotionRefused, RegistryError, RegistryLockTimeout
from damage.model_registry.frozen import ApprovalMismatch, check_production, fetch_approved
from damage.model_registry.frozen import approve_frozen as approve
from damage.model_registry.frozen import rollback_frozen as rollback
from damage.model_registry.gate import GateDecision, compare, gate_candidate
from damage.model_registry.lock import registry_lock
from damage.model_registry.moves import reject, set_staging
from damage.model_registry.registry import (
    PRODUCTION,
    STAGING,
    AliasMove,
    VersionInfo,
    alias_version,
    current_identity,
    download_onnx,
    get_client,
    history,
    list_versions,
    register_candidate,
)

__all__ = [
    "PRODUCTION", "STAGING", "AccessDenied", "AliasMove", "ApprovalMismatch", "check_production", "fetch_approved", "GateDecision", "PromotionRefused", "RegistryError",
    "RegistryLockTimeout", "VersionInfo", "alias_version", "approve", "compare", "current_identity",
    "download_onnx", "gate_candidate", "get_client", "history", "list_versions", "register_candidate",
    "registry_lock", "reject", "rollback", "set_staging",
]
