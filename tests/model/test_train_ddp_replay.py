"""Multi-GPU training (Ultralytics DDP) drops this process's callbacks (ultralytics#6168): its epochs are
reported after the fact from rank 0's results.csv. The replay must give what the callbacks give."""

from __future__ import annotations

import math

import pytest


def test_replayed_epochs_match_the_callbacks_of_a_single_process_run(state_paths, tiny_dataset, tmp_path):
    from damage.tasks.core.config import TrainConfig
    from damage.tasks.training.train import replay_epochs, train_model

    seen: list[tuple[int, dict[str, float]]] = []
    cfg = TrainConfig(plots=False, model="n", epochs=2, imgsz=96, batch=8, patience=0)
    res = train_model(tiny_dataset, cfg, tmp_path / "run", seed=0, on_epoch=lambda e, m: seen.append((e, dict(m))),
                      extra_args={"plots": False})
    # rank 0 of a DDP run writes this same file; the replay reads nothing else
    replayed = replay_epochs(res.history, cfg.epochs, validated_every_epoch=True)
    assert [e for e, _ in replayed] == [e for e, _ in seen] == [0, 1]
    for (_, live), (_, again) in zip(seen, replayed, strict=True):
        per_class = {k for k in live if k.startswith("mask_ap50/")}  # not in results.csv (the docstring says so)
        assert set(live) - per_class == set(again), (set(live) ^ set(again))
        for k, v in again.items():  # results.csv holds 6 significant digits
            assert math.isclose(v, live[k], rel_tol=1e-5, abs_tol=1e-9), (k, v, live[k])


def test_replay_without_per_epoch_validation_reports_validation_once():
    from damage.tasks.training.train import replay_epochs

    rows = [{"epoch": 1.0, "time": 3.0, "train/box_loss": 2.0, "metrics/mAP50(M)": 0.0, "val/seg_loss": 9.0,
             "lr/pg0": 0.01},
            {"epoch": 2.0, "time": 6.0, "train/box_loss": 1.5, "metrics/mAP50(M)": 0.25, "val/seg_loss": 4.0,
             "lr/pg0": 0.005}]
    out = replay_epochs(rows, 2, validated_every_epoch=False)
    assert out[0] == (0, {"train/box_loss": 2.0, "lr/pg0": 0.01, "epochs_planned": 2.0})
    assert out[1] == (1, {"train/box_loss": 1.5, "mask/mAP50": 0.25, "val/seg_loss": 4.0, "lr/pg0": 0.005,
                          "epochs_planned": 2.0})


def test_device_list_means_ddp_and_the_guard_refuses_it(state_paths, tiny_dataset, tmp_path):
    from damage.tasks.core.config import ConfigError, TrainConfig
    from damage.tasks.core.config_load import load_config
    from damage.tasks.core.errors import DamageError
    from damage.tasks.training.train import is_multi_gpu, train_model

    assert TrainConfig(device=[0, 1]).device == "0,1" and TrainConfig(device=0).device == "0"
    assert is_multi_gpu("0,1") and not is_multi_gpu("0") and not is_multi_gpu("cpu")
    assert load_config(overrides=["train.device=[0, 1]"]).train.device == "0,1"
    with pytest.raises(ConfigError, match="GPU indices"):
        load_config(overrides=["train.device=[gpu0]"])
    # a guarded fine-tune needs this process's callbacks: refused with DDP, before any training
    weights = tmp_path / "parent.pt"
    weights.write_bytes(b"")
    cfg = TrainConfig(plots=False, model="n", epochs=1, imgsz=96, device="0,1", finetune=True, weights=str(weights))
    with pytest.raises(DamageError, match="DDP"):
        train_model(tiny_dataset, cfg, tmp_path / "run", guard_eval=lambda p: {})
