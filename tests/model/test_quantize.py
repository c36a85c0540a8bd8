"""Quantization: mode table, head decode kept float, INT8 scores alive, accuracy-aware loop, and on a model
that detects (``trained_model``): INT8 mask mAP50 within ``compress.tolerance`` of float on images outside
the calibration set, FP16 and dynamic INT8 outputs close to float's."""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.fixture(scope="module")
def float_onnx(tiny_model, tmp_path_factory):
    from damage.tasks.export.onnx import export_onnx

    return export_onnx(tiny_model, tmp_path_factory.mktemp("q") / "model.onnx", 96)


@pytest.fixture(scope="module")
def calib(tiny_dataset):
    from damage.tasks.export.calibration import calibration_images

    return calibration_images(tiny_dataset, 4, seed=0)


@pytest.fixture(scope="module")
def held_out(tiny_dataset, calib):
    """Val images of the tiny set: never in the calibration set (drawn from train)."""
    from damage.tasks.export.calibration import calibration_images

    val = calibration_images(tiny_dataset, 100, split="val")
    assert not set(val) & set(calib)
    return val


def _run(path, x):
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})


def _nc(path) -> int:
    import onnx

    names = next(p.value for p in onnx.load(str(path)).metadata_props if p.key == "names")
    return names.count(":")


def test_head_postprocess_nodes_found_by_traversal(float_onnx):
    import onnx

    from damage.tasks.export.onnx_graph import DECODE_OPS, ensure_node_names, head_postprocess_nodes

    m = onnx.load(str(float_onnx))
    ensure_node_names(m)
    head = set(head_postprocess_nodes(m))
    by_name = {n.name: n for n in m.graph.node}
    producer = {o: n.name for n in m.graph.node for o in n.output}
    for out in m.graph.output:  # output-producing nodes are float
        assert producer[out.name] in head
    ops = {by_name[n].op_type for n in head}
    assert {"Concat", "Sigmoid", "Softmax"} <= ops
    convs = [n for n in head if by_name[n].op_type == "Conv"]
    assert len(convs) == 1  # only the DFL expectation conv; learned branch convs stay quantizable
    assert ops - {"Conv"} <= DECODE_OPS
    n_conv = sum(n.op_type == "Conv" for n in m.graph.node)
    assert n_conv > 50  # the walk stopped at the branch convs, it did not swallow the network


def test_int8_static_keeps_scores_alive(float_onnx, calib, held_out, tmp_path):
    import onnx

    from damage.tasks.export.calibration import preprocess_image
    from damage.tasks.export.quantize import quantize_onnx

    q = quantize_onnx(float_onnx, tmp_path / "int8.onnx", "int8-static", calib_images=calib, imgsz=96)
    qm = onnx.load(str(q))
    assert sum(n.op_type == "QuantizeLinear" for n in qm.graph.node) > 20
    meta = {p.key: p.value for p in qm.metadata_props}
    assert "names" in meta and "imgsz" in meta  # metadata carried over
    assert json.loads(meta["damage.quantization"])["per_channel"] is True
    x = preprocess_image(held_out[0], 96)  # not a calibration image: its ranges were not seen
    f, i8 = _run(float_onnx, x), _run(q, x)
    assert [a.shape for a in f] == [a.shape for a in i8]
    nc = _nc(float_onnx)
    fs, qs = f[0][:, 4:4 + nc], i8[0][:, 4:4 + nc]
    assert fs.max() > 0 and qs.max() > 0  # not zeroed by a shared box/score scale
    assert np.corrcoef(fs.ravel(), qs.ravel())[0, 1] > 0.9
    # the trap the exclusion avoids: with the decode quantized, scores lose far more
    naive = _run(quantize_onnx(float_onnx, tmp_path / "naive.onnx", "int8-static", calib_images=calib, imgsz=96,
                               exclude_head=False), x)[0][:, 4:4 + nc]
    assert np.abs(naive - fs).max() > np.abs(qs - fs).max()


