"""Pruning: C2f twin equivalence, structured pruning that runs/exports, fine-tune keeps the pruned shape."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch


def _yaml_model():
    from ultralytics import YOLO

    m = YOLO("yolov8n-seg.yaml").model.float().eval()
    g = torch.Generator().manual_seed(0)
    for mod in m.modules():  # non-trivial BN statistics so equivalence is a real check
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.copy_(torch.rand(mod.num_features, generator=g) - 0.5)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    return m


def test_c2f_v2_swap_has_identical_outputs(state_paths):
    from ultralytics.nn.modules.block import C2f

    from damage.tasks.training.prune import C2f_v2, replace_c2f

    m = _yaml_model()
    twin = copy.deepcopy(m)
    n = replace_c2f(twin)
    assert n == sum(type(x) is C2f for x in m.modules()) > 0
    assert not any(type(x) is C2f for x in twin.modules())
    assert any(isinstance(x, C2f_v2) for x in twin.modules())
    def bn_settings(model):
        return {(b.eps, b.momentum) for b in model.modules() if isinstance(b, torch.nn.BatchNorm2d)}

    assert bn_settings(twin) == bn_settings(m) == {(1e-3, 0.03)}  # YOLO's BN settings kept, not torch defaults
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        (y0, p0), _ = m(x)
        (y1, p1), _ = twin(x)
    assert torch.allclose(y0, y1, atol=1e-5, rtol=1e-5)
    assert torch.allclose(p0, p1, atol=1e-6)


def test_unstructured_reaches_sparsity_and_masks_are_permanent(state_paths):
    from damage.tasks.training.prune import head_protected_layers, prune_unstructured_model

    m = _yaml_model()
    keys = set(m.state_dict())
    before = [c.weight.clone() for layer in head_protected_layers(m) for c in layer.modules()
              if isinstance(c, torch.nn.Conv2d)]
    achieved = prune_unstructured_model(m, 0.5, scope="global")
    assert abs(achieved - 0.5) < 0.01
    assert set(m.state_dict()) == keys  # no weight_orig / weight_mask left behind
    assert not any(hasattr(x, "weight_mask") for x in m.modules())
    after = [c.weight for layer in head_protected_layers(m) for c in layer.modules() if isinstance(c, torch.nn.Conv2d)]
    assert len(after) == len(before) > 0
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))  # output layers untouched
    m2 = _yaml_model()
    prune_unstructured_model(m2, 0.3, scope="layer")
    protected = {id(c) for layer in head_protected_layers(m2) for c in layer.modules()}
    convs = [x for x in m2.modules() if isinstance(x, torch.nn.Conv2d) and x.weight.numel() > 100
             and id(x) not in protected]
    fr = [1 - torch.count_nonzero(c.weight).item() / c.weight.numel() for c in convs]
    assert min(fr) > 0.25 and max(fr) < 0.35  # per layer: every layer near the target


def test_method_table_refuses_unknown_arguments():
    from damage.tasks.core.errors import DamageError
    from damage.tasks.training.prune import check_method_args

    check_method_args("structured", ratio=0.3)
    with pytest.raises(DamageError, match="does not accept"):
        check_method_args("unstructured", ratio=0.3)
    with pytest.raises(DamageError, match="unknown pruning method"):
        check_method_args("magic")


@pytest.fixture(scope="module")
def pruned(tiny_model, tmp_path_factory):
    from damage.tasks.training.prune import prune_structured

    out = tmp_path_factory.mktemp("pruned")
    path, rep = prune_structured(tiny_model, out / "pruned.pt", ratio=0.3, imgsz=96)
    return path, rep


def test_structured_pruned_model_runs_and_exports(tiny_model, pruned, tmp_path):
    import onnxruntime as ort

    from damage.tasks.export.onnx import export_onnx
    from damage.tasks.training.prune import count_params, load_model

    path, rep = pruned
    assert rep.params_after < 0.8 * rep.params_before
    assert rep.gflops_after < rep.gflops_before
    model = load_model(path)  # a normal Ultralytics checkpoint
    assert count_params(model) == rep.params_after
    model = model.fuse()  # Conv+BN folded, as the exporter does
    x = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (y, proto), _ = model(x)
    full = load_model(tiny_model)
    with torch.no_grad():
        (y_full, proto_full), _ = full(x)
    assert y.shape == y_full.shape and proto.shape == proto_full.shape  # head outputs untouched
    onnx = export_onnx(path, tmp_path / "pruned.onnx", 96)
    sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    det, pro = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})  # the same input as the torch run
    assert [det.shape, pro.shape] == [tuple(y.shape), tuple(proto.shape)]
    np.testing.assert_allclose(det[:, :4], y[:, :4].numpy(), atol=0.05)  # boxes, pixels
    np.testing.assert_allclose(det[:, 4:], y[:, 4:].numpy(), atol=1e-3)  # scores and mask coefficients
    np.testing.assert_allclose(pro, proto.numpy(), atol=1e-3)
    assert not np.allclose(det, y_full.numpy(), atol=1e-3)  # and it is the pruned network, not the parent


def test_export_variant_gates_parity_on_a_pruned_model(tiny_model, pruned, tmp_path, monkeypatch):
    import damage.tasks.export.onnx as O
    from damage.tasks.core.config import Config
    from damage.tasks.core.errors import GateFailed
    from damage.tasks.export.chain_steps import export_variant
    from damage.tasks.export.onnx import read_onnx_metadata

    path, _ = pruned
    cfg = Config()
    onnx, parity = export_variant(path, tmp_path / "pruned.onnx", cfg, 96, {"variant": "pruned"})
    assert parity["passed"] and parity["images"] == cfg.export.parity_images and parity["imgsz"] == 96
    assert parity["figures"]["det_max_abs"] <= cfg.export.parity_atol
    assert parity["figures"]["proto_max_abs"] <= cfg.export.parity_atol
    assert read_onnx_metadata(onnx)["variant"] == "pruned"
    # An export that computes something else (here: the unpruned parent's graph) must be refused.
    real_export = O.export_onnx

    def wrong_export(weights, out, *a, **kw):
        return real_export(tiny_model, out, *a, **kw)

    monkeypatch.setattr(O, "export_onnx", wrong_export)
    with pytest.raises(GateFailed, match="parity gate failed"):
        export_variant(path, tmp_path / "wrong.onnx", cfg, 96, {"variant": "pruned"})


def test_finetuned_pruned_checkpoint_keeps_pruned_param_count(pruned, tiny_dataset, tmp_path):
    from damage.tasks.core.config import TrainConfig
    from damage.tasks.training.prune import C2f_v2, count_params, finetune_pruned, load_model

    path, rep = pruned
    res = finetune_pruned(path, tiny_dataset, TrainConfig(plots=False,
                                                          epochs=1, imgsz=96, batch=8, patience=0), tmp_path)
    for ckpt in {res.best, res.last}:
        m = load_model(ckpt)
        assert count_params(m) == rep.params_after  # not rebuilt from the YAML
        assert any(isinstance(x, C2f_v2) for x in m.modules())
    raw = torch.load(res.best, map_location="cpu", weights_only=False)
    assert count_params(raw["ema"] if raw.get("ema") is not None else raw["model"]) == rep.params_after
