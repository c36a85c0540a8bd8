"""The model card: a markdown description on each registered version, rendered by the MLflow UI.

``model_card`` is a pure function of what the pipeline measured (tested on its own);
``describe_version`` writes it as the version's description. Numbers are rounded for reading
(``damage.tasks.core.display``: 3 decimals, 1 for milliseconds).
"""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping, Sequence
from typing import Any

from damage.tasks.core.display import artifact_precision, fmt_metric

_OVERALL = ("box/precision", "box/recall", "box/mAP50", "box/mAP50-95",
            "mask/precision", "mask/recall", "mask/mAP50", "mask/mAP50-95", "fitness")
_PER_CLASS = ("box/AP50", "box/AP50-95", "mask/AP50", "mask/AP50-95")


def machine() -> str:
    """Short description of this machine (latency figures are only comparable on the same one)."""
    import os

    cpu = platform.processor() or platform.machine()
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs ({cpu})"


def model_card(name: str, version: str | int, metrics: Mapping[str, Any], per_class: Sequence[Mapping[str, Any]],
               operating_point: Mapping[str, Any] | None, *, objective_help: str = "",
               flat_objective: bool = False, dataset_fingerprint: str = "",
               dataset_sizes: Mapping[str, Any] | None = None, compressed_from: str | None = None,
               trained_from: str | None = None, kind: str = "trained", latency_ms: float | None = None,
               machine_desc: str = "", source_run_url: str | None = None, flow_run_url: str | None = None,
               gate: Mapping[str, Any] | None = None, family: str | None = None,
               damage_pct_mae: float | None = None) -> str:
    """Markdown card of one version. Every figure is the registered artifact's own (``metrics`` and
    ``per_class`` of the variant that was registered).

    ``compressed_from``: the compression-table variant this one was made from (``parent``: the run's
    trained FP32 model); ``trained_from``: the registered version its training started from
    (``"none"``: from scratch or a weights file; None: not recorded). ``latency_ms`` is the
    evaluator's: pre+inference+post per image, the figure the promotion gate compares;
    ``metrics["latency/forward_ms"]``, when present, is the ONNX Runtime forward pass alone (the
    compression step's speed probe).

    Example:
        >>> md = model_card("damage-seg", 3, {"mask/mAP50": 0.5}, [{"class": "dent", "mask/AP50": 0.4}],
        ...                 {"conf": 0.4, "iou": 0.5, "objective": "mask_f1", "value": 0.6})
        >>> "| dent |" in md
        True
    """
    out = [f"## {name} v{version}", "",
           f"**Kind:** {kind} ({artifact_precision(kind)})" + (f" · **Family:** {family}" if family else ""), ""]
    if compressed_from:
        src = "this run's trained FP32 model" if compressed_from == "parent" else f"variant `{compressed_from}`"
        out += [f"**Compressed from:** {src} (compression table of the source run)", ""]
    if trained_from:
        start = "scratch or a weights file" if trained_from == "none" else f"registered version {trained_from}"
        out += [f"**Training started from:** {start}", ""]
    out += ["### Metrics (val, mAP at conf floor 0.001)", "", "| metric | value |", "|---|---|"]
    out += [f"| {k} | {fmt_metric(metrics.get(k), k)} |" for k in _OVERALL if k in metrics]
    if damage_pct_mae is not None:
        out.append(f"| damage_pct_mae (points, per vehicle, at the operating point) | {fmt_metric(damage_pct_mae)} |")
    if latency_ms is not None or metrics.get("latency_ms") is not None:
        lat = latency_ms if latency_ms is not None else metrics.get("latency_ms")
        out.append(f"| latency (ms/image, pre+inference+post) | {fmt_metric(lat, 'latency_ms')} on "
                   f"{machine_desc or machine()} |")
    if metrics.get("latency/forward_ms") is not None:
        out.append(f"| ONNX Runtime forward pass alone (ms) | {fmt_metric(metrics['latency/forward_ms'], 'latency_ms')} |")
    out.append("")
    if per_class:
        out += ["### Per class", "", "| class | images | instances | " + " | ".join(_PER_CLASS) + " |",
                "|---|---|---|" + "---|" * len(_PER_CLASS)]
        for r in per_class:
            out.append(f"| {r.get('class')} | {r.get('images', '–')} | {r.get('instances', '–')} | "
                       + " | ".join(fmt_metric(r.get(k), k) for k in _PER_CLASS) + " |")
        out.append("")
    out += ["### Operating point", ""]
    if operating_point:
        op = operating_point
        out.append(f"conf **{op.get('conf')}**, NMS IoU **{op.get('iou')}**, chosen by objective "
                   f"`{op.get('objective')}` = {fmt_metric(op.get('value'))}" + (f" ({objective_help})" if objective_help else "")
                   + "." + (f" Sliced inference: `{json.dumps(op['slices'])}` (predictor.slices, recorded in the "
                            f"ONNX metadata as damage.slices)." if op.get("slices") is not None else ""))
        from damage.tasks.evaluation.extra_sets import sliced_confs

        for set_name, c in sliced_confs(metrics).items():
            mae = metrics.get(f"{set_name}/tune/damage_pct_mae")
            out.append("")
            out.append(f"Sliced photos: conf **{c:g}** (ONNX metadata damage.sliced_conf), chosen on the tuning images of "
                       f"extra set `{set_name}` by the lowest per-vehicle damage-% MAE"
                       + (f" ({fmt_metric(mae)} pp there)." if mae is not None else "."))
        if flat_objective:
            out.append("")
            out.append("**Warning:** the objective was flat across the grid (ties within tolerance); "
                       "the point was picked by the documented tie-break.")
    else:
        out.append("none (sweep disabled): the thresholds in the ONNX metadata are the export defaults.")
    out += ["", "### Data", "", f"- fingerprint: `{dataset_fingerprint or 'unknown'}`"]
    for k, v in (dataset_sizes or {}).items():
        out.append(f"- {k}: {v}")
    if gate:
        out += ["", "### Promotion gate", "",
                f"{'passed' if gate.get('passed') else 'failed'}: " + "; ".join(gate.get("reasons") or [])]
    links = [f"[source MLflow run]({source_run_url})" if source_run_url else "",
             f"[Prefect flow run]({flow_run_url})" if flow_run_url else ""]
    if any(links):
        out += ["", "### Links", "", " · ".join(x for x in links if x)]
    return "\n".join(out) + "\n"


