"""The demo recipe end to end: `damage run --demo` on a fresh state dir learns every damage class.

Slow (at most 15 min on an idle 2-core CPU: the demo trains for a wall-time budget): ``make test-slow`` or
``pytest -m slow tests/integration/test_demo_recipe.py``. It runs the same command ``make demo``
runs, in a subprocess with its own fresh ``DAMAGE_STATE_DIR``, and reads the summary the CLI
writes (``last_run.json``: the evaluator's per-class table on the synthetic val split, conf floor
0.001). Targets: overall mask mAP50 >= 0.5, every damage class mask AP50 >= 0.3, per-vehicle damage-percentage
MAE <= 5 percentage points at the operating point; the demo's MLflow store holds the INT8 variant run with
its measured metrics. The 15-minute wall-time target is printed, not asserted: it holds on an idle
machine only.

The same targets hold at **half the compute** (issue 34, item 4): ``--set train.time_min=5.5``, half the training
wall time, so about half the epochs, as on a CPU half as fast (``half_demo``). Not at one torch thread: on 2 cores
one thread still trained 47 epochs against 56 (issue 34's table), so it is no proxy for half the compute.
And on **whole scenes** (the full demo's ``evaluate.extra_sets``: 640-px whole scenes, sliced, at the tuned
``damage.sliced_conf``): every damage class mask AP50 >= 0.4 and a per-vehicle damage-% MAE <= 4 pp.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from damage.tasks.core.config import CLASSES

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
DAMAGE = [c for c in CLASSES if c != "vehicle"]


def _run_demo(state: Path, *extra: str) -> dict:
    env = {**os.environ, "DAMAGE_STATE_DIR": str(state), "PYTHONPATH": str(ROOT)}
    for k in ("PREFECT_HOME", "PREFECT_API_URL", "MLFLOW_TRACKING_URI"):  # the test session's, not the demo's
        env.pop(k, None)
    cmd = [sys.executable, "-m", "damage.flows.cli", "run", "--demo", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((state / "last_run.json").read_text())
    summary["_state"] = str(state)
    return summary


@pytest.fixture(scope="module")
def full_demo(tmp_path_factory) -> dict:
    return _run_demo(tmp_path_factory.mktemp("demo_state"))


@pytest.fixture(scope="module")
def half_demo(tmp_path_factory) -> dict:
    return _run_demo(tmp_path_factory.mktemp("half_demo_state"), "--set", "train.time_min=5.5")


BUDGETS = pytest.mark.parametrize("budget", ["full_demo", "half_demo"])


@BUDGETS
def test_demo_learns_every_damage_class(budget, request):
    demo_summary = request.getfixturevalue(budget)
    rows = {r["class"]: r for r in demo_summary["per_class"]}
    ap = {c: rows[c]["mask/AP50"] for c in DAMAGE}
    print(f"{budget}: {demo_summary['epochs_run']} epochs, wall time {demo_summary['wall_time_s'] / 60:.1f} min; "
          f"mask AP50 {ap}")
    assert all(rows[c]["instances"] > 0 for c in DAMAGE), "the val split must hold every damage class"
    missed = {c: round(v, 3) for c, v in ap.items() if v is None or v < 0.3}
    assert not missed, f"damage classes under 0.3 mask AP50: {missed}"


@BUDGETS
def test_demo_overall_mask_map50(budget, request):
    assert request.getfixturevalue(budget)["metrics"]["mask/mAP50"] >= 0.5


@BUDGETS
def test_demo_damage_percentage_error(budget, request):
    dmg = request.getfixturevalue(budget)["damage_pct_mae"]
    assert dmg["vehicles"] > 0 and dmg["mae"] is not None
    assert dmg["mae"] <= 5.0, dmg


def _run_metrics(summary: dict) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{summary['_state']}/mlflow.db").get_run(summary["mlflow_run_id"]).data.metrics


def test_demo_whole_scene_targets(full_demo):
    """Whole-vehicle photos, sliced at the tuned confidence: every damage class >= 0.4, damage-% MAE <= 4 pp.
    The letterboxed figures of the same model are printed beside them (measured in the same run)."""
    m = _run_metrics(full_demo)
    sliced = {c: m[f"whole/mask_ap50/{c}"] for c in DAMAGE}
    print(f"whole scenes, sliced at conf {m['whole/sliced_conf']}: {sliced}, MAE {m['whole/damage_pct_mae']:.2f} pp; "
          f"letterboxed: mAP50 {m['whole_unsliced/mask/mAP50']:.3f}, MAE {m['whole_unsliced/damage_pct_mae']:.2f} pp")
    assert "whole_unsliced/mask/mAP50" in m  # the comparison was measured
    missed = {c: round(v, 3) for c, v in sliced.items() if not v >= 0.4}
    assert not missed, f"whole-scene damage classes under 0.4 mask AP50 (sliced): {missed}"
    assert m["whole/damage_pct_mae"] <= 4.0


def test_demo_logs_the_int8_variant(full_demo):
    """The demo ran the accuracy-aware INT8 variant: its run in the demo's MLflow store has measured metrics."""
    from mlflow.tracking import MlflowClient

    demo_summary = full_demo
    comp = demo_summary["compression"]
    assert comp and comp["table"] and Path(comp["table"]).is_file()
    c = MlflowClient(f"sqlite:///{demo_summary['_state']}/mlflow.db")
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()],
                         filter_string="tags.`damage.variant.kind` = 'int8-static'")
    assert runs, "no int8-static variant run in the demo's MLflow store"
    m = runs[0].data.metrics
    assert 0.0 < m["mask/mAP50"] <= 1.0 and m["latency_ms"] > 0
