"""Training knobs reach Ultralytics: the trainer's gradient accumulation is ``nbs / batch``."""

from __future__ import annotations

import pytest

from damage.tasks.core.config import TrainConfig
from damage.tasks.training.train import build_train_args


def test_nbs_defaults_to_batch_and_knobs_are_passed(tmp_path):
    cfg = TrainConfig(batch=8, val=False, optimizer="AdamW", lr0=0.002, warmup_epochs=0.5, momentum=0.9,
                      weight_decay=1e-4, cache="ram", imgsz=128, epochs=7)
    args = build_train_args(cfg, tmp_path / "data.yaml", tmp_path, "run", seed=0)
    assert args["nbs"] == 8  # null -> batch: one optimiser step per batch
    assert (args["val"], args["optimizer"], args["lr0"], args["warmup_epochs"]) == (False, "AdamW", 0.002, 0.5)
    assert (args["momentum"], args["weight_decay"], args["cache"]) == (0.9, 1e-4, "ram")
    assert (args["imgsz"], args["epochs"]) == (128, 7)
    assert (args["box"], args["cls"], args["dfl"]) == (7.5, 0.5, 1.5)  # Ultralytics' loss gains by default
    assert build_train_args(TrainConfig(batch=8, nbs=64), tmp_path / "d.yaml", tmp_path, "r", 0)["nbs"] == 64


def test_nbs_rejects_zero():
    with pytest.raises(ValueError):
        TrainConfig(nbs=0)


@pytest.mark.parametrize(("batch", "nbs", "expected", "epochs"), [(4, 12, 3, 1), (4, None, 1, 2)])
def test_trainer_accumulates_nbs_over_batch(state_paths, tiny_dataset, tmp_path, batch, nbs, expected, epochs):
    """Read off the Ultralytics trainer (``accumulate`` at train start), not recomputed here."""
    from damage.tasks.training.train import train_model

    seen: dict[int, dict[str, float]] = {}
    cfg = TrainConfig(plots=False,
                      model="n", epochs=epochs, imgsz=64, batch=batch, nbs=nbs, val=False, patience=0, cls=1.0)
    res = train_model(tiny_dataset, cfg, tmp_path, seed=0, on_epoch=lambda e, m: seen.setdefault(e, m),
                      extra_args={"plots": False})  # plots cost more than the two tiny epochs
    assert res.accumulate == expected
    assert res.args["nbs"] == (nbs or batch)
    # the loss gains as the Ultralytics trainer saved its own arguments (what its loss reads)
    import yaml

    trainer_args = yaml.safe_load((res.last.parent.parent / "args.yaml").read_text())
    assert (trainer_args["cls"], trainer_args["box"], trainer_args["dfl"]) == (1.0, 7.5, 1.5)
    # val off: only the last epoch is validated, earlier epochs report losses but no (fake zero) mAP
    assert sorted(seen) == list(range(epochs))
    assert "mask/mAP50" in seen[epochs - 1]
    assert all("mask/mAP50" not in seen[e] and "train/seg_loss" in seen[e] for e in range(epochs - 1))


class _EpochClock:
    """Ultralytics' trainer clock, replaced: it reads ``now``, which moves ``epoch_s`` per training epoch
    (when the epoch's callback fires, before the trainer looks at the time), whatever the machine's speed."""

    def __init__(self, epoch_s: float):
        import time

        self.now, self.epoch_s = time.time(), epoch_s

    def time(self) -> float:
        return self.now


def test_time_budget_overrides_epochs(state_paths, tiny_dataset, tmp_path, monkeypatch):
    """train.time_min reaches Ultralytics (hours), which re-plans the epochs from the measured epoch time and
    stops on the budget, not after ``epochs``. An injected clock makes every epoch last 30 s: a 0.9 min
    budget then means 2 epochs planned (ceil(54 / 30)) and run, never 40, however loaded the machine."""
    import ultralytics.engine.trainer as trainer_mod

    from damage.tasks.training.train import train_model

    assert build_train_args(TrainConfig(), tmp_path / "d.yaml", tmp_path, "r", 0)["time"] is None
    cfg = TrainConfig(plots=False, model="n", epochs=40, time_min=0.9, imgsz=64, batch=8, val=False, patience=0)
    assert build_train_args(cfg, tmp_path / "d.yaml", tmp_path, "r", 0)["time"] == pytest.approx(0.9 / 60)
    clock = _EpochClock(30.0)
    real = trainer_mod.BaseTrainer.run_callbacks

    def run_callbacks(self, event: str) -> None:
        if event == "on_train_epoch_end":
            clock.now += clock.epoch_s
        real(self, event)

    monkeypatch.setattr(trainer_mod, "time", clock)  # the module's only use of `time` is time.time()
    monkeypatch.setattr(trainer_mod.BaseTrainer, "run_callbacks", run_callbacks)
    seen: dict[int, dict[str, float]] = {}
    train_model(tiny_dataset, cfg, tmp_path, seed=0, on_epoch=lambda e, m: seen.setdefault(e, m))
    assert sorted(seen) == [0, 1]
    # the epoch count Ultralytics re-planned from the budget is what each epoch reports, not `epochs`
    assert [seen[e]["epochs_planned"] for e in (0, 1)] == [2, 2]


def test_warmup_bias_lr_reaches_ultralytics(tmp_path):
    """Default: Ultralytics' 0.1; a configured value is passed through (0 is what its own AdamW uses)."""
    assert build_train_args(TrainConfig(), tmp_path / "d.yaml", tmp_path, "r", 0)["warmup_bias_lr"] == 0.1
    cfg = TrainConfig(optimizer="AdamW", warmup_bias_lr=0.0)
    assert build_train_args(cfg, tmp_path / "d.yaml", tmp_path, "r", 0)["warmup_bias_lr"] == 0.0
