"""NNCF post-training INT8 (compress step int8-nncf) on the trained easy model: graph, accuracy, both runtimes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def float_and_nncf(trained_model, easy_dataset, easy_imgsz, tmp_path_factory) -> tuple[Path, Path]:
    from damage.tasks.export.calibration import calibration_images
    from damage.tasks.export.nncf_quant import quantize_nncf
    from damage.tasks.export.onnx import export_onnx

    d = tmp_path_factory.mktemp("nncf")
    f = export_onnx(trained_model, d / "float.onnx", easy_imgsz, metadata={"conf": 0.3})
    q = quantize_nncf(f, d / "nncf.onnx", calibration_images(easy_dataset, 8, seed=0), easy_imgsz)
    return f, q


def test_nncf_graph_is_int8_with_the_head_decode_in_float(float_and_nncf):
    import onnx

    from damage.tasks.export.onnx import read_onnx_metadata
    from damage.tasks.export.onnx_graph import head_postprocess_nodes

    f, q = float_and_nncf
    fm, qm = onnx.load(str(f)), onnx.load(str(q))
    qdq = [n for n in qm.graph.node if n.op_type == "QuantizeLinear"]
    convs = [n for n in qm.graph.node if n.op_type == "Conv"]
    producer = {o: n for n in qm.graph.node for o in n.output}
    quantized_convs = [c for c in convs if producer.get(c.input[1]) is not None
                       and producer[c.input[1]].op_type == "DequantizeLinear"]
    assert qdq and len(quantized_convs) >= 0.9 * len(convs)  # weights of (almost) every Conv are int8
    head = set(head_postprocess_nodes(fm))
    fed_by_dq = {n.op_type for n in qm.graph.node if n.name in head
                 and any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in n.input)}
    assert fed_by_dq <= {"Shape"}, fed_by_dq  # a Shape reads no values: every decode op sees float inputs
    md = read_onnx_metadata(q)
    assert md["conf"] == 0.3 and md["quantization"]["mode"] == "int8-nncf"  # metadata carried over
    assert q.stat().st_size < 0.5 * f.stat().st_size


# What plain post-training INT8 may cost this model in mask mAP50. Not ``compress.tolerance`` (0.02): that is
# the accuracy-aware search's target, met by returning nodes to float, and plain static INT8 of this kind of
# model has missed it (0.027 below float, issue 30) while working as designed; on 12 val images with ~18
# objects one object more or less found moves mAP50 by ~0.05. A broken quantization (the head's decode in
# int8, a wrong calibration input) loses nearly everything, far beyond this budget.
PTQ_MAX_DROP = 0.1


def test_nncf_mask_map_within_its_budget_and_runs_on_both_runtimes(float_and_nncf, easy_dataset, easy_imgsz):
    from damage.tasks.evaluation.evaluate import evaluate_model
    from damage.tasks.serving.predictor import Predictor

    f, q = float_and_nncf
    fm = evaluate_model(f, easy_dataset, split="val", imgsz=easy_imgsz).metrics
    qm = evaluate_model(q, easy_dataset, split="val", imgsz=easy_imgsz).metrics
    print(f"mask mAP50 float {fm['mask/mAP50']:.3f} nncf int8 {qm['mask/mAP50']:.3f} (budget {PTQ_MAX_DROP})")
    assert fm["mask/mAP50"] > 0.5
    assert qm["mask/mAP50"] >= fm["mask/mAP50"] - PTQ_MAX_DROP
    val = sorted((easy_dataset.parent / "images" / "val").glob("*.png"))
    for backend in ("onnxruntime", "openvino"):
        pred = Predictor(q, backend=backend)
        assert sum(len(r.instances) for r in pred.predict(val)) >= len(val), backend


def test_nncf_missing_is_a_clear_error(float_and_nncf, easy_dataset, monkeypatch, tmp_path):
    from damage.tasks.core.errors import DamageError
    from damage.tasks.export.calibration import calibration_images
    from damage.tasks.export.nncf_quant import quantize_nncf

    f, _ = float_and_nncf
    calib = calibration_images(easy_dataset, 2, seed=0)
    with pytest.raises(DamageError, match="unknown NNCF preset 'fast'"):
        quantize_nncf(f, tmp_path / "x.onnx", calib, 64, preset="fast")
    monkeypatch.setitem(sys.modules, "nncf", None)
    with pytest.raises(DamageError, match=r"pip install 'damage\[nncf\]'"):
        quantize_nncf(f, tmp_path / "x.onnx", calib, 64)
    assert not (tmp_path / "x.onnx").exists()


def test_compress_chain_step_int8_nncf(float_and_nncf, easy_dataset, easy_imgsz, tmp_path):
    """``compress.steps: [int8-nncf]`` makes a variant of the chain head with the configured preset."""
    from types import SimpleNamespace

    from damage.tasks.core.config import Config
    from damage.tasks.export.chain_steps import apply_step
    from damage.tasks.export.compress import plan_steps
    from damage.tasks.export.variant import Variant

    f, _ = float_and_nncf
    cfg = Config()
    cfg.compress.quantize.calib_images = 4
    cfg.compress.quantize.nncf_preset = "mixed"
    assert plan_steps(["prune", "int8-nncf"]) == ["prune", "int8-nncf"]
    parent = Variant("parent", "parent", str(f))
    out = apply_step("int8-nncf", parent, parent, easy_dataset, cfg, tmp_path, SimpleNamespace(imgsz=easy_imgsz))
    [v] = out.variants
    assert (v.name, v.kind, v.parent, out.head) == ("int8-nncf", "int8-nncf", "parent", parent)
    assert v.info["preset"] == "mixed" and Path(v.onnx).is_file()
