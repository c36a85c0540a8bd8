"""A second nightly run builds on the approved first one (issue 12, item 5), on a small setup.

v1 is trained from scratch, staged and approved; the second run (``force``) must start from
v1's ``model.pt`` (fetched through MLflow), record v1 as its parent, and end with every
class's mask AP50 at least v1's on the same val split. The gate of the second run checks the
same thing on the ONNX files (per-class regression, ``registry.class_tolerance=0``).

Slow: two trainings (about 12 min of one idle core in total). ``make test-slow`` runs it.
"""

from __future__ import annotations

import uuid

import pytest

from tests.helpers import NO_FIGURES

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SMALL = [
    "data.synth.images=64", "data.synth.imgsz=96", "data.synth.val_fraction=0.25",
    "train.epochs=12", "train.imgsz=96", *NO_FIGURES, "train.batch=8", "train.augment=light",
    "explain.enabled=false", "explain.samples=0", "export.parity_images=1", "compress.enabled=false",
    "sweep.conf=[0.3, 0.4]", "sweep.iou=[0.5]",
    "mlflow.experiment=finetune-slow",
]
# The registry section is the worker's own (issue 13: a run parameter may not set it), pinned in the environment.
# v1 must reach staging to be approved: no absolute floors on a 12-epoch model; no class may drop at all.
WORKER_REGISTRY = {"floor_mask_map": 0.0, "min_class_ap50": 0.0, "class_tolerance": 0.0}


def test_second_nightly_starts_from_approved_v1_and_keeps_every_class(prefect_harness, state_paths, monkeypatch):
    import json

    from mlflow.tracking import MlflowClient

    import damage.model_registry as mr
    from damage.flows.nightly import nightly

    name = f"finetune-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("DAMAGE_REGISTRY_CONFIG", json.dumps({**WORKER_REGISTRY, "model_name": name}))
    cfg = list(SMALL)
    from tests.helpers import worker_config

    with worker_config(cfg):  # the worker's own --set (issue 31: a run parameter may not carry these)
        first = nightly(force=True)
    assert first["init"]["source"] == "scratch" and "no 'production' version" in first["init"]["reason"]
    v1 = first["registered_version"]
    assert first["promotion"]["passed"], first["promotion"]["reasons"]
    mr.approve(first["tracking_uri"], name, v1, by="test", reason="first model")

    with worker_config(cfg):
        second = nightly(overrides=["train.epochs=8"], force=True)  # an allowlisted run parameter
    assert second["init"]["source"] == "production" and second["init"]["parent_version"] == v1
    c = MlflowClient(second["tracking_uri"])
    v2 = c.get_model_version(name, second["registered_version"])
    assert v2.tags["lineage.parent_version"] == v1 and v2.tags["lineage.init"] == "production"
    parent_run = c.get_run(second["mlflow_run_id"])
    assert parent_run.data.tags["train.init_reason"].startswith(f"fine-tuning from production version {v1}")

    # same val split (same data config and seed): every labelled class at least v1's mask AP50
    before = {r["class"]: r["mask/AP50"] for r in first["per_class"] if r["mask/AP50"] is not None}
    after = {r["class"]: r["mask/AP50"] for r in second["per_class"] if r["mask/AP50"] is not None}
    assert first["dataset_fingerprint"] == second["dataset_fingerprint"] and before.keys() == after.keys()
    worse = {c: (before[c], after[c]) for c in before if after[c] < before[c]}
    assert not worse, f"classes whose mask AP50 dropped from v1 to v2: {worse}"
    # the gate compared the ONNX files class by class against production (v1) with zero tolerance
    assert second["promotion"]["production_version"] == v1
    assert second["promotion"]["passed"], second["promotion"]["reasons"]