def test_int8_graph_rewrites_keep_the_float_outputs(float_onnx):
    """The rewrites applied before static INT8 (ConvTranspose as 1x1 Conv + DepthToSpace, the DFL Softmax on
    the innermost axis with a MatMul) leave the float model's outputs as they were."""
    import onnx

    from damage.tasks.export.onnx_graph import REWRITES, ensure_node_names
    from damage.tasks.export.quantize import INT8_REWRITES

    m = onnx.load(str(float_onnx))
    ensure_node_names(m)
    assert {r: REWRITES[r](m) for r in INT8_REWRITES} == {"convtranspose": 1, "dfl_softmax": 1}
    onnx.checker.check_model(m)
    ops = {n.op_type for n in m.graph.node}
    assert "ConvTranspose" not in ops and {"DepthToSpace", "MatMul"} <= ops
    rewritten = float_onnx.parent / "rewritten.onnx"
    onnx.save(m, str(rewritten))
    x = np.random.default_rng(0).random((1, 3, 96, 96), dtype=np.float32)
    for ref, out in zip(_run(float_onnx, x), _run(rewritten, x), strict=True):
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


def test_mode_table_refuses_bad_combinations(float_onnx, calib, tmp_path):
    import onnx

    from damage.tasks.core.errors import DamageError
    from damage.tasks.export.quantize import quantize_onnx

    with pytest.raises(DamageError, match="does not accept"):
        quantize_onnx(float_onnx, tmp_path / "x.onnx", "int8-dynamic", calib_images=calib)
    with pytest.raises(DamageError, match="does not accept"):
        quantize_onnx(float_onnx, tmp_path / "x.onnx", "fp16", per_channel=True)
    with pytest.raises(DamageError, match="unknown quantization mode"):
        quantize_onnx(float_onnx, tmp_path / "x.onnx", "int4")
    with pytest.raises(DamageError, match="calibration images"):
        quantize_onnx(float_onnx, tmp_path / "x.onnx", "int8-static")
    m = onnx.load(str(float_onnx))
    for imp in m.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = 12
    old = tmp_path / "opset12.onnx"
    onnx.save(m, str(old))
    with pytest.raises(DamageError, match="opset >= 13"):
        quantize_onnx(old, tmp_path / "x.onnx", "int8-static", calib_images=calib, imgsz=96)


def test_accuracy_aware_loop_moves_sensitive_nodes_to_float(float_onnx, calib, tmp_path):
    import onnx

    from damage.tasks.export.quantize import quantize_accuracy_aware

    def fake_eval(path):
        # Stand-in evaluator: accuracy recovers with each node kept in float (reads the file's metadata).
        meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        if "damage.quantization" not in meta:
            return {"mask/mAP50": 0.50}
        extra = len(json.loads(meta["damage.quantization"])["extra_float_nodes"])
        return {"mask/mAP50": 0.40 + 0.05 * extra}

    res = quantize_accuracy_aware(float_onnx, tmp_path / "aa.onnx", None, calib, tolerance=0.02, max_retries=3,
                                  nodes_per_retry=1, evaluate_fn=fake_eval, imgsz=96, sensitivity_images=2)
    assert [len(a.float_nodes) for a in res.attempts] == [0, 1, 2]
    assert res.within_tolerance and res.path.is_file()
    assert res.attempts[-1].float_nodes == [n for n, _ in res.ranking[:2]]  # most sensitive first
    sqnr = [v for _, v in res.ranking]
    assert sqnr == sorted(sqnr)
    res2 = quantize_accuracy_aware(float_onnx, tmp_path / "aa2.onnx", None, calib, tolerance=0.0, max_retries=1,
                                   nodes_per_retry=1, evaluate_fn=lambda p: {"mask/mAP50": 0.5 if p == float_onnx
                                                                             else 0.1}, imgsz=96)
    assert not res2.within_tolerance and len(res2.attempts) == 2  # reports the best reached


