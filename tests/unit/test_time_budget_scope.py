"""A training's wall-time budget (train.time_min) is for the training itself: steps that need an exact
epoch count (the distillation comparison, the pruned model's fine-tune) do not inherit it."""

from __future__ import annotations

from damage.tasks.core.config import DistillConfig, TrainConfig
from damage.tasks.training.distill import student_cfg


def test_students_train_their_epochs_not_the_time_budget():
    train = TrainConfig(model="n", epochs=40, time_min=11)
    dcfg = DistillConfig(student="n", epochs=3)
    cfg = student_cfg(train, dcfg)  # the KD student and its from-scratch baseline both train this config
    assert cfg.epochs == 3 and cfg.time_min is None
