"""Quantization-aware training (issue 17, item 6): ModelOpt fake-quant fine-tune, plain checkpoint, QAT rows.

ModelOpt is part of the dev install (the ``qat`` extra); these tests need it.
"""

from __future__ import annotations

import pytest

from damage.tasks.core.errors import DamageError


def test_fallback_reason_reads_the_accuracy_aware_summary():
    from damage.tasks.export.chain_steps import qat_fallback_reason
    from damage.tasks.export.variant import Variant

    def v(**info):
        return Variant("int8-static", "int8-static", "m.onnx", info=info)

    assert qat_fallback_reason(v(within_tolerance=True, float_nodes=0, graph_nodes=300), 0.1) is None
    assert qat_fallback_reason(v(within_tolerance=True, float_nodes=30, graph_nodes=300), 0.1) is None  # 10%: ok
    assert "31 of 300" in qat_fallback_reason(v(within_tolerance=True, float_nodes=31, graph_nodes=300), 0.1)
    assert "outside the accuracy tolerance" in qat_fallback_reason(v(within_tolerance=False, float_nodes=0,
                                                                     graph_nodes=300), 0.1)
    assert qat_fallback_reason(Variant("fp16", "fp16", "m.onnx"), 0.1) is None  # not an accuracy-aware INT8 row


def test_int8_qat_is_a_known_quantization_step():
    from damage.tasks.export.compress import plan_steps

    assert plan_steps(["prune", "int8-static", "int8-qat"]) == ["prune", "int8-static", "int8-qat"]
    with pytest.raises(DamageError, match="after a quantization"):
        plan_steps(["int8-qat", "prune"])


def test_missing_modelopt_is_a_clear_error(monkeypatch, tmp_path):
    import importlib.util

    from damage.tasks.core.config import TrainConfig
    from damage.tasks.training import qat

    real = importlib.util.find_spec
    monkeypatch.setattr(qat.importlib.util, "find_spec", lambda n, *a: None if n == "modelopt" else real(n, *a))
    assert "pip install '.[qat]'" in qat.qat_missing()
    with pytest.raises(DamageError, match="needs modelopt"):
        qat.qat_finetune(tmp_path / "x.pt", tmp_path / "data.yaml", TrainConfig(), tmp_path, 1, 0.01)


def test_qat_finetune_gives_plain_weights_that_quantize_within_tolerance(trained_model, easy_dataset, easy_imgsz,
                                                                        tmp_path):
    """One QAT epoch on the shared detecting model: the checkpoint it returns has no ModelOpt state, loads as a
    plain model, carries trained (changed) weights, and its static INT8 keeps mask mAP50 near the float parent."""
    import torch
    from ultralytics import YOLO
    from ultralytics.utils.torch_utils import is_qat

    from damage.tasks.core.config import TrainConfig
    from damage.tasks.evaluation.evaluate import Evaluator
    from damage.tasks.export.calibration import calibration_images
    from damage.tasks.export.onnx import export_onnx
    from damage.tasks.export.quantize import quantize_onnx
    from damage.tasks.training.qat import qat_finetune

    cfg = TrainConfig(plots=False,
                      model="n", imgsz=easy_imgsz, batch=8, nbs=8, optimizer="AdamW", lr0=0.002, augment="light")
    plain, res = qat_finetune(trained_model, easy_dataset, cfg, tmp_path / "runs", epochs=1, lr_scale=0.01)
    assert torch.load(res.best, map_location="cpu", weights_only=False).get("modelopt") is not None  # was QAT
    ck = torch.load(plain, map_location="cpu", weights_only=False)
    assert "modelopt" not in ck
    assert not is_qat(YOLO(str(plain)).model)
    sa = (ck.get("ema") or ck["model"]).float().state_dict()
    pk = torch.load(trained_model, map_location="cpu", weights_only=False)
    sb = (pk.get("ema") or pk["model"]).float().state_dict()
    assert sa.keys() == sb.keys() and any(not torch.equal(sa[k], sb[k]) for k in sa if k.endswith("conv.weight"))
    ev = Evaluator(imgsz=easy_imgsz).metrics_fn(easy_dataset)
    parent = ev(export_onnx(trained_model, tmp_path / "parent.onnx", easy_imgsz))["mask/mAP50"]
    f = export_onnx(plain, tmp_path / "qat.onnx", easy_imgsz)
    q = quantize_onnx(f, tmp_path / "qat.int8.onnx", "int8-static", calib_images=calibration_images(easy_dataset, 8),
                      imgsz=easy_imgsz)
    got = ev(q)["mask/mAP50"]
    assert parent > 0.5 and got >= parent - 0.1, (parent, got)
