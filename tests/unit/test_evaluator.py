"""One evaluator built from config, one image-size rule, and no caller that unpacks the settings by hand."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from damage.tasks.core.config import Config
from damage.tasks.core.config_load import config_from_dict
from damage.tasks.evaluation import evaluate as E
from damage.tasks.evaluation.evaluate import Evaluator
from damage.tasks.evaluation.metrics import EvalResult

ROOT = Path(__file__).resolve().parents[2]


def test_image_size_rule_and_settings_from_config():
    cfg = config_from_dict({"train": {"imgsz": 96}, "evaluate": {"split": "test", "conf": 0.01, "iou": 0.6,
                                                                   "max_det": 50}})
    assert cfg.imgsz == 96  # export.imgsz 0: the training size
    assert Evaluator.from_config(cfg) == Evaluator(split="test", imgsz=96, conf=0.01, iou=0.6, max_det=50)
    cfg.export.imgsz = 128
    assert cfg.imgsz == 128 and Evaluator.from_config(cfg).imgsz == 128  # exported size wins everywhere
    assert Evaluator.from_config(cfg, imgsz=None, split="val") == Evaluator(split="val", imgsz=None, conf=0.01,
                                                                            iou=0.6, max_det=50)
    d = Config()
    assert Evaluator.from_config(d) == Evaluator(imgsz=d.train.imgsz)  # config defaults = evaluator defaults


@pytest.fixture
def recorded(monkeypatch):
    calls = []

    def fake(model, data_yaml, split="val", imgsz=None, conf=0.001, iou=0.7, max_det=300, batch=1, plots_dir=None,
             ray=None):
        calls.append((str(model), str(data_yaml), split, imgsz, conf, iou, max_det))
        return EvalResult({"mask/mAP50": 0.5, "mask/mAP50-95": 0.3, "latency_ms": 1.0}, [], str(model),
                          str(data_yaml), split, imgsz or 64, conf, iou, "onnx")

    monkeypatch.setattr(E, "evaluate_model", fake)
    return calls


def test_compression_measures_with_the_evaluator_it_is_given(recorded, monkeypatch, tmp_path):
    from damage.tasks.export import compress as C
    from damage.tasks.export.variant import Variant

    lat = []  # one interleaved pass over every variant, each at the evaluator's size
    monkeypatch.setattr(C, "ort_latency_ms", lambda paths, sizes, runs=20: lat.append(list(sizes)) or [2.0, 4.0])
    import damage.tasks.export.onnx as O

    timed = []  # every runtime is timed at the evaluator's size too (the file here is a stand-in)
    monkeypatch.setattr(O, "record_backend_latency", lambda path, imgsz, runs=20: timed.append(imgsz) or {
        "backend_latency_ms": {"onnxruntime": 2.0, "openvino": 3.0}, "preferred_backend": "onnxruntime"})
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"x" * 1000)
    ev = Evaluator(split="test", imgsz=96, conf=0.01, iou=0.6, max_det=50)
    root = C.measure_variant(Variant("parent", "parent", str(onnx)), "d.yaml", ev)
    child = C.measure_variant(Variant("int8", "int8-static", str(onnx)), "d.yaml", ev, root_metrics=root.metrics)
    assert recorded == [(str(onnx), "d.yaml", "test", 96, 0.01, 0.6, 50)] * 2
    assert child.metrics["delta_mask_mAP50"] == 0.0
    assert lat == [] and timed == [] and "latency/forward_ms" not in child.metrics  # accuracy only, so far
    assert C.time_variants([root, child]) == [root, child]
    assert lat == [[96, 96]] and [root.metrics["latency/forward_ms"], child.metrics["latency/forward_ms"]] == [2, 4]
    assert timed == [96, 96] and child.metrics["latency/openvino_ms"] == 3.0 and child.metrics["size_mb"] == 0.001
    assert ev.metrics_fn("d.yaml")(onnx)["mask/mAP50"] == 0.5 and recorded[-1][2:] == ("test", 96, 0.01, 0.6, 50)


def test_the_chain_loop_measures_every_variant_and_follows_the_head():
    from damage.tasks.export.compress import chain
    from damage.tasks.export.variant import StepOutput, Variant

    root = Variant("parent", "parent", "p.onnx")
    made = {"distill": ["distilled"], "prune": ["pruned", "pruned-ft"], "int8-static": ["int8"]}
    heads = {"distill": "distilled", "prune": "pruned-ft", "int8-static": None}  # quantizing keeps the head
    seen = []

    def apply(step, head):
        seen.append((step, head.name, head.metrics.get("measured")))
        out = [Variant(n, step, f"{n}.onnx", head.name) for n in made[step]]
        return StepOutput(out, next((v for v in out if v.name == heads[step]), head))

    def measure(v):
        return Variant(v.name, v.kind, v.onnx, v.parent, metrics={"measured": True})

    variants = chain(["distill", "prune", "int8-static"], root, apply, measure)
    assert [v.name for v in variants] == ["parent", "distilled", "pruned", "pruned-ft", "int8"]
    assert all(v.metrics.get("measured") for v in variants[1:])
    # each step sees the previous step's *measured* head
    assert seen == [("distill", "parent", None), ("prune", "distilled", True), ("int8-static", "pruned-ft", True)]

    # measurements as futures (runner: ray): a step waits for its head's only; the others are collected at the end
    waited, seen[:] = [], []

    class Later:
        def __init__(self, v):
            self.v = v

        def result(self):
            waited.append(self.v.name)
            return measure(self.v)

    variants = chain(["distill", "prune", "int8-static"], root, apply, Later)
    assert [v.name for v in variants] == ["parent", "distilled", "pruned", "pruned-ft", "int8"]
    assert all(v.metrics.get("measured") for v in variants[1:])
    assert seen == [("distill", "parent", None), ("prune", "distilled", True), ("int8-static", "pruned-ft", True)]
    assert waited[:2] == ["distilled", "pruned-ft"]  # the heads, each before the next step
    assert sorted(waited[2:]) == ["distilled", "int8", "pruned", "pruned-ft"]  # then all, once the chain is done


def test_only_the_evaluator_calls_evaluate_model():
    """Callers get an ``Evaluator`` (built from config) instead of unpacking its settings by hand."""
    offenders = []
    for pkg in ("flows", "tasks", "model_registry"):
        for f in (ROOT / pkg).rglob("*.py"):
            if f == ROOT / "tasks" / "evaluation" / "evaluate.py":
                continue
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                if isinstance(node, ast.Call):
                    fn = node.func
                    name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
                    if name == "evaluate_model":
                        offenders.append(f"{f.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"evaluate_model called outside Evaluator: {offenders}"


def test_every_configured_compression_step_has_a_runner_and_no_other():
    """One list of step names (``COMPRESS_STEPS``); the runner table and the step kinds follow it."""
    from damage.tasks.core.config import COMPRESS_STEPS
    from damage.tasks.export.chain_steps import STEP_RUNNERS
    from damage.tasks.export.variant import PT_STEPS, QUANT_STEPS

    assert set(STEP_RUNNERS) == set(COMPRESS_STEPS)
    assert set(PT_STEPS) | set(QUANT_STEPS) == set(COMPRESS_STEPS) and not set(PT_STEPS) & set(QUANT_STEPS)


def test_evaluate_plots_off_draws_nothing_and_changes_no_figure(monkeypatch, tmp_path):
    """``evaluate.plots: false``: the evaluator passes no plots folder (no curves drawn), and its MLflow
    parameters are those of a run that drew them."""
    from damage.tasks.core.config import Config

    dirs = []
    monkeypatch.setattr(E, "evaluate_model", lambda *a, plots_dir=None, ray=None: dirs.append(plots_dir))
    cfg = Config()
    on = Evaluator.from_config(cfg)
    cfg.evaluate.plots = False
    off = Evaluator.from_config(cfg)
    on("m.onnx", "d.yaml", plots_dir=tmp_path)
    off("m.onnx", "d.yaml", plots_dir=tmp_path)
    assert dirs == [tmp_path, None]
    assert on.params() == off.params() and "plots" not in on.params() and on == off
