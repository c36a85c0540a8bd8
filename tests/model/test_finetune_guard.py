"""The fine-tune parent guard (issue 12, item 5): a nightly fine-tune keeps the best epoch that loses no class.

The choice rule is a pure function (``GuardState.judge``); the trainer tests fine-tune the shared
``trained_model`` for two epochs, with a scripted evaluator (a fitter epoch that loses a class must
not become best.pt) and with the pipeline's evaluator (the parent's figures are the evaluator's).
"""

from __future__ import annotations

import json
import math

import pytest

from damage.tasks.evaluation.metrics import class_drops
from damage.tasks.training.guard import GUARD_FILE, GuardState


def _aps(**kw: float) -> dict[str, float]:
    return {f"mask_ap50/{k}": v for k, v in kw.items()}


def test_a_better_epoch_that_loses_a_class_is_not_kept():
    g = GuardState(parent=_aps(dent=0.5, glass=0.8), tol=0.01)
    assert g.judge(0, 0.30, _aps(dent=0.55, glass=0.805)).chosen  # qualifies (glass +0.005)
    later = g.judge(1, 0.45, _aps(dent=0.9, glass=0.75))  # much fitter, but glass dropped 0.05 > 0.01
    assert not later.qualified and not later.chosen
    assert later.worst_class == "glass" and later.worst_drop == pytest.approx(0.05)
    assert g.chosen.epoch == 0
    assert g.judge(2, 0.35, _aps(dent=0.6, glass=0.795)).chosen  # within the tolerance and fitter than epoch 0
    s = g.summary()
    assert (s["guard.chosen_epoch"], s["guard.qualified_epochs"], s["guard.chosen_qualified"]) == (3, 2, True)


def test_when_no_epoch_qualifies_the_least_regressed_is_kept_and_flagged():
    g = GuardState(parent=_aps(dent=0.5, glass=0.8))
    g.judge(0, 0.5, _aps(dent=0.2, glass=0.8))  # dent -0.3
    g.judge(1, 0.1, _aps(dent=0.45, glass=0.79))  # worst -0.05: kept although less fit
    g.judge(2, 0.9, _aps(dent=0.4, glass=0.9))  # worst -0.1
    assert g.chosen.epoch == 1
    assert g.summary()["guard.chosen_qualified"] is False
    # a qualifying epoch beats any non-qualifying one, whatever the fitness
    assert g.judge(3, 0.01, _aps(dent=0.5, glass=0.8)).chosen


def test_a_class_missing_from_an_epoch_counts_as_lost_and_nan_parent_classes_are_ignored():
    g = GuardState(parent={**_aps(dent=0.4, glass=0.7), "mask_ap50/lamp": math.nan})
    v = g.judge(0, 0.2, _aps(glass=0.9))  # dent vanished: AP 0
    assert (v.worst_class, v.worst_drop, v.qualified) == ("dent", pytest.approx(0.4), False)
    assert set(class_drops(g.parent, _aps(dent=0.4, glass=0.7))) == {"dent", "glass"}  # lamp: no labels


def test_state_round_trips_through_its_file(tmp_path):
    g = GuardState(parent=_aps(dent=0.5), tol=0.02)
    g.judge(0, 0.3, _aps(dent=0.6))
    g.judge(1, 0.2, _aps(dent=0.1))
    g.save(tmp_path / GUARD_FILE)
    back = GuardState.load(tmp_path / GUARD_FILE)
    assert back.parent == g.parent and back.tol == 0.02
    assert [(e.epoch, e.chosen, e.qualified) for e in back.epochs] == [(0, True, True), (1, False, False)]
    assert GuardState.load(tmp_path / "missing.json") is None


def _load(pt):
    import torch

    return torch.load(pt, map_location="cpu", weights_only=False)


