"""The nightly flow's registry steps: register the candidate, then run the automatic gate.

Thin wrappers that pass pipeline objects to ``model_registry.registry`` / ``model_registry.gate``
and log what they decided to the pipeline's MLflow run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model_registry.gate import GateDecision, gate_candidate
from model_registry.registry import T_ARTIFACT_PT, VersionInfo, register_candidate


def _log_pyfunc_model(c, run_id: str, onnx: Path, pt: Path | None) -> tuple[str, str]:
    """Log the version's files as one MLflow pyfunc folder ``model/``: MLmodel, the ONNX (as the
    pyfunc's artifact), the torch-free predictor as code, and ``model.pt`` beside them, so
    ``mlflow models serve -m models:/NAME@production`` serves exactly the registered ONNX."""
    import shutil
    import tempfile

    from tasks.serving.pyfunc import save_pyfunc

    with tempfile.TemporaryDirectory(prefix="pyfunc-") as d:
        folder = save_pyfunc(Path(onnx), Path(d) / "model")
        if pt is not None:
            shutil.copyfile(pt, folder / "model.pt")
        c.log_artifacts(run_id, str(folder), "model")
        onnx_rel = next(p for p in folder.rglob("*.onnx")).relative_to(folder).as_posix()
    return f"{c.get_run(run_id).info.artifact_uri.rstrip('/')}/model", onnx_rel


def register_step(cfg, run, candidate: dict[str, Any], thresholds: dict[str, Any], dataset_fingerprint: str) -> VersionInfo:
    """Register ``candidate`` (weights, onnx, metrics, kind, parent) as a new version with lineage tags."""
    from tasks.core import tracking
    lineage = run.lineage(dataset_fingerprint)
    if candidate.get("parent"):
        lineage["parent_version"] = str(candidate["parent"])
    lineage["variant"] = str(candidate.get("kind", "trained"))
    c = tracking.client(run.tracking_uri)
    version = register_candidate(c, cfg.registry.model_name, run.run_id, candidate["onnx"],
                                 candidate.get("weights"), candidate["metrics"], thresholds, lineage,
                                 log_model_fn=lambda rid, onnx, pt: _log_pyfunc_model(c, rid, onnx, pt))
    if candidate.get("weights"):
        c.set_model_version_tag(version.name, version.version, T_ARTIFACT_PT, f"{version.source}/model.pt")
    tracking.set_tags(c, run.run_id, {"registered_model": cfg.registry.model_name,
                                      "registered_version": version.version})
    return version


def _earlier_decision(tracking_uri: str, name: str, version: str) -> GateDecision | None:
    """The gate decision already recorded on ``version`` (tags ``gate.*``), or None if not gated yet."""
    from model_registry.registry import _version, get_client

    info = _version(get_client(tracking_uri), name, version)
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


def gate_step(cfg, run, version: VersionInfo, data_yaml: Path) -> GateDecision:
    """Compare the candidate with production on the same data now; stage it on a pass.

    A failed gate does not fail the nightly run: the version stays registered with
    ``validation_status=failed`` and the reasons, and nothing moves.
    """
    from tasks.core import tracking
    from tasks.evaluation.evaluate import evaluate_model

    def evaluate_fn(onnx: Path) -> dict[str, float]:
        return evaluate_model(onnx, data_yaml, split=cfg.evaluate.split, imgsz=cfg.train.imgsz,
                              conf=cfg.evaluate.conf, iou=cfg.evaluate.iou, max_det=cfg.evaluate.max_det).metrics

    done = _earlier_decision(run.tracking_uri, cfg.registry.model_name, version.version)
    if done is not None:  # a retried flow run: the gate already judged this version, never twice
        return done
    with tracking.step_run(run.run_id, "promotion-gate") as (c, run_id):
        decision = gate_candidate(run.tracking_uri, cfg.registry.model_name, version.version, evaluate_fn,
                                  cfg.registry, work_dir=run.root)
        tracking.log_metrics(c, run_id, decision.figures())
        tracking.set_tags(c, run_id, {"gate.decision": "passed" if decision.passed else "failed",
                                      "gate.reasons": "; ".join(decision.reasons),
                                      "gate.production_version": decision.production_version or "none"})
        tracking.set_tags(c, run.run_id, {"gate.decision": "passed" if decision.passed else "failed"})
    return decision
