"""Distillation: the Hinton term's maths, and a KD run that logs its loss terms and the scratch comparison."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def test_hinton_loss_zero_on_agreement_positive_otherwise():
    from damage.tasks.training.distill import hinton_kd_loss

    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 7, 50, generator=g)
    fg = torch.zeros(2, 50, dtype=torch.bool)
    fg[:, :10] = True
    assert hinton_kd_loss(t.clone(), t, fg, 4.0).abs() < 1e-6
    s = torch.randn(2, 7, 50, generator=g, requires_grad=True)
    loss = hinton_kd_loss(s, t, fg, 4.0)
    assert loss > 0
    loss.backward()
    assert s.grad[:, :, 10:].abs().sum() == 0  # only anchors matched to ground truth are distilled
    assert s.grad[:, :, :10].abs().sum() > 0
    # gradient pushes the student's logits toward the teacher's
    assert (torch.sign(-s.grad[:, :, :10]) == torch.sign(t - s.detach())[:, :, :10]).float().mean() > 0.99


def test_hinton_loss_t_squared_keeps_scale_and_empty_foreground():
    from damage.tasks.training.distill import hinton_kd_loss

    g = torch.Generator().manual_seed(1)
    t, s = torch.randn(1, 7, 40, generator=g), torch.randn(1, 7, 40, generator=g)
    fg = torch.ones(1, 40, dtype=torch.bool)
    hi = [hinton_kd_loss(s, t, fg, T).item() for T in (20.0, 40.0)]
    assert abs(hi[0] - hi[1]) / hi[1] < 0.05  # T^2 factor: loss scale independent of T at high T
    sg = s.clone().requires_grad_(True)
    empty = hinton_kd_loss(sg, t, torch.zeros(1, 40, dtype=torch.bool), 4.0)
    assert empty.item() == 0 and empty.requires_grad


def test_kd_run_logs_loss_terms_and_scratch_comparison(state_paths, tiny_model, tiny_dataset, tmp_path, monkeypatch):
    import damage.tasks.evaluation.evaluate as E
    from damage.tasks.core import tracking
    from damage.tasks.core.config import DistillConfig, TrainConfig
    from damage.tasks.training.distill import distill_vs_scratch
    from damage.tasks.training.prune import count_params, load_model

    # The real evaluator runs on each student; a 1-epoch student scores ~0 either way, so the accuracy
    # figures it returns are replaced by distinct ones per arm: a swapped or self-subtracted difference,
    # or the wrong arm's figures, then shows in the logged values.
    real_evaluate = E.evaluate_model
    seen: dict[str, str] = {}

    def evaluate(weights, *a, **kw):
        res = real_evaluate(weights, *a, **kw)
        arm = "kd" if "kd" in Path(weights).parts else "scratch"
        seen[arm] = str(weights)
        base = {"kd": 0.30, "scratch": 0.10}[arm]
        for i, k in enumerate(("mask/mAP50", "mask/mAP50-95", "box/mAP50", "box/mAP50-95")):
            res.metrics[k] = base + 0.01 * i
        return res

    monkeypatch.setattr(E, "evaluate_model", evaluate)

    c = tracking.client()
    exp = tracking.ensure_experiment(c, "test-distill")
    parent = tracking.start_run(c, exp, "pytest-distill")
    dcfg = DistillConfig(student="n", epochs=1, hinton=True, temperature=4.0, hinton_weight=1.0)
    from damage.tasks.evaluation.evaluate import Evaluator

    res = distill_vs_scratch(tiny_model, tiny_dataset, TrainConfig(plots=False,
                                                                   imgsz=96, batch=8, patience=0), dcfg, tmp_path,
                             parent_run_id=parent, evaluator=Evaluator(imgsz=96))
    tracking.end_run(c, parent)
    assert {"train/dis_loss", "train/kd_loss"} <= set(res["kd_loss_terms"])
    student = load_model(res["kd_weights"])  # the saved student is a bare model, not the teacher wrapper
    assert type(student).__name__ == "SegmentationModel"
    assert count_params(student) == count_params(load_model(res["scratch_weights"]))
    runs = c.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")
    cmp_run = next(r for r in runs if r.info.run_name == "distill/compare")
    assert seen == {"kd": res["kd_weights"], "scratch": res["scratch_weights"]}  # each arm evaluated on its own
    m = cmp_run.data.metrics
    for i, k in enumerate(("mask/mAP50", "mask/mAP50-95", "box/mAP50", "box/mAP50-95")):
        assert m[f"kd/{k}"] == pytest.approx(0.30 + 0.01 * i) and m[f"scratch/{k}"] == pytest.approx(0.10 + 0.01 * i)
        assert m[f"kd_minus_scratch/{k}"] == pytest.approx(0.20)  # KD minus scratch, not the reverse
        assert res["diff"][f"kd_minus_scratch/{k}"] == pytest.approx(0.20)
    arms = {r.info.run_name: r for r in c.search_runs([exp], f"tags.mlflow.parentRunId = '{cmp_run.info.run_id}'")}
    assert set(arms) == {"distill/kd", "distill/scratch"}
    kd_hist = c.get_metric_history(arms["distill/kd"].info.run_id, "train/kd_loss")
    assert kd_hist and kd_hist[-1].value > 0
    assert c.get_metric_history(arms["distill/kd"].info.run_id, "train/dis_loss")
    assert "train/kd_loss" not in arms["distill/scratch"].data.metrics


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_hinton_loss_rejects_bad_temperature(bad):
    from damage.tasks.core.errors import DamageError
    from damage.tasks.training.distill import hinton_kd_loss

    x = torch.zeros(1, 2, 3)
    with pytest.raises(DamageError):
        hinton_kd_loss(x, x, torch.ones(1, 3, dtype=torch.bool), bad)