def test_accuracy_aware_loop_also_holds_every_class(float_onnx, calib, tmp_path):
    """With class_tolerance an attempt that keeps the overall figure but loses one class is retried, and the
    attempt that holds every class wins over a more accurate one that does not."""
    import onnx

    from damage.tasks.export.quantize import quantize_accuracy_aware, worst_class_drop

    def fake_eval(path):
        meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        if "damage.quantization" not in meta:
            return {"mask/mAP50": 0.50, "mask_ap50/dent": 0.40, "mask_ap50/glass": 0.60}
        extra = len(json.loads(meta["damage.quantization"])["extra_float_nodes"])
        # overall better than float from the start; glass recovers only with 2 nodes in float
        return {"mask/mAP50": 0.52 - 0.005 * extra, "mask_ap50/dent": 0.45, "mask_ap50/glass": 0.50 + 0.05 * extra}

    res = quantize_accuracy_aware(float_onnx, tmp_path / "aa.onnx", None, calib, tolerance=0.02, max_retries=3,
                                  nodes_per_retry=1, evaluate_fn=fake_eval, imgsz=96, sensitivity_images=2,
                                  class_tolerance=0.03)
    assert [len(a.float_nodes) for a in res.attempts] == [0, 1, 2]
    assert res.within_tolerance and res.metrics["mask_ap50/glass"] == pytest.approx(0.60)
    assert res.summary()["attempts"][0]["worst_class"] == {"class": "glass", "drop": pytest.approx(0.1)}
    # the overall rule alone would have stopped at the first attempt, glass 0.1 down
    alone = quantize_accuracy_aware(float_onnx, tmp_path / "ab.onnx", None, calib, tolerance=0.02, max_retries=3,
                                    nodes_per_retry=1, evaluate_fn=fake_eval, imgsz=96, sensitivity_images=2)
    assert len(alone.attempts) == 1 and alone.within_tolerance
    assert worst_class_drop(alone.float_metrics, alone.metrics) == ("glass", pytest.approx(0.1))



# --- which parts of the INT8 graph run in float ---------------------------------------------------

