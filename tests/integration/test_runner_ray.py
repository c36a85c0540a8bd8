"""``runner: ray``: the nightly's independent steps (label issues, the sweep, explain, the measurement of each
compression variant) run as Ray tasks through prefect-ray's RayTaskRunner. The MLflow runs, the registered
version and the summary are those of the in-process runner, timestamps, durations and ids aside."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import uuid

import pytest

from tests.helpers import NO_FIGURES, worker_config

pytestmark = pytest.mark.integration

TINY = ["data.synth.images=24", "data.synth.imgsz=64", "data.synth.val_fraction=0.25", "train.epochs=1",
        "train.imgsz=64", *NO_FIGURES,
        "train.batch=8", "sweep.conf=[0.3,0.5]", "sweep.iou=[0.5]", "explain.samples=1",
        "export.parity_images=1", "ray.worker_threads=1",
        # two variants from two steps, each measured on a Ray worker; min_speedup 1000: no variant is that much
        # faster, so the choice (the parent) cannot hang on two timings of a model that finds nothing after 1 epoch
        "compress.enabled=true", "compress.steps=[int8-dynamic,fp16]", "compress.min_speedup=1000"]
# Measurements of time, not of the model, and the export's parity figures (the float noise, about 1e-8, between
# PyTorch and ONNX Runtime, whose thread pools split sums differently when other work runs beside them): they
# differ between any two runs
TIMING = ("latency", "time", "seconds", "duration", "_s", "_ms", "speed/", "throughput", "per_s", "system/", "fps",
          "wall", "parity/",
          "size_mb")  # a variant's file size: its ONNX metadata holds its measured latencies


def _night(runner: str, model: str) -> dict:
    from damage.flows.nightly import nightly

    os.environ["DAMAGE_REGISTRY_CONFIG"] = json.dumps({"floor_mask_map": 0.0, "min_class_ap50": 0.0,
                                                       "model_name": model})
    with worker_config([*TINY, f"runner={runner}"]):
        return nightly(force=True)


def _steps(c, summary) -> dict[str, dict]:
    parent = c.get_run(summary["mlflow_run_id"])
    runs = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                         max_results=200)
    out = {}
    for r in runs:
        step = r.data.tags.get("damage.step") or r.info.run_name
        assert step not in out, f"two nested runs for step {step}"
        out[step] = {"metrics": {k: v for k, v in r.data.metrics.items() if not any(t in k for t in TIMING)},
                     "params": {k: v for k, v in r.data.params.items() if "/" not in v and "\\" not in v}}
    return out


def _variants(c, summary) -> dict[str, dict]:
    """The compression variants' runs (nested under the night's ``compress`` run), timing aside."""
    run_id = summary["compression"]["run_id"]
    runs = c.search_runs([c.get_run(run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    return {r.info.run_name: {k: v for k, v in r.data.metrics.items() if not any(t in k for t in TIMING)}
            for r in runs}


def _same_numbers(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: {sorted(a.keys() ^ b.keys())}"
    differ = {k: (a[k], b[k]) for k in a if not math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=1e-12)}
    assert not differ, f"{what} differs: {differ}"


def _untimed(v):
    """``v`` without the keys of TIMING, at any depth."""
    if isinstance(v, dict):
        return {k: _untimed(x) for k, x in v.items() if not any(t in str(k) for t in TIMING)}
    if isinstance(v, list):
        return [_untimed(x) for x in v]
    return v


def _doc(v) -> str:
    """``v`` as JSON, timing keys dropped and each night's own run folder name made the same."""
    return re.sub(r"nightly-\d{8}-\d{6}-[0-9a-f]{8}", "nightly-RUN", json.dumps(_untimed(v), sort_keys=True,
                                                                               default=str))


