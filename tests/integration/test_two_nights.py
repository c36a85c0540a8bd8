"""The two-night promise in the default run, on tiny data: a nightly registers v1, a person approves it, the
next nightly fine-tunes from production (v1) and its parent guard keeps the epoch its rule picks.

``test_nightly_finetune.py`` checks the same on a larger setup (slow). Here the models are barely trained,
so "no class worse" is not asserted as an outcome (on 4 val images a class can drop whatever the code
does); what is asserted is that the guard measured the parent as the gate's evaluator does, judged every
epoch, chose by its rule, and that the registered checkpoint is the chosen one.
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import pytest

from tests.helpers import NO_FIGURES

pytestmark = pytest.mark.integration

TINY = ["data.synth.images=16", "data.synth.imgsz=64", "data.synth.val_fraction=0.25", "train.epochs=1",
        "train.imgsz=64", *NO_FIGURES,
        "train.batch=8", "sweep.conf=[0.3]", "sweep.iou=[0.5]", "explain.enabled=false",
        "explain.samples=0", "export.parity_images=1", "compress.enabled=false", "label_issues.enabled=false",
        "mlflow.experiment=two-nights"]
# The registry section is the worker's (issue 13), pinned in the environment: no absolute floors (v1 must
# reach staging to be approved), no class may drop against production.
WORKER_REGISTRY = {"floor_mask_map": 0.0, "min_class_ap50": 0.0, "class_tolerance": 0.0}
NIGHT2_EPOCHS = 2


def _aps(summary: dict) -> dict[str, float]:
    """``mask_ap50/<class>`` of a run summary's per-class table (classes with labels in val)."""
    return {f"mask_ap50/{r['class']}": r["mask/AP50"] for r in summary["per_class"] if r["mask/AP50"] is not None}


def test_second_night_fine_tunes_from_the_approved_version(prefect_harness, state_paths, monkeypatch, tmp_path):
    from mlflow.tracking import MlflowClient

    import damage.model_registry as mr
    from damage.flows.nightly import nightly
    from damage.tasks.evaluation.metrics import worst_class_drop
    from damage.tasks.training.guard import GUARD_FILE, GuardState

    name = f"two-nights-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("DAMAGE_REGISTRY_CONFIG", json.dumps({**WORKER_REGISTRY, "model_name": name}))
    # a store of its own: nothing an earlier session recorded (skip-unchanged, production) can interfere
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")

    from tests.helpers import worker_config

    with worker_config(TINY):  # the worker's own --set (issue 31: a run parameter may not carry these)
        first = nightly(force=True)
    assert first["init"]["source"] == "scratch"
    v1 = first["registered_version"]
    assert first["promotion"]["passed"], first["promotion"]["reasons"]
    mr.approve(first["tracking_uri"], name, v1, by="test", reason="first model")

    with worker_config([*TINY, f"train.epochs={NIGHT2_EPOCHS}"]):
        second = nightly(force=True)
    # it started from production, and says so on the version and on the run
    assert second["init"]["source"] == "production" and second["init"]["parent_version"] == v1
    c = MlflowClient(second["tracking_uri"])
    v2 = c.get_model_version(name, second["registered_version"])
    assert v2.tags["lineage.parent_version"] == v1 and v2.tags["lineage.init"] == "production"
    run_tags = c.get_run(second["mlflow_run_id"]).data.tags
    assert run_tags["train.init_reason"].startswith(f"fine-tuning from production version {v1}")

    # the parent guard: v1 measured as the gate's evaluator measured it on night 1 (same split, same weights)
    state = GuardState.load(Path(second["best_weights"]).parent.parent / GUARD_FILE)
    assert state is not None, "the fine-tune ran without its parent guard"
    before, after = _aps(first), _aps(second)
    assert before.keys() == after.keys() and before  # same val split: the same labelled classes
    # (a class without labelled instances is NaN in the evaluator's figures: the gate fails closed on it)
    assert {k: v for k, v in state.parent.items() if math.isfinite(v)} == pytest.approx(before, abs=1e-9)
    # every epoch judged, and the choice is its rule's: qualified first, then fitness (else the smallest
    # worst drop), ties to the later epoch
    assert [e.epoch for e in state.epochs] == list(range(NIGHT2_EPOCHS)) == list(range(second["epochs_run"]))
    rule = max(reversed(state.epochs), key=lambda e: (e.qualified, e.fitness if e.qualified else -e.worst_drop))
    assert state.chosen is rule and sum(e.chosen for e in state.epochs) == 1
    # the registered checkpoint is the chosen epoch: its per-class figures give the drop the guard recorded
    _, drop = worst_class_drop(before, after)
    assert drop == pytest.approx(rule.worst_drop, abs=1e-9)
    if rule.qualified:  # an epoch lost no class: none is worse on the registered version
        assert all(after[k] >= before[k] for k in before), (before, after)
    assert second["promotion"]["production_version"] == v1  # the gate compared against the approved version