def _runtime_float_nodes(path, tmp_path) -> dict[str, str]:
    """{name: op_type} of the nodes that compute on float tensors once ONNX Runtime has fused the QDQ
    pairs (the graph as the CPU provider runs it, before layout changes). Tensors are tracked as
    uint8 (from QuantizeLinear / a QLinear* kernel), float (from DequantizeLinear, the graph input or
    a float node) or integer shape arithmetic (from Shape)."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # QDQ fusion, no NCHWc
    so.optimized_model_filepath = str(tmp_path / f"{path.stem}.fused.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    m = onnx.load(so.optimized_model_filepath)
    kind = {i.name: "f" for i in m.graph.input}
    inits = {i.name for i in m.graph.initializer}
    floats = {}
    for n in m.graph.node:  # ORT saves the graph topologically sorted
        ins = {kind.get(i, "f") for i in n.input if i and i not in inits}
        if n.op_type == "QuantizeLinear" or n.op_type.startswith("QLinear"):
            out = "q"
        elif n.op_type == "DequantizeLinear":
            out = "f"
        elif n.op_type == "Shape" or not ins or ins == {"i"}:
            out = "i"
        elif "f" in ins:
            out = "f"
            floats[n.name] = n.op_type
        else:
            out = "q"  # Split, MaxPool, Resize, Reshape... run on the uint8 tensor
        for o in n.output:
            kind[o] = out
    return floats


def _within(name: str, nodes: set[str]) -> bool:
    """``name`` is one of ``nodes`` or a node ORT made from one (it appends ``/FusionName`` to the name)."""
    return name in nodes or any(name.startswith(n + "/") for n in nodes)


def _head(onnx_path) -> set[str]:
    import onnx

    from damage.tasks.export.onnx_graph import ensure_node_names, head_postprocess_nodes

    m = onnx.load(str(onnx_path))
    ensure_node_names(m)
    return set(head_postprocess_nodes(m))


def test_int8_static_runs_in_int8_except_the_head_decode(float_onnx, calib, tmp_path):
    """SiLU (Sigmoid, Mul), the C2f Add and Concat, Split, MaxPool, Resize and the mask prototype's upsampling
    (ConvTranspose rewritten as a 1x1 Conv + DepthToSpace) run on uint8; the only float region is the head's
    decode."""
    import onnx

    from damage.tasks.export.onnx_graph import head_postprocess_nodes
    from damage.tasks.export.quantize import quantize_onnx

    q = quantize_onnx(float_onnx, tmp_path / "int8.onnx", "int8-static", calib_images=calib, imgsz=96)
    qm = onnx.load(str(q))
    head = set(head_postprocess_nodes(qm)) | _head(float_onnx)
    producer = {o: n for n in qm.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in qm.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    silu = [n for n in qm.graph.node if n.op_type in ("Sigmoid", "Mul") and n.name not in head]
    assert len(silu) > 100  # every SiLU of the backbone and neck
    for n in silu:  # QDQ on both sides of every SiLU op
        assert all(producer[i].op_type == "DequantizeLinear" for i in n.input if i in producer), n.name
        assert all(c.op_type == "QuantizeLinear" for c in consumers[n.output[0]]), n.name
    assert "ConvTranspose" not in {n.op_type for n in qm.graph.node}
    floats = _runtime_float_nodes(q, tmp_path)
    outside = {k: v for k, v in floats.items() if not _within(k, head)}
    assert not outside, outside
    assert len(floats) < 0.5 * len(head) + 2  # the head decode itself is mostly shape arithmetic, not float compute


def test_accuracy_aware_exclusions_really_run_in_float(float_onnx, calib, tmp_path):
    """A node the accuracy-aware loop returns to float computes in float at run time, and so do only its
    direct consumers (the float island the exclusion costs)."""
    import onnx

    from damage.tasks.export.quantize import quantize_onnx

    m = onnx.load(str(float_onnx))
    sig = [n.name for n in m.graph.node if n.op_type == "Sigmoid"][1]
    conv = [n.name for n in m.graph.node if n.op_type == "Conv"][4]
    q = quantize_onnx(float_onnx, tmp_path / "ex.onnx", "int8-static", calib_images=calib, imgsz=96,
                      exclude_nodes=[sig, conv])
    qm = onnx.load(str(q))
    info = json.loads({p.key: p.value for p in qm.metadata_props}["damage.quantization"])
    assert info["extra_float_nodes"] == sorted([sig, conv]) and info["qdq_pairs_removed"] == 2
    floats = _runtime_float_nodes(q, tmp_path)
    assert floats.get(sig) == "Sigmoid" and floats.get(conv) == "Conv"  # not fused back into QLinear*
    outs = {o for n in m.graph.node if n.name in (sig, conv) for o in n.output}
    island = {n.name for n in m.graph.node if set(n.input) & outs} | {sig, conv}
    outside = {k: v for k, v in floats.items() if not _within(k, _head(float_onnx) | island)}
    assert not outside, outside


def test_calibration_methods_and_granularity_reach_the_graph(float_onnx, calib, tmp_path):
    import onnx
    from onnx import numpy_helper

    from damage.tasks.core.errors import DamageError
    from damage.tasks.export.calibration import CALIBRATION_METHODS
    from damage.tasks.export.quantize import quantize_onnx

    def scales(path):
        m = onnx.load(str(path))
        inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
        meta = json.loads({p.key: p.value for p in m.metadata_props}["damage.quantization"])
        weight = [inits[n.input[1]] for n in m.graph.node if n.op_type == "DequantizeLinear"
                  and n.input[0] in inits and inits[n.input[0]].dtype == np.int8]
        act = {n.input[0]: float(inits[n.input[1]]) for n in m.graph.node if n.op_type == "QuantizeLinear"}
        return meta, weight, act

    acts = {}
    for method in CALIBRATION_METHODS:
        meta, weight, acts[method] = scales(quantize_onnx(float_onnx, tmp_path / f"{method}.onnx", "int8-static",
                                                          calib_images=calib, imgsz=96, calibrate_method=method))
        assert meta["calibrate_method"] == method and meta["per_channel"] is True
        assert all(w.ndim == 1 for w in weight) and max(w.size for w in weight) > 1  # one scale per channel
    common = set(acts["minmax"]) & set(acts["entropy"]) & set(acts["percentile"])
    assert len(common) > 100
    # histogram methods clip the outliers min/max keeps: never a wider range, a narrower one on some tensors
    # (ORT's default entropy histogram searches one window, the full range, and equals min/max everywhere)
    for method in ("entropy", "percentile"):
        ratio = [acts[method][t] / acts["minmax"][t] for t in common]
        assert max(ratio) <= 1.001, (method, max(ratio))
        assert sum(r < 0.99 for r in ratio) >= 3, (method, sorted(ratio)[:5])
    meta, weight, _ = scales(quantize_onnx(float_onnx, tmp_path / "pt.onnx", "int8-static", calib_images=calib,
                                           imgsz=96, per_channel=False))
    assert meta["per_channel"] is False and all(w.size == 1 for w in weight) and len(weight) > 50
    with pytest.raises(DamageError, match="unknown calibrate_method"):
        quantize_onnx(float_onnx, tmp_path / "x.onnx", "int8-static", calib_images=calib, imgsz=96,
                      calibrate_method="mse")
    with pytest.raises(DamageError, match="does not accept"):
        quantize_onnx(float_onnx, tmp_path / "x.onnx", "int8-dynamic", calibrate_method="entropy")


def test_variant_table_has_a_row_per_calibration_setting(float_onnx, tiny_dataset, tmp_path):
    """``compress.quantize.also_try``: each setting is its own int8-static variant, named and labelled."""
    import csv

    import onnx

    from damage.tasks.core.config_load import config_from_dict
    from damage.tasks.export.chain_steps import apply_step
    from damage.tasks.export.compress import write_table
    from damage.tasks.export.variant import Variant

    class FakeEvaluator:  # the chain's evaluator interface: imgsz and metrics_fn
        imgsz = 96

        def metrics_fn(self, data_yaml):
            return lambda path: {"mask/mAP50": 0.5}

    cfg = config_from_dict({"compress": {"quantize": {
        "calib_images": 2, "max_retries": 0, "calibrate_method": "percentile", "per_channel": True,
        # no entropy here: ORT's entropy threshold search took 20 s of this test's 21 (the calibration test runs it)
        "also_try": [{"calibrate_method": "percentile", "per_channel": False},
                     {"calibrate_method": "minmax", "per_channel": False}]}}})
    root = Variant("parent", "parent", str(float_onnx))
    out = apply_step("int8-static", root, root, tiny_dataset, cfg, tmp_path / "q", FakeEvaluator())
    assert out.head is root
    got = [(v.name, v.info["setting"]) for v in out.variants]
    assert got == [("int8-static", "percentile/per-channel"),
                   ("int8-static[percentile/per-tensor]", "percentile/per-tensor"),
                   ("int8-static[minmax/per-tensor]", "minmax/per-tensor")]
    for v in out.variants:  # each file was made with its own setting
        meta = json.loads({p.key: p.value for p in onnx.load(v.onnx).metadata_props}["damage.quantization"])
        method, gran = v.info["setting"].split("/")
        assert (meta["calibrate_method"], meta["per_channel"]) == (method, gran == "per-channel"), v.name
    rows = list(csv.DictReader(open(write_table([root, *out.variants], tmp_path / "t.csv"))))
    assert [r["setting"] for r in rows] == ["", "percentile/per-channel", "percentile/per-tensor", "minmax/per-tensor"]



# --- on a model that detects (session fixture ``trained_model``, easy set, 64 px) -----------------

# Output tolerances against the float model, on the anchors float scores above DETECTED (boxes of
# anchors that detect nothing are arbitrary and not compared) and on every anchor's class scores.
DETECTED = 0.25
# FP16 rounds (~1e-3 relative); dynamic INT8 re-scales every activation at run time, so it is allowed
# more. Both stay far below what a broken conversion gives: zeroed scores differ by more than DETECTED
# on every detected anchor, undecoded or mis-scaled boxes by tens of pixels.
TOLERANCE = {  # mode: (max |score diff| on any anchor, max |box diff| in px on detected anchors, 64 px input)
    "fp16": (0.01, 0.5),
    "int8-dynamic": (0.20, 4.0),
}


@pytest.fixture(scope="module")
def trained_onnx(trained_model, easy_imgsz, tmp_path_factory):
    from damage.tasks.export.onnx import export_onnx

    return export_onnx(trained_model, tmp_path_factory.mktemp("qt") / "trained.onnx", easy_imgsz)


@pytest.fixture(scope="module")
def easy_split(easy_dataset):
    """(calibration images from train, held-out val images): disjoint by construction, checked."""
    from damage.tasks.export.calibration import calibration_images

    calib = calibration_images(easy_dataset, 8, seed=0)
    val = calibration_images(easy_dataset, 100, split="val")
    assert len(val) >= 10 and not set(val) & set(calib)
    return calib, val


def test_int8_mask_map_within_tolerance_of_float_on_held_out_images(trained_onnx, easy_dataset, easy_split,
                                                                   easy_imgsz, tmp_path):
    """The INT8 the pipeline ships (accuracy-aware static INT8, as the compression chain and the demo run it)
    keeps mask mAP50 within the configured tolerance of float on val images, none of them calibration
    images. Plain static INT8 of a freshly trained 64 px model measured 0.945 vs 0.972 once (a drop of
    0.027): the loop that returns sensitive nodes to float is what holds the tolerance."""
    from damage.tasks.core.config import Config
    from damage.tasks.evaluation.evaluate import evaluate_model
    from damage.tasks.export.quantize import quantize_accuracy_aware

    cfg = Config().compress
    tol = cfg.tolerance
    calib, val = easy_split
    assert not {p.name for p in calib} & {p.name for p in val}  # held out from calibration

    def metrics(model):
        return evaluate_model(model, easy_dataset, split="val", imgsz=easy_imgsz).metrics

    res = quantize_accuracy_aware(trained_onnx, tmp_path / "int8.onnx", easy_dataset, calib, tolerance=tol,
                                  max_retries=cfg.quantize.max_retries, nodes_per_retry=cfg.quantize.nodes_per_retry,
                                  evaluate_fn=metrics, imgsz=easy_imgsz)
    fm, qm = metrics(trained_onnx), metrics(res.path)
    print(f"mask mAP50 float {fm['mask/mAP50']:.3f} int8 {qm['mask/mAP50']:.3f} (tolerance {tol}, "
          f"{len(res.attempts)} attempt(s))")
    assert fm["mask/mAP50"] > 0.5  # the model detects: otherwise "within tolerance" says nothing
    assert res.within_tolerance
    assert qm["mask/mAP50"] >= fm["mask/mAP50"] - tol, (fm["mask/mAP50"], qm["mask/mAP50"], tol)


@pytest.mark.parametrize("mode", sorted(TOLERANCE))
def test_fp16_and_dynamic_int8_outputs_match_float(trained_onnx, easy_split, easy_imgsz, mode, tmp_path):
    from damage.tasks.export.calibration import preprocess_image
    from damage.tasks.export.quantize import quantize_onnx

    _, val = easy_split
    q = quantize_onnx(trained_onnx, tmp_path / f"{mode}.onnx", mode)
    assert q.stat().st_size < 0.6 * trained_onnx.stat().st_size
    nc = _nc(trained_onnx)
    worst_score = worst_box = 0.0
    detected = 0
    for img in val:
        x = preprocess_image(img, easy_imgsz)
        f, o = _run(trained_onnx, x), _run(q, x)
        assert [a.shape for a in o] == [a.shape for a in f] and all(a.dtype == np.float32 for a in o)
        fs, qs = f[0][0, 4:4 + nc], o[0][0, 4:4 + nc]  # (nc, anchors)
        worst_score = max(worst_score, float(np.abs(qs - fs).max()))
        hit = fs.max(0) > DETECTED
        detected += int(hit.sum())
        if hit.any():
            worst_box = max(worst_box, float(np.abs(o[0][0, :4, hit] - f[0][0, :4, hit]).max()))
    max_score, max_box = TOLERANCE[mode]
    print(f"{mode}: score max abs {worst_score:.4f}, box max abs {worst_box:.3f} px over {detected} detected anchors")
    assert detected >= len(val)  # the comparison covers real detections
    assert worst_score <= max_score and worst_box <= max_box, (worst_score, worst_box)


def test_entropy_threshold_is_onnxruntimes_search():
    """The project's entropy search picks ORT's own threshold, dtype included, on histograms with
    heavy tails, mostly-positive (SiLU-like) values and many empty bins."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    from damage.tasks.export.calibration import CALIBRATOR_OPTIONS, entropy_threshold

    opts = CALIBRATOR_OPTIONS["entropy"]
    ort = HistogramCollector("entropy", symmetric=False, num_bins=opts["num_bins"],
                             num_quantized_bins=opts["num_quantized_bins"], percentile=99.99, scenario="same")
    rng = np.random.default_rng(0)
    for k in range(12):
        x = np.concatenate([rng.normal(0, 1, 5000), rng.standard_t(2, 300) * (k % 5 + 1)])
        if k % 3 == 0:
            x = x * (x > -0.3)
        if k % 4 == 0:
            x = np.round(x * 3) / 3
        h, e = np.histogram(x, opts["num_bins"], range=(x.min(), x.max()))
        hist = (h, e.astype(np.float32), np.float32(x.min()), np.float32(x.max()))
        want = ort.get_entropy_threshold(hist, opts["num_quantized_bins"])
        got = entropy_threshold(hist, opts["num_quantized_bins"])
        assert [(v.dtype, float(v)) for v in got] == [(v.dtype, float(v)) for v in want], k
