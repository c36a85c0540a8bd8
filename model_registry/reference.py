"""The drift reference of the nightly's data gate: the profile behind ``production``.

The gate (``tasks/validation/drift.py``) compares profiles; which run stands behind ``production`` is
the registry's to say, so the lookup lives here and is handed to the gate as a callable.
"""

from __future__ import annotations

from typing import Any

from damage.model_registry.frozen import check_production
from damage.model_registry.registry import PRODUCTION, alias_source_run
from damage.tasks.validation.drift import find_reference


def production_source(client: Any, model_name: str) -> tuple[str, str] | None:
    """``(version, source run)`` behind ``model_name@production``, or None; an alias that moved outside an
    approval (no matching approval record) raises ``ApprovalMismatch`` and notifies (``check_production``)."""
    prod = alias_source_run(client, model_name, PRODUCTION)
    if prod is not None:
        check_production(client, model_name)  # an alias moved outside approval stops the run
    return prod


def reference_step(cfg: Any, run: Any) -> tuple[dict[str, Any] | None, str]:
    """``find_reference`` for the nightly flow (``cfg``: Config, ``run``: PipelineRun)."""
    from damage.tasks.core import tracking

    def production_run() -> tuple[str, str] | None:
        return production_source(tracking.client(run.tracking_uri), cfg.registry.model_name)

    return find_reference(cfg.validation, run.tracking_uri, run.experiment_id, cfg.registry.model_name, run.run_id,
                          production_run=production_run)
