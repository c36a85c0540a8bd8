"""Kill a training run mid-way, run it again with ``resume="auto"``: finished epochs are not repeated.

The folder is the one a retried nightly flow run uses (``damage.tasks.nightly.skip.train_dir_for`` keyed by the
pipeline key), so this is what happens when Prefect retries the flow after a crash.
"""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

EPOCHS = 3
# Validation of an untrained model (conf 0.001, 300 dets, masks) dominates a tiny epoch: validate
# only at the end, no plots. Both are among the arguments Ultralytics lets a resume change.
FAST = {"val": False, "plots": False}
WORKER = textwrap.dedent("""
    import sys
    from damage.tasks.core.config import TrainConfig
    from damage.tasks.training.train import train_model
    data, out, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = TrainConfig(plots=False, model="n", epochs=epochs, imgsz=64, batch=8, patience=0, resume="auto", workers=0,
                      warmup_epochs=0, augment="light")
    train_model(data, cfg, out, seed=0, name="train", extra_args={"val": False, "plots": False})
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


def _killpg(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # a crash, not a clean shutdown: no handler runs
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def small_dataset(state_paths, tmp_path_factory) -> Path:
    from damage.tasks.data.synth import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("resume_ds") / "ds", images=16, seed=0, imgsz=64,
                            val_fraction=0.25)


@pytest.mark.integration
def test_killed_training_resumes_from_last_pt(small_dataset, tmp_path, state_paths):
    from damage.tasks.core.config import TrainConfig
    from damage.tasks.nightly.skip import resumable_train_config, train_dir_for
    from damage.tasks.training.train import train_model

    out = train_dir_for(tmp_path / "runs", "k" * 16)
    run_dir = out / "train"
    last = run_dir / "weights" / "last.pt"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(small_dataset), str(out), str(EPOCHS)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    killed_at = -1
    try:
        deadline, seen_mtime = time.monotonic() + 420, 0.0
        while time.monotonic() < deadline and proc.poll() is None:
            mtime = last.stat().st_mtime if last.is_file() else 0.0
            if mtime != seen_mtime:
                seen_mtime = mtime
                killed_at = _ckpt_epoch(last)
                if killed_at >= 0:  # the first epoch is checkpointed: crash now
                    break
            time.sleep(0.2)
    finally:
        _killpg(proc)
    if killed_at < 0:
        err = proc.stderr.read().decode(errors="replace")[-3000:] if proc.stderr else ""
        pytest.fail(f"no checkpoint before the worker ended (rc={proc.returncode}):\n{err}")
    # the worker kept training while the checkpoint was read: what counts is what the crash left on disk
    killed_at = _ckpt_epoch(last)
    assert 0 <= killed_at < EPOCHS - 1, "training finished before it could be killed; raise EPOCHS"
    done = _epochs_in_csv(run_dir / "results.csv")
    # results.csv (1-based) holds the checkpointed epochs, and one more when the crash fell between the
    # csv row and the checkpoint of the next epoch (the resume trims it: damage.tasks.training.train._trim_results)
    assert done in (list(range(1, killed_at + 2)), list(range(1, killed_at + 3))), (killed_at, done)

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
