"""The predictor's runtimes (damage.tasks.serving.backends) on hand-made ONNX graphs: no trained model needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from damage.tasks.core.errors import DamageError
from damage.tasks.serving import backends

ROOT = Path(__file__).resolve().parents[2]


def _two_output_model(path: Path, weight: float = 1.0, meta: dict[str, str] | None = None) -> Path:
    """images (N,3,H,W) -> Conv 3->4 (output0) and Relu of it (output1): two outputs like a seg model."""
    w = numpy_helper.from_array(np.full((4, 3, 3, 3), weight, np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("Conv", ["images", "w"], ["output0"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["output0"], ["output1"])],
        "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 4, "h", "w"]),
         helper.make_tensor_value_info("output1", TensorProto.FLOAT, ["batch", 4, "h", "w"])],
        [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    for k, v in (meta or {}).items():
        p = m.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(m, str(path))
    return path


def test_raw_metadata_reads_what_onnx_reads(tmp_path):
    meta = {"names": "{0: 'vehicle', 1: 'dent'}", "damage.imgsz": "[96, 96]", "note": "ünïcode ✓", "empty": ""}
    p = _two_output_model(tmp_path / "m.onnx", meta=meta)
    assert backends.raw_metadata(p) == {q.key: q.value for q in onnx.load(str(p)).metadata_props} == meta
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(DamageError, match="bad.onnx"):
        backends.raw_metadata(bad)


def test_resolve_backend_rules(monkeypatch):
    pref = {"damage.preferred_backend": "openvino"}
    monkeypatch.setattr(backends, "openvino_available", lambda: True)
    assert backends.resolve_backend("auto", {}) == "onnxruntime"  # no measurement: ORT
    assert backends.resolve_backend("auto", pref) == "openvino"
    assert backends.resolve_backend("auto", {"damage.preferred_backend": "onnxruntime"}) == "onnxruntime"
    assert backends.resolve_backend("onnxruntime", pref) == "onnxruntime"  # explicit wins
    here = {**pref, "damage.backend_cpu": backends.cpu_isa()}
    assert backends.resolve_backend("auto", here) == "openvino"
    assert backends.resolve_backend("auto", {**pref, "damage.backend_cpu": "other-isa"}) == "onnxruntime"
    monkeypatch.setattr(backends, "openvino_available", lambda: False)
    backends.warn_openvino_missing.cache_clear()
    assert backends.resolve_backend("auto", pref) == "onnxruntime"
    with pytest.raises(DamageError, match="'openvino' asked for.*not installed"):
        backends.resolve_backend("openvino", {}, "m.onnx")
    with pytest.raises(DamageError, match="unknown predictor backend 'trt'"):
        backends.resolve_backend("trt", {})
    backends.warn_openvino_missing.cache_clear()


def test_physical_cores_counts_hyperthread_siblings_once(monkeypatch):
    # 4 logical CPUs: two cores with two hyper-threads each
    info = "".join(f"processor\t: {cpu}\nphysical id\t: 0\ncore id\t\t: {cpu // 2}\n\n" for cpu in range(4))
    monkeypatch.setattr(backends, "_cpuinfo", lambda: info)
    monkeypatch.setattr(backends.os, "sched_getaffinity", lambda _: {0, 1, 2, 3})
    assert backends.physical_cores.__wrapped__() == 2
    monkeypatch.setattr(backends.os, "sched_getaffinity", lambda _: {0})  # pinned to one CPU
    assert backends.physical_cores.__wrapped__() == 1
    monkeypatch.setattr(backends, "_cpuinfo", lambda: "flags\t: fpu avx2 avx512f amx_int8\n")
    assert backends.cpu_isa.__wrapped__() == "avx2+avx512f+amx_int8"


def test_optimized_graph_cache_is_keyed_by_the_file(tmp_path):
    x = np.ones((1, 3, 8, 8), np.float32)
    p = _two_output_model(tmp_path / "m.onnx", weight=1.0)
    first = backends.OnnxRuntime(p)
    caches = sorted(tmp_path.glob(f"m.onnx{backends.CACHE_TAG}*"))
    assert first.source == caches[0] and len(caches) == 1
    assert backends.OnnxRuntime(p).source == caches[0]  # the second load reads the cache
    ref = first.run(x)[0]
    assert ref[0, 0, 4, 4] == pytest.approx(27.0)

    _two_output_model(p, weight=2.0)  # the model changes in place: its old cache must not be read
    second = backends.OnnxRuntime(p)
    assert second.source != caches[0] and not caches[0].exists()  # a new key, the stale file removed
    assert second.run(x)[0][0, 0, 4, 4] == pytest.approx(54.0)
    assert backends.OnnxRuntime(p, cache=False).source == p
    assert backends.optimized_cache_path(p).name.startswith("m.onnx.ortopt-")
    assert sorted(q.name for q in tmp_path.iterdir()) == ["m.onnx", second.source.name]  # no temp files left


@pytest.mark.parametrize("name", backends.RUNTIMES)
def test_runtimes_agree_on_a_small_graph(tmp_path, name):
    p = _two_output_model(tmp_path / "m.onnx")
    rt = backends.open_runtime(name, p, threads=1, cache=False)
    assert rt.name == name and rt.n_outputs == 2
    assert rt.input_shape == [None, 3, None, None] and rt.output_shapes[0][1] == 4
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    a, b = rt.run(x)
    c, _ = rt.run(-x)  # the outputs of a run are the caller's: a later run must not overwrite them
    assert a.shape == (2, 4, 8, 8) and np.array_equal(b, np.maximum(a, 0))
    np.testing.assert_allclose(c, -a, atol=1e-5)


def test_predictor_with_either_runtime_imports_no_torch(tmp_path):
    p = _two_output_model(tmp_path / "m.onnx", meta={"damage.names": '["a"]'})
    code = ("import sys; from damage.tasks.serving.predictor import Predictor; "
            f"[Predictor({str(p)!r}, backend=b) for b in ('onnxruntime', 'openvino')]; "
            "bad = {'torch', 'ultralytics', 'prefect'} & set(sys.modules); assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_a_ray_worker_thread_count_reaches_the_runtimes(monkeypatch, tmp_path):
    """A Ray task's environment (``step_env``) names its CPU count, and a session opened without an explicit
    count takes it instead of every core; a bad value falls back to the cores."""
    from damage.tasks.scale.fanout import step_env

    assert step_env(1, forward_secrets=False)[backends.INFER_THREADS_ENV] == "1"
    monkeypatch.setattr(backends, "physical_cores", lambda: 8)
    monkeypatch.setenv(backends.INFER_THREADS_ENV, "1")
    assert backends.default_threads() == 1
    for bad in ("0", "two", ""):
        monkeypatch.setenv(backends.INFER_THREADS_ENV, bad)
        assert backends.default_threads() == 8
    monkeypatch.setenv(backends.INFER_THREADS_ENV, "1")
    seen = {}
    real = backends.ort.SessionOptions

    class Options(real):  # what the session is opened with
        def __setattr__(self, k, v):
            seen[k] = v
            super().__setattr__(k, v)

    monkeypatch.setattr(backends.ort, "SessionOptions", Options)
    with pytest.raises(DamageError):  # not a model: the options were set before the file was read
        backends.OnnxRuntime(tmp_path / "missing.onnx")
    assert seen["intra_op_num_threads"] == 1
