"""The nightly flow's registry steps: where training starts (``train.init``), register the
candidate, then run the automatic gate.

Thin wrappers that pass pipeline objects to ``damage.model_registry.registry`` / ``damage.model_registry.gate``
and log what they decided to the pipeline's MLflow run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from damage.model_registry.gate import GateDecision, gate_candidate
from damage.model_registry.registry import T_ARTIFACT_PT, T_PARENT, VersionInfo, register_candidate

if TYPE_CHECKING:
    from damage.tasks.core.config import TrainConfig
    from damage.tasks.training.init import InitDecision

log = logging.getLogger(__name__)


def log_pyfunc_model(c, run_id: str, onnx: Path, pt: Path | None, logged_ids: list[str] | None = None
                     ) -> tuple[str, str]:
    """Log the version's files as one MLflow pyfunc folder ``model/``: MLmodel, the ONNX (as the
    pyfunc's artifact), the torch-free predictor as code, and ``model.pt`` beside them, so
    ``mlflow models serve -m models:/NAME@production`` serves exactly the registered ONNX.

    The same folder is also an MLflow 3 *logged model* of the run (the experiment's Models tab lists
    it); its id is appended to ``logged_ids`` (``link_logged_model`` then names the version on it).
    Returns ``(source URI, ONNX path inside it)`` for ``register_candidate``.
    """
    import shutil
    import tempfile

    from damage.tasks.serving.pyfunc import save_pyfunc

    with tempfile.TemporaryDirectory(prefix="pyfunc-") as d:
        folder = save_pyfunc(Path(onnx), Path(d) / "model")
        if pt is not None:
            shutil.copyfile(pt, folder / "model.pt")
        c.log_artifacts(run_id, str(folder), "model")
        onnx_rel = next(p for p in folder.rglob("*.onnx")).relative_to(folder).as_posix()
        run = c.get_run(run_id)
        logged = c.create_logged_model(run.info.experiment_id, name="model", source_run_id=run_id,
                                       model_type="pyfunc (ONNX instance segmentation)")
        c.log_model_artifacts(logged.model_id, str(folder))
        c.finalize_logged_model(logged.model_id, "READY")
        from mlflow.entities import LoggedModelOutput

        c.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])  # the run page lists it
    if logged_ids is not None:
        logged_ids.append(logged.model_id)
    return f"{run.info.artifact_uri.rstrip('/')}/model", onnx_rel


def link_logged_model(c, model_id: str, name: str, version: str) -> None:
    """Name the registered version on its logged model (tag ``mlflow.modelVersions``, as
    ``mlflow.register_model`` does), so the Models tab links the model to the version."""
    import json

    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    earlier = c.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS)
    entries = [*(json.loads(earlier) if earlier else []), {"name": name, "version": str(version)}]
    c.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(entries)})


def init_step(cfg, run, data_yaml: Path) -> tuple[TrainConfig, InitDecision]:
    """Resolve ``train.init`` for this run: the training config to use and the decision.

    Logs the decision (one line, with the reason) and tags the pipeline run ``train.init``
    (scratch|production|path), ``train.init_reason`` and ``lineage.parent_version``.
    """
    from damage.model_registry.init import resolve_init
    from damage.tasks.core import tracking
    from damage.tasks.data.dataset import load_data_yaml
    from damage.tasks.training.init import apply

    decision = resolve_init(run.tracking_uri, cfg.registry.model_name, cfg.train, load_data_yaml(data_yaml).names,
                            run.root / "init")
    log.info("train.init=%s: %s", cfg.train.init, decision.reason)
    print(f"train.init={cfg.train.init}: {decision.reason}")
    tracking.set_tags(tracking.client(run.tracking_uri), run.run_id, {
        "train.init": decision.source, "train.init_reason": decision.reason,
        "lineage.parent_version": decision.parent_version or "none"})
    return apply(cfg.train, decision), decision


def version_lineage(run, dataset_fingerprint: str, candidate: dict[str, Any],
                    init: InitDecision | None = None) -> dict[str, str]:
    """Lineage tags of a new version: the run's, the variant and the compression-table variant it was
    made from (``compressed_from``: a variant *name* of the source run, ``parent`` = the run's trained
    model; never a version number), and (with ``init``) ``lineage.parent_version`` (production
    version its training started from, ``none`` from scratch or a file) and ``lineage.init``
    (scratch|production|path)."""
    lineage = run.lineage(dataset_fingerprint)
    if candidate.get("parent"):
        lineage["compressed_from"] = str(candidate["parent"])
    lineage["variant"] = str(candidate.get("kind", "trained"))
    if candidate.get("onnx"):  # the exported file names its family (damage.family, written by export_onnx)
        from damage.tasks.export.onnx import read_onnx_metadata

        lineage["model.family"] = str(read_onnx_metadata(Path(candidate["onnx"])).get("family", "unknown"))
    if init is not None:
        lineage[T_PARENT] = init.parent_version or "none"
        lineage["lineage.init"] = init.source
    return lineage


def register_step(cfg, run, candidate: dict[str, Any], thresholds: dict[str, Any], dataset_fingerprint: str,
                  init: InitDecision | None = None) -> VersionInfo:
    """Register ``candidate`` (weights, onnx, metrics, kind, parent) as a new version with lineage tags.

    With ``init`` the version also records where its training started: ``lineage.parent_version``
    (the production version it was fine-tuned from, ``none`` from scratch) and ``lineage.init``.
    """
    from damage.tasks.core import tracking
    lineage = version_lineage(run, dataset_fingerprint, candidate, init)
    c = tracking.client(run.tracking_uri)
    logged: list[str] = []
    version = register_candidate(c, cfg.registry.model_name, run.run_id, candidate["onnx"],
                                 candidate.get("weights"), candidate["metrics"], thresholds, lineage,
                                 log_model_fn=lambda rid, onnx, pt: log_pyfunc_model(c, rid, onnx, pt, logged))
    if logged:  # a retried task finds its version and logs nothing new
        link_logged_model(c, logged[0], version.name, version.version)
        c.set_model_version_tag(version.name, version.version, "logged_model_id", logged[0])
    if candidate.get("weights"):
        c.set_model_version_tag(version.name, version.version, T_ARTIFACT_PT, f"{version.source}/model.pt")
    tracking.set_tags(c, run.run_id, {"registered_model": cfg.registry.model_name,
                                      "registered_version": version.version})
    return version


def _earlier_decision(tracking_uri: str, name: str, version: str) -> GateDecision | None:
    """The gate decision already recorded on ``version`` (tags ``gate.*``), or None if not gated yet."""
    from damage.model_registry.registry import get_client, version_info

    info = version_info(get_client(tracking_uri), name, version)
    if info.validation_status not in ("passed", "failed") or info.approval != "pending":
        return None

    def figures(side: str) -> dict[str, float]:
        p = f"gate.{side}."
        return {k[len(p):]: float(v) for k, v in info.tags.items() if k.startswith(p)}

    prod = info.tags.get("gate.production_version")
    return GateDecision(name, version, info.validation_status == "passed",
                        [r for r in info.tags.get("gate.reasons", "").split("; ") if r], figures("candidate"),
                        figures("production") or None, None if prod in (None, "none") else prod,
                        at=info.tags.get("gate.at", ""))


def gate_evaluate_fn(cfg, data_yaml: Path):
    """The gate's evaluator: ``Evaluator.from_config(cfg)`` on ``data_yaml``, every class's mask AP50 included.

    ``cfg`` is the worker's (``damage.tasks.core.run_params``): a run parameter never picks the evaluator or its settings.
    """
    from damage.tasks.core.runtime import StatePaths, resolve_state_dir
    from damage.tasks.evaluation.evaluate import Evaluator
    from damage.tasks.evaluation.extra_sets import extra_sets_metrics, gate_sets
    from damage.tasks.evaluation.metrics import class_metrics

    evaluator = Evaluator.from_config(cfg)
    # extra sets the gate floors on: candidate and production scored on them the same way, sliced only
    extra = gate_sets(cfg.evaluate.extra_sets, cfg.registry.extra_min_class_ap50)
    datasets = StatePaths(resolve_state_dir(cfg.state_dir)).datasets

    def evaluate_fn(onnx: Path) -> dict[str, float]:
        res = evaluator(onnx, data_yaml)
        # every class of the model, NaN where the data has no instance: the gate fails such a class closed
        return {**res.metrics, **class_metrics(res.per_class, missing=float("nan")),
                **extra_sets_metrics(onnx, extra, datasets, cfg.evaluate.conf, cfg.evaluate.iou)}

    return evaluate_fn


def gate_step(cfg, run, version: VersionInfo, data_yaml: Path) -> GateDecision:
    """Compare the candidate with production on the same data now; stage it on a pass.

    A failed gate does not fail the nightly run: the version stays registered with
    ``validation_status=failed`` and the reasons, and nothing moves.
    """
    from damage.tasks.core import tracking

    evaluate_fn = gate_evaluate_fn(cfg, data_yaml)
    done = _earlier_decision(run.tracking_uri, cfg.registry.model_name, version.version)
    if done is not None:  # a retried flow run: the gate already judged this version, never twice
        return done
    with tracking.step_run(run.run_id, "promotion-gate") as (c, run_id):
        decision = gate_candidate(run.tracking_uri, cfg.registry.model_name, version.version, evaluate_fn,
                                  cfg.registry, work_dir=run.root)
        tracking.log_metrics(c, run_id, decision.figures())
        failed = ",".join(decision.failed_classes) or "none"
        tracking.set_tags(c, run_id, {"gate.decision": "passed" if decision.passed else "failed",
                                      "gate.reasons": "; ".join(decision.reasons),
                                      "gate.failed_classes": failed,
                                      "gate.production_version": decision.production_version or "none"})
        tracking.set_tags(c, run.run_id, {"gate.decision": "passed" if decision.passed else "failed",
                                          "gate.failed_classes": failed})
    verdict = "passed -> staging" if decision.passed else "FAILED (stays pending)"
    print(f"promotion gate: version {version.version} {verdict}"
          + (f"; failing classes: {', '.join(decision.failed_classes)}" if decision.failed_classes else ""))
    return decision
