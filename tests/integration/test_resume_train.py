"""Kill a training run mid-way, run it again with ``resume="auto"``: finished epochs are not repeated.

The folder is the one a retried nightly flow run uses (``damage.tasks.nightly.skip.train_dir_for`` keyed by the
pipeline key), so this is what happens when Prefect retries the flow after a crash.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

EPOCHS = 3
# Validation of an untrained model (conf 0.001, 300 dets, masks) dominates a tiny epoch: validate
# only at the end, no plots. Both are among the arguments Ultralytics lets a resume change.
FAST = {"val": False, "plots": False}
# The worker crashes itself (SIGKILL: no handler, no clean shutdown) at a chosen point of a chosen epoch, so
# where the crash falls does not depend on how fast this machine trains. Ultralytics ends an epoch with
# results.csv's row, then last.pt, then the on_fit_epoch_end callback (train_model's on_epoch):
#   "after_checkpoint":  in on_epoch, once last.pt holds the epoch;
#   "before_checkpoint": in the trainer's save_model, after the csv row and before last.pt is written.
WORKER = textwrap.dedent("""
    import os, signal, sys
    from ultralytics.engine.trainer import BaseTrainer
    from damage.tasks.core.config import TrainConfig
    from damage.tasks.training.train import train_model
    data, out, epochs, crash_at, where = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]

    def crash():
        os.kill(os.getpid(), signal.SIGKILL)

    if where == "before_checkpoint":
        save_model = BaseTrainer.save_model

        def save_or_crash(self):
            if self.epoch == crash_at:
                crash()
            return save_model(self)

        BaseTrainer.save_model = save_or_crash

    def on_epoch(epoch, metrics):
        if where == "after_checkpoint" and epoch == crash_at:
            crash()

    cfg = TrainConfig(plots=False, model="n", epochs=epochs, imgsz=64, batch=8, patience=0, resume="auto", workers=0,
                      warmup_epochs=0, augment="light")
    train_model(data, cfg, out, seed=0, name="train", on_epoch=on_epoch, extra_args={"val": False, "plots": False})
""")


def _epochs_in_csv(csv_path: Path) -> list[int]:
    if not csv_path.is_file():
        return []
    with open(csv_path, newline="") as f:
        return [int(float(row["epoch"])) for row in csv.DictReader(f)]


def _ckpt_epoch(last: Path) -> int:
    """Epoch (0-based) stored in last.pt, or -1 while it is missing or half-written."""
    import torch

    try:
        return int(torch.load(last, map_location="cpu", weights_only=False).get("epoch", -1))
    except Exception:
        return -1


@pytest.fixture(scope="module")
def small_dataset(state_paths, tmp_path_factory) -> Path:
    from damage.tasks.data.synth import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("resume_ds") / "ds", images=16, seed=0, imgsz=64,
                            val_fraction=0.25)


@pytest.mark.integration
@pytest.mark.parametrize(("where", "crash_at", "checkpointed", "csv_rows"), [
    ("after_checkpoint", 0, 0, [1]),
    ("before_checkpoint", 1, 0, [1, 2]),  # the resume trims the extra row (train._trim_results)
])
def test_killed_training_resumes_from_last_pt(small_dataset, tmp_path, state_paths, where, crash_at, checkpointed,
                                              csv_rows):
    from damage.tasks.core.config import TrainConfig
    from damage.tasks.nightly.skip import resumable_train_config, train_dir_for
    from damage.tasks.training.train import train_model

    out = train_dir_for(tmp_path / "runs", "k" * 16)
    run_dir = out / "train"
    last = run_dir / "weights" / "last.pt"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", WORKER, str(small_dataset), str(out), str(EPOCHS), str(crash_at),
                           where], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    err = proc.stderr.decode(errors="replace")[-3000:]
    assert proc.returncode == -signal.SIGKILL, f"the worker did not crash where planted (rc={proc.returncode}):\n{err}"
    killed_at = _ckpt_epoch(last)
    assert killed_at == checkpointed, (killed_at, err)
    assert _epochs_in_csv(run_dir / "results.csv") == csv_rows

    # The retried attempt: same folder, resume="auto" (what the retried flow run does).
    seen: list[int] = []
    cfg = resumable_train_config(TrainConfig(plots=False,
                                             model="n", epochs=EPOCHS, imgsz=64, batch=8, patience=0, workers=0,
                                             warmup_epochs=0, augment="light"))
    res = train_model(small_dataset, cfg, out, seed=0, name="train", on_epoch=lambda e, m: seen.append(e),
                      extra_args=FAST)
    # Ultralytics also fires the epoch callback once after training (final validation of best.pt, at
    # epoch == EPOCHS); the training epochs are those below EPOCHS.
    trained = [e for e in seen if e < EPOCHS]
    assert trained == list(range(killed_at + 1, EPOCHS)), f"killed after epoch {killed_at}, re-ran {trained}"
    assert _epochs_in_csv(res.results_csv) == list(range(1, EPOCHS + 1))  # each epoch once
    assert res.run_dir == run_dir.resolve() and res.epochs_run == EPOCHS
    assert _ckpt_epoch(res.last) == -1  # finished: optimizer stripped, a later "auto" starts afresh


@pytest.mark.integration
def test_resume_auto_without_checkpoint_starts_fresh(tmp_path):
    from damage.tasks.core.config import TrainConfig
    from damage.tasks.training.train import _resume_checkpoint

    cfg = TrainConfig(resume="auto")
    assert _resume_checkpoint(cfg, tmp_path, "train") is None
    (tmp_path / "train" / "weights").mkdir(parents=True)
    (tmp_path / "train" / "weights" / "last.pt").write_bytes(b"half-written")  # killed mid-save
    assert _resume_checkpoint(cfg, tmp_path, "train") is None