def _pid_spy(real, path, qualname: str, label=lambda *a, **kw: ""):
    """``real`` that first appends ``"<label> <pid>"`` to ``path``: which process ran each call. Named so that it
    is not importable by name, cloudpickle sends it to a Ray worker whole."""

    @functools.wraps(real)
    def spy(*a, **kw):
        with open(path, "a") as f:
            f.write(f"{label(*a, **kw)} {os.getpid()}".strip() + "\n")
        return real(*a, **kw)

    spy.__module__, spy.__qualname__ = __name__, qualname
    return spy


def test_ray_runner_nightly_matches_the_in_process_nightly(prefect_harness, state_paths, ray_local, monkeypatch,
                                                             tmp_path):
    from mlflow.tracking import MlflowClient

    from damage.tasks.core.config import Config

    assert Config().runner == "local"  # the default stays in process
    monkeypatch.setenv("DAMAGE_TORCH_THREADS", "1")  # this process as the Ray workers (ray.worker_threads=1)
    import damage.flows.compress as compress_mod
    import damage.tasks.evaluation.sweep as sweep_mod
    from damage.tasks.core.prefect_tasks import as_task

    pids, measured = tmp_path / "sweep-pids", tmp_path / "measure-pids"
    monkeypatch.setattr(sweep_mod, "sweep_step", _pid_spy(sweep_mod.sweep_step, pids, "sweep_spy"))
    spy = _pid_spy(compress_mod.measure_task.fn, measured, "measure_spy", lambda v, *a, **kw: v.name)
    monkeypatch.setattr(compress_mod, "measure_task", as_task(spy, "compress-measure"))
    tag = uuid.uuid4().hex[:8]
    local = _night("local", f"runner-local-{tag}")
    ray = _night("ray", f"runner-ray-{tag}")
    ran_in = pids.read_text().split()
    assert ran_in[0] == str(os.getpid()) and ran_in[1] != str(os.getpid()), ran_in  # here, then on a Ray worker
    me, measures = str(os.getpid()), [line.split() for line in measured.read_text().splitlines()]
    assert measures[:4] == [["parent", me], ["int8-dynamic", me], ["fp16", me], ["parent", me]], measures
    assert sorted(n for n, _ in measures[4:]) == ["fp16", "int8-dynamic"], measures  # the Ray night's variants
    assert all(pid != me for _, pid in measures[4:]), measures  # ... each measured on a Ray worker
    c = MlflowClient(local["tracking_uri"])
    a, b = _steps(c, local), _steps(c, ray)
    assert {"label-issues", "sweep", "explain"} <= a.keys()  # the steps that fan out ran in both
    assert a.keys() == b.keys() and "compress" in a
    variants_a, variants_b = _variants(c, local), _variants(c, ray)
    assert variants_a.keys() == variants_b.keys() == {"variant/parent", "variant/int8-dynamic", "variant/fp16"}
    for name in variants_a:
        _same_numbers(variants_a[name], variants_b[name], f"{name} metrics")
    for step in a:
        _same_numbers(a[step]["metrics"], b[step]["metrics"], f"{step} metrics")
        assert a[step]["params"] == b[step]["params"], step
    va = c.get_model_version(local["registered_model"], local["registered_version"])
    vb = c.get_model_version(ray["registered_model"], ray["registered_version"])
    scored = {k for k in va.tags if k.startswith(("metric.", "gate.candidate.", "gate.decision"))
              and not any(t in k for t in TIMING)}
    assert "metric.mask/mAP50" in scored and "gate.decision" in scored
    assert {k: va.tags[k] for k in scored} == {k: vb.tags.get(k) for k in scored}
    keep = ("metrics", "per_class", "operating_point", "label_issues", "damage_pct_mae", "epochs_run",
            "dataset_fingerprint")
    assert local["promotion"]["passed"] == ray["promotion"]["passed"]
    for k in keep:
        assert _doc(local[k]) == _doc(ray[k]), k
    same = ("name", "kind", "compressed", "mask/mAP50")
    assert {k: local["compression"][k] for k in same} == {k: ray["compression"][k] for k in same}
