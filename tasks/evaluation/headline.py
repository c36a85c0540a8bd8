"""The registered artifact's headline figures on the nightly's parent MLflow run.

The parent run is what people open first. It gets the figures of what was registered (the INT8
variant's when compression chose one): overall box/mask metrics and latency, per-class AP
(``mask_ap50/<class>`` ...), and the per-vehicle damage-percentage error at the operating point.
The child runs keep their own models' figures (the trained ``.pt`` on ``evaluate``, each variant
on ``variant/<name>``).
"""

from __future__ import annotations

from typing import Any

from damage.tasks.evaluation.metrics import class_metrics
from damage.tasks.evaluation.sweep import damage_metrics


def headline_metrics(summary: dict[str, Any], damage=None) -> dict[str, float]:
    """Flat MLflow metrics of the summary's registered artifact (``tasks.nightly.pipeline.summarise``).

    Example:
        >>> headline_metrics({"metrics": {"mask/mAP50": 0.5, "latency_ms": None},
        ...                   "per_class": [{"class": "dent", "mask/AP50": 0.4}]})
        {'mask/mAP50': 0.5, 'mask_ap50/dent': 0.4}
    """
    out = {k: float(v) for k, v in (summary.get("metrics") or {}).items() if v is not None}
    out.update(class_metrics(summary.get("per_class") or []))
    if damage is not None:
        out.update(damage_metrics(damage))
    return out


def log_headline(run, summary: dict[str, Any], damage=None, dataset_source: str | None = None) -> dict[str, float]:
    """Log ``headline_metrics`` on the pipeline run ``run`` (a ``PipelineRun``), and the dataset as its
    input (as on the train and evaluate runs); returns the figures.

    ``damage``: the registered artifact's ``DamageMAE`` when it was measured apart from the sweep
    (compressed variants); None keeps the sweep's figure already on the run.
    """
    from damage.tasks.core import tracking
    from damage.tasks.data.mlflow_input import log_dataset_input

    c = tracking.client(run.tracking_uri)
    figures = headline_metrics(summary, damage)
    tracking.log_metrics(c, run.run_id, figures)
    if summary.get("dataset"):
        log_dataset_input(c, run.run_id, summary["dataset"], summary.get("dataset_fingerprint"), "training",
                          dataset_source)
    return figures
