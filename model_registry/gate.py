"""The automatic promotion gate: candidate vs. current production, same data, same call.

``gate_candidate`` downloads the candidate's ONNX and the production version's ONNX, scores
both with the one ``evaluate_fn`` it is given (so both see the same validation data, the same
evaluator settings and the same machine for latency), compares them with ``compare`` and, on
a pass, moves ``staging`` to the candidate. The decision and both sides' figures are stored
as ``gate.*`` tags on the candidate version and returned for logging to the MLflow run.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlflow.tracking import MlflowClient

from damage.model_registry.errors import PromotionRefused, RegistryError
from damage.model_registry.frozen import approved_file, fetch_approved
from damage.model_registry.moves import set_staging
from damage.model_registry.registry import (
    PRODUCTION,
    T_VALIDATION,
    alias_version,
    download_onnx,
    get_client,
    now_iso,
    set_version_tags,
    version_info,
)
from damage.tasks.core.config import RegistryConfig
from damage.tasks.core.display import fmt_metric
from damage.tasks.core.errors import GateFailed

MASK = "mask/mAP50-95"
BOX = "box/mAP50-95"
LATENCY = "latency_ms"
GATE_KEYS = (MASK, BOX, LATENCY)
CLASS_PREFIX = "mask_ap50/"  # per-class mask AP50 from the evaluator: "mask_ap50/<class>"; NaN = no labels
DEFAULT_CLASS_FLOOR = 0.1  # floor of a class that a mapping-style registry.min_class_ap50 does not list

EvaluateFn = Callable[[Path], Mapping[str, float]]


@dataclass(frozen=True)
class GateDecision:
    """Outcome of the gate for one candidate version."""

    model_name: str
    version: str
    passed: bool
    reasons: list[str]
    candidate: dict[str, float]
    production: dict[str, float] | None = None
    production_version: str | None = None
    tolerance: float = 0.0
    latency_budget_ms: float | None = None
    floor_mask_map: float = 0.0
    failed_classes: list[str] = field(default_factory=list)
    at: str = field(default_factory=now_iso)

    def figures(self) -> dict[str, float]:
        """Flat numbers for ``log_metrics``: ``gate.candidate.*``, ``gate.production.*``, ``gate.passed``."""
        out = {f"gate.candidate.{k}": v for k, v in self.candidate.items()}
        out.update({f"gate.production.{k}": v for k, v in (self.production or {}).items()})
        out["gate.passed"] = 1.0 if self.passed else 0.0
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    def raise_if_failed(self) -> None:
        """Raise ``GateFailed`` with the reasons when the candidate did not pass."""
        if not self.passed:
            raise GateFailed(f"'{self.model_name}' version {self.version} failed the promotion gate: "
                             + "; ".join(self.reasons))


def class_floors(spec: float | Mapping[str, float], classes: list[str]) -> dict[str, float]:
    """Resolve ``registry.min_class_ap50`` into one floor per class.

    Args:
        spec: one floor for every class, or a mapping class -> floor (unlisted classes get
            ``DEFAULT_CLASS_FLOOR``).
        classes: the classes the evaluator reported.

    Raises:
        RegistryError: the mapping names a class the model does not have (a typo must not
            silently switch a floor off).

    Example:
        >>> class_floors({"dent": 0.3}, ["vehicle", "dent"])
        {'vehicle': 0.1, 'dent': 0.3}
    """
    if not isinstance(spec, Mapping):
        return {c: float(spec) for c in classes}
    unknown = sorted(set(spec) - set(classes))
    if unknown:
        raise RegistryError(f"registry.min_class_ap50 names {', '.join(unknown)}, not a class of the model "
                            f"(classes: {', '.join(classes) or 'none reported'})")
    return {c: float(spec.get(c, DEFAULT_CLASS_FLOOR)) for c in classes}


def class_values(metrics: Mapping[str, float]) -> dict[str, float]:
    """``{"mask_ap50/dent": 0.4, ...}`` -> ``{"dent": 0.4, ...}`` (NaN kept: no labelled instance)."""
    return {k[len(CLASS_PREFIX):]: float(v) for k, v in metrics.items() if k.startswith(CLASS_PREFIX)}


def class_checks(candidate: Mapping[str, float], production: Mapping[str, float] | None,
                 floors: Mapping[str, float], tolerance: float) -> list[tuple[str, bool, str]]:
    """Per-class verdicts ``(class, passed, reason)`` on mask AP50: floor, then regression vs production.

    A class fails when its AP50 is under its floor, when it has a floor > 0 but no labelled
    instance in the data (its floor cannot be checked: fail closed), or when it is more than
    ``tolerance`` below production's AP50 for the class on the same data.

    Example:
        >>> class_checks({"mask_ap50/dent": 0.05}, None, {"dent": 0.1}, 0.01)
        [('dent', False, 'class dent: mask AP50 0.050 < floor 0.100')]
    """
    cand, prod = class_values(candidate), class_values(production or {})
    out = []
    for c, floor in floors.items():
        v = cand.get(c, math.nan)
        if not math.isfinite(v):
            ok = floor <= 0
            out.append((c, ok, f"class {c}: no labelled instance in the gate's data, "
                               + ("floor off" if ok else f"floor {fmt_metric(floor)} cannot be checked")))
            continue
        if v < floor:
            out.append((c, False, f"class {c}: mask AP50 {fmt_metric(v)} < floor {fmt_metric(floor)}"))
            continue
        p = prod.get(c, math.nan)
        if production is not None and math.isfinite(p) and v < p - tolerance:
            out.append((c, False, f"class {c}: mask AP50 {fmt_metric(v)} vs production {fmt_metric(p)}: dropped "
                                  f"{fmt_metric(p - v)} > tolerance {tolerance:g}"))
            continue
        out.append((c, True, f"{c} {fmt_metric(v)}"
                    + (f" (production {fmt_metric(p)})" if math.isfinite(p) else "")))
    return out


def extra_floors(spec: Mapping[str, float | Mapping[str, float]], classes: list[str]) -> dict[str, float]:
    """``registry.extra_min_class_ap50`` (set name -> floors, each like ``min_class_ap50``) as metric-key floors.

    Example:
        >>> extra_floors({"whole": {"dent": 0.4}}, ["vehicle", "dent"])
        {'whole/mask_ap50/vehicle': 0.1, 'whole/mask_ap50/dent': 0.4}
    """
    return {f"{name}/{CLASS_PREFIX}{c}": f for name, floors in spec.items()
            for c, f in class_floors(floors, classes).items()}


def extra_checks(candidate: Mapping[str, float], floors: Mapping[str, float]) -> list[tuple[str, bool, str]]:
    """Verdicts ``(metric, passed, reason)`` of the extra-set floors: under its floor, or no figure for a
    floor > 0 (the set was not scored, or has no instance of the class: fail closed), fails."""
    out = []
    for key, floor in floors.items():
        v = float(candidate.get(key, math.nan))
        if not math.isfinite(v):
            out.append((key, floor <= 0, f"{key}: no figure ({'floor off' if floor <= 0 else 'floor cannot be checked'})"))
        else:
            good = v >= floor
            out.append((key, good, f"{key} {fmt_metric(v)} {'>=' if good else '<'} floor {fmt_metric(floor)}"))
    return out


def compare(candidate: Mapping[str, float], production: Mapping[str, float] | None, *, tolerance: float,
            latency_budget_ms: float | None, floor_mask_map: float,
            min_class_ap50: Mapping[str, float] | None = None,
            class_tolerance: float | None = None,
            extra_min_class_ap50: Mapping[str, float] | None = None) -> tuple[bool, list[str]]:
    """The gate rule as a pure function: ``(passed, reasons)``; reasons explain every check.

    With a production version: candidate mask and box mAP50-95 may each be at most ``tolerance``
    below production's. Without one: candidate mask mAP50-95 must reach ``floor_mask_map``.
    Per class (``min_class_ap50``: class -> floor, see ``class_checks``; None = no per-class
    check, for callers that compare aggregates only): mask AP50 must reach
    the class's floor and may be at most ``class_tolerance`` (default ``tolerance``) below
    production's; each failing class gets its own reason, the passing ones share one line. With
    floors given but no per-class figure from the evaluator, the candidate fails: aggregate
    metrics alone never stage a model.
    Extra evaluation sets (``extra_min_class_ap50``: metric key -> floor, ``extra_floors``): each
    figure must reach its floor (``extra_checks``).
    Always: candidate latency must not exceed ``latency_budget_ms`` (when set).

    Example:
        >>> compare({"mask/mAP50-95": .30, "box/mAP50-95": .35, "latency_ms": 9}, None,
        ...         tolerance=.01, latency_budget_ms=None, floor_mask_map=.05)
        (True, ['mask/mAP50-95 0.300 >= floor 0.050 (no production version)'])
        >>> ok, why = compare({"mask/mAP50-95": .30, "box/mAP50-95": .35, "latency_ms": 9,
        ...                    "mask_ap50/vehicle": .9, "mask_ap50/dent": 0.0}, None, tolerance=.01,
        ...                   latency_budget_ms=None, floor_mask_map=.05,
        ...                   min_class_ap50={"vehicle": .1, "dent": .1})
        >>> ok, why[1:]
        (False, ['class dent: mask AP50 0.000 < floor 0.100', 'per-class mask AP50 ok: vehicle 0.900'])
    """
    ok, reasons = True, []
    if production is None:
        good = candidate[MASK] >= floor_mask_map
        ok &= good
        reasons.append(f"{MASK} {fmt_metric(candidate[MASK])} {'>=' if good else '<'} "
                       f"floor {fmt_metric(floor_mask_map)} "
                       f"(no production version)")
    else:
        for key in (MASK, BOX):
            limit = production[key] - tolerance
            good = candidate[key] >= limit
            ok &= good
            reasons.append(f"{key} {fmt_metric(candidate[key])} vs production {fmt_metric(production[key])}: "
                           f"{'within' if good else 'worse than'} tolerance {tolerance:g}")
    if min_class_ap50 is not None:
        if not class_values(candidate):
            ok = False
            reasons.append("no per-class mask AP50 from the evaluator: aggregate metrics alone never stage a model")
        else:
            checks = class_checks(candidate, production, min_class_ap50,
                                  tolerance if class_tolerance is None else class_tolerance)
            ok &= all(good for _, good, _ in checks)
            reasons += [why for _, good, why in checks if not good]
            passing = [why for _, good, why in checks if good]
            if passing:
                reasons.append("per-class mask AP50 ok: " + ", ".join(passing))
    if extra_min_class_ap50:
        checks = extra_checks(candidate, extra_min_class_ap50)
        ok &= all(good for _, good, _ in checks)
        reasons += [why for _, good, why in checks if not good]
        if any(good for _, good, _ in checks):
            reasons.append("extra-set floors ok: " + ", ".join(why for _, good, why in checks if good))
    if latency_budget_ms is not None:
        good = candidate[LATENCY] <= latency_budget_ms
        ok &= good
        reasons.append(f"{LATENCY} {fmt_metric(candidate[LATENCY], LATENCY)} {'<=' if good else '>'} "
                       f"budget {latency_budget_ms:g}")
    return bool(ok), reasons


def failed_classes(candidate: Mapping[str, float], production: Mapping[str, float] | None,
                   floors: Mapping[str, float], tolerance: float) -> list[str]:
    """The classes ``class_checks`` fails, in floor order (``gate.failed_classes``)."""
    return [c for c, good, _ in class_checks(candidate, production, floors, tolerance) if not good]


def _checked(metrics: Mapping[str, float], side: str, onnx: Path) -> dict[str, float]:
    missing = [k for k in GATE_KEYS if k not in metrics]
    if missing:
        raise RegistryError(f"evaluator returned no {', '.join(missing)} for the {side} model {onnx.name}")
    out = {k: float(metrics[k]) for k in GATE_KEYS}
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if bad:
        raise RegistryError(f"evaluator returned non-finite {', '.join(bad)} for the {side} model {onnx.name}")
    # per-class AP, NaN = no labels; also an extra set's ("<set>/mask_ap50/<class>", evaluate.extra_sets)
    out.update({k: float(v) for k, v in metrics.items() if k.startswith(CLASS_PREFIX) or f"/{CLASS_PREFIX}" in k})
    return out


def gate_candidate(client: MlflowClient | str, model_name: str, version: str | int, evaluate_fn: EvaluateFn,
                   cfg: RegistryConfig, *, by: str = "gate", work_dir: str | Path | None = None) -> GateDecision:
    """Evaluate the candidate and production on the same data now; stage the candidate on a pass.

    Args:
        client: client or tracking URI.
        model_name: registered model name.
        version: candidate version (``approval`` must still be ``pending``).
        evaluate_fn: ``onnx_path -> {"mask/mAP50-95", "box/mAP50-95", "latency_ms",
            "mask_ap50/<class>" (one per class of the model, NaN when the data has no instance of
            it), ...}``; called for the candidate and then the production version.
        cfg: ``registry:`` section (tolerance, latency budget, floors, per-class floors and
            tolerance, lock timeout).
        by: recorded as the mover of ``staging`` in the history.
        work_dir: where to download the ONNX files (default: a temporary directory).

    Returns:
        The decision; ``validation_status`` and ``gate.*`` tags (``gate.failed_classes`` names the
        classes under their floor or regressed, ``none`` when none) are set on the version either way.

    Raises:
        PromotionRefused: the version was already approved or rejected, or already failed the gate.
    """
    c = get_client(client)
    version = str(version)
    info = version_info(c, model_name, version)
    if info.approval != "pending":
        raise PromotionRefused(f"'{model_name}' version {version} is already {info.approval}; the gate only "
                               f"judges pending versions")
    if info.validation_status == "failed":  # no second opinion: a failed version stays failed
        raise PromotionRefused(f"'{model_name}' version {version} already failed the gate "
                               f"({info.tags.get('gate.reasons', 'no reasons recorded')}); a failed version is "
                               f"never re-gated, register a new version")
    prod_version = alias_version(c, model_name, PRODUCTION)
    if prod_version == version:
        prod_version = None
    with tempfile.TemporaryDirectory(prefix="gate-", dir=work_dir) as d:
        cand_onnx = download_onnx(c, model_name, version, Path(d, "candidate"))
        cand = _checked(evaluate_fn(cand_onnx), "candidate", cand_onnx)
        prod = None
        if prod_version is not None:  # production's approved, hash-verified copy (alias checked against the record)
            prod_onnx = approved_file(fetch_approved(c, model_name, PRODUCTION, Path(d, "production")), ".onnx")
            prod = _checked(evaluate_fn(prod_onnx), "production", prod_onnx)
    classes = list(class_values(cand))
    floors = class_floors(cfg.min_class_ap50, classes) if classes else {}
    class_tol = cfg.tolerance if cfg.class_tolerance is None else cfg.class_tolerance
    extra = extra_floors(cfg.extra_min_class_ap50, classes) if classes else {}
    passed, reasons = compare(cand, prod, tolerance=cfg.tolerance, latency_budget_ms=cfg.latency_budget_ms,
                              floor_mask_map=cfg.floor_mask_map, min_class_ap50=floors, class_tolerance=class_tol,
                              extra_min_class_ap50=extra)
    failed = failed_classes(cand, prod, floors, class_tol)
    decision = GateDecision(model_name, version, passed, reasons, cand, prod, prod_version, cfg.tolerance,
                            cfg.latency_budget_ms, cfg.floor_mask_map, failed)
    tags: dict[str, object] = {f"gate.candidate.{k}": repr(v) for k, v in cand.items()}
    tags.update({f"gate.production.{k}": repr(v) for k, v in (prod or {}).items()})
    tags.update({"gate.decision": "passed" if passed else "failed", "gate.reasons": "; ".join(reasons)[:5000],
                 "gate.failed_classes": ",".join(failed) or "none", "gate.class_tolerance": class_tol,
                 "gate.min_class_ap50": ",".join(f"{c}={f:g}" for c, f in floors.items()) or "none",
                 "gate.production_version": prod_version or "none", "gate.tolerance": cfg.tolerance,
                 "gate.latency_budget_ms": "none" if cfg.latency_budget_ms is None else cfg.latency_budget_ms,
                 "gate.floor_mask_map": cfg.floor_mask_map,
                 "gate.at": decision.at, T_VALIDATION: "passed" if passed else "failed"})
    set_version_tags(c, model_name, version, tags)
    if passed:
        set_staging(c, model_name, version, by=by, reason="; ".join(reasons), lock_timeout_s=cfg.lock_timeout_s)
    return decision