def _same_weights(a, b) -> bool:
    import torch

    def net(pt):  # Ultralytics' strip_optimizer moves the EMA weights to "model"
        ck = _load(pt)
        return (ck.get("ema") or ck["model"]).float().state_dict()

    sa, sb = net(a), net(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _finetune_cfg(trained_model, imgsz):
    from damage.tasks.core.config import TrainConfig
    from damage.tasks.training.init import finetune_config

    return finetune_config(TrainConfig(plots=False, model="n", epochs=2, imgsz=imgsz, batch=8, nbs=8, patience=0,
                                       optimizer="AdamW", lr0=0.002, augment="light", val=False), trained_model)


def test_guard_keeps_the_qualifying_epoch_over_a_fitter_one_that_loses_a_class(trained_model, easy_dataset,
                                                                              easy_imgsz, tmp_path):
    """A stand-in evaluator scores the parent, then epoch 1 (dent up: qualifies) and epoch 2 (far fitter, dent
    down): best.pt must hold epoch 1, and the epoch metrics carry the guard's figures."""
    from damage.tasks.training.train import train_model

    calls: list[str] = []
    script = [{"fitness": 0.30, "mask/mAP50": 0.5, "mask_ap50/dent": 0.50, "mask_ap50/glass": 0.70},
              {"fitness": 0.35, "mask/mAP50": 0.55, "mask_ap50/dent": 0.60, "mask_ap50/glass": 0.70},
              {"fitness": 0.90, "mask/mAP50": 0.80, "mask_ap50/dent": 0.30, "mask_ap50/glass": 0.95}]

    def fake_eval(path):
        calls.append(str(path))
        return script[len(calls) - 1]

    cfg = _finetune_cfg(trained_model, easy_imgsz)
    assert cfg.finetune and cfg.finetune_guard
    seen: dict[int, dict[str, float]] = {}
    res = train_model(easy_dataset, cfg, tmp_path, seed=0, extra_args={"plots": False}, guard_eval=fake_eval,
                      on_epoch=lambda e, m: seen.setdefault(e, m))
    assert calls[0] == str(trained_model) and calls[1:] == [str(res.last)] * 2  # parent, then each epoch's last.pt
    state = json.loads((res.run_dir / GUARD_FILE).read_text())
    assert state["parent"] == {"mask_ap50/dent": 0.5, "mask_ap50/glass": 0.7}
    assert [(e["epoch"], e["qualified"], e["chosen"]) for e in state["epochs"]] == [(0, True, True), (1, False, False)]
    assert res.guard["guard.chosen_epoch"] == 1 and res.guard["guard.chosen_worst_drop"] == 0.0  # glass held
    # best.pt (optimizer stripped by Ultralytics' final validation, so no epoch left in it) holds the weights
    # of the kept epoch-0 checkpoint, not the last epoch's
    kept = res.run_dir / "weights" / "guard_best.pt"
    assert _load(kept)["epoch"] == 0  # last.pt, stripped too, has no epoch left either
    assert _same_weights(res.best, kept) and not _same_weights(res.best, res.last)
    assert seen[1]["guard/worst_class_drop"] == pytest.approx(0.2) and seen[1]["guard/qualified"] == 0.0
    assert seen[0]["guard/mask_ap50/dent"] == 0.6


def test_guard_scores_with_the_pipeline_evaluator(trained_model, easy_dataset, easy_imgsz, tmp_path):
    """The guard scores with the gate's ``Evaluator``, which the caller must pass (no default evaluator that
    ignores the evaluate: settings): the parent's per-class figures are exactly what the evaluator reports for
    the starting weights, and best.pt is the chosen epoch."""
    from damage.tasks.core.errors import DamageError
    from damage.tasks.evaluation.evaluate import Evaluator
    from damage.tasks.training.train import train_model

    cfg = _finetune_cfg(trained_model, easy_imgsz)
    with pytest.raises(DamageError, match="guard_eval"):
        train_model(easy_dataset, cfg, tmp_path / "no-evaluator", seed=0, extra_args={"plots": False})
    res = train_model(easy_dataset, cfg, tmp_path, seed=0, extra_args={"plots": False},
                      guard_eval=Evaluator(imgsz=easy_imgsz).metrics_fn(easy_dataset))
    state = json.loads((res.run_dir / GUARD_FILE).read_text())
    direct = Evaluator(imgsz=easy_imgsz)(trained_model, easy_dataset).metrics
    want = {k: v for k, v in direct.items() if k.startswith("mask_ap50/")}
    assert set(state["parent"]) == set(want) and want
    for k, v in want.items():
        assert state["parent"][k] == pytest.approx(v, abs=1e-9, nan_ok=True), k
    chosen = [e for e in state["epochs"] if e["chosen"]]
    assert len(chosen) == 1 and len(state["epochs"]) == 2
    kept = res.run_dir / "weights" / "guard_best.pt"
    assert _load(kept)["epoch"] == chosen[0]["epoch"] and _same_weights(res.best, kept)


def test_a_finetune_starts_from_the_whole_checkpoint_class_head_included(trained_model, easy_dataset, easy_imgsz,
                                                                         tmp_path):
    """One epoch at a learning rate of ~0 from the trained checkpoint: every tensor, the classification output
    convolutions included, is still the checkpoint's. (Built from the bare YAML, the network had 80 classes: the
    7-class output convolutions did not load and the trainer re-headed the model with fresh ones.)"""
    import torch

    from damage.tasks.core.config import TrainConfig
    from damage.tasks.training.init import finetune_config
    from damage.tasks.training.train import train_model

    cfg = finetune_config(TrainConfig(plots=False,
                                      model="n", epochs=1, imgsz=easy_imgsz, batch=8, nbs=8, patience=0, lr0=1e-9,
                                      optimizer="AdamW", augment="light", val=False, finetune_guard=False),
                          trained_model)
    res = train_model(easy_dataset, cfg, tmp_path, seed=0, extra_args={"plots": False})

    def net(pt):
        ck = _load(pt)
        return (ck.get("ema") or ck["model"]).float().state_dict()

    before, after = net(trained_model), net(res.last)
    heads = [k for k in before if ".cv3." in k and k.split(".")[3] == "2"]  # cv3.<level>.2: class logits
    assert heads and all(after[k].shape == before[k].shape for k in heads)
    for k in before:
        if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue  # BatchNorm statistics move with the training batches, whatever the learning rate
        assert torch.allclose(after[k], before[k], atol=1e-2), k