def describe_version(client, name: str, version: str | int, markdown: str) -> None:
    """Set ``markdown`` as the registered version's description (the MLflow UI renders it)."""
    client.update_model_version(name, str(version), description=markdown)


def card_step(cfg, run, version, evaluation, sweep, data, candidate: Mapping[str, Any], decision,
              links: Mapping[str, Any] | None = None, damage=None) -> str:
    """Write the model card of the nightly candidate as its version description; returns the markdown.

    Metrics and per-class AP are the candidate's (the compressed variant's when compression chose
    one), the damage-% error is ``damage`` (the registered artifact's, when measured apart) or the
    sweep's, then the sweep's operating point, the data fingerprint and split sizes.
    """
    from damage.tasks.core import tracking
    from damage.tasks.core.links import mlflow_base, mlflow_run_url

    links = links or {}
    metrics = dict(candidate.get("metrics") or evaluation.metrics)
    objective_help, flat = "", False
    if sweep is not None:
        from damage.tasks.evaluation.sweep import OBJECTIVES

        objective_help = OBJECTIVES[sweep.objective].help
        flat = bool(sweep.best.get("flat", False))
    from damage.tasks.data.mlflow_input import dataset_profile

    prof = dataset_profile(data.data_yaml, data.fingerprint)  # cached: counted once per pipeline run
    sizes = {f"images/{k}": v for k, v in prof["splits"].items()}
    sizes.update({f"instances/{k}": v for k, v in prof["instances"].items()})
    c = tracking.client(run.tracking_uri)
    from damage.model_registry.registry import T_PARENT

    damage = damage if damage is not None else getattr(sweep, "damage", None)
    trained_from = (version.tags or {}).get(T_PARENT) if getattr(version, "tags", None) else None
    md = model_card(
        version.name, version.version, metrics, candidate.get("per_class") or getattr(evaluation, "per_class", []),
        sweep.thresholds if sweep is not None else None, objective_help=objective_help, flat_objective=flat,
        dataset_fingerprint=data.fingerprint, dataset_sizes=sizes,
        compressed_from=str(candidate["parent"]) if candidate.get("parent") else None,
        trained_from=trained_from or None,
        damage_pct_mae=getattr(damage, "mae", None),
        kind=str(candidate.get("kind", "trained")), latency_ms=metrics.get("latency_ms"),
        source_run_url=links.get("mlflow_run_url") or mlflow_run_url(
            run.experiment_id, run.run_id, mlflow_base(cfg.mlflow.ui_url, run.tracking_uri)),
        flow_run_url=links.get("prefect_flow_run_url"),
        gate=decision.to_dict() if hasattr(decision, "to_dict") else None,
        family=version.tags.get("model.family") if getattr(version, "tags", None) else None)
    describe_version(c, version.name, version.version, md)
    return md
