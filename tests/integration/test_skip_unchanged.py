"""Skip-when-unchanged: tasks/nightly/skip.py against a real MLflow store. The nightly flow run twice (the
second skips) is tests/integration/test_nightly_ux.py::test_skipped_run_shows_as_skipped."""

from __future__ import annotations

from pathlib import Path

import pytest

from damage.tasks.core.config_load import load_config
from damage.tasks.nightly.skip import (
    check_unchanged,
    pipeline_key,
    record_skip,
    record_success,
    resumable_train_config,
    skip_config_hash,
    train_dir_for,
)


def _fake_dataset(root: Path) -> Path:
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        (root / "images" / split / "a.png").write_bytes(b"\x89PNG fake " + split.encode())
        (root / "labels" / split / "a.txt").write_text("0 0.1 0.1 0.5 0.1 0.5 0.5\n")
    y = root / "data.yaml"
    y.write_text("path: .\ntrain: images/train\nval: images/val\nnames: [vehicle]\n")
    return y


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite MLflow store for the module (each test uses its own experiment)."""
    return f"sqlite:///{tmp_path_factory.mktemp('skip-store') / 'mlflow.db'}"


def _finish(uri: str, experiment: str, decision, ok: bool = True) -> str:
    from damage.tasks.core import tracking
    c = tracking.client(uri)
    exp = tracking.ensure_experiment(c, experiment, (Path(uri[10:]).parent / "art").as_uri())
    run_id = tracking.start_run(c, exp, "nightly-test", tags={"damage.flow": "nightly"})
    if ok:
        record_success(uri, run_id, decision)
    tracking.end_run(c, run_id, ok)
    return run_id


def test_second_run_on_unchanged_data_skips_and_says_why(tmp_path, store):
    data = _fake_dataset(tmp_path / "ds")
    cfg = load_config(overrides=["mlflow.experiment=skip-test"])
    first = check_unchanged(data, cfg, store, code_version="abc")
    assert not first.skip and "new data" in first.reason

    failed = _finish(store, "skip-test", first, ok=False)  # a failed run never counts
    assert not check_unchanged(data, cfg, store, code_version="abc").skip

    good = _finish(store, "skip-test", first)
    second = check_unchanged(data, cfg, store, code_version="abc")
    assert second.skip and second.previous_run_id == good != failed
    assert f"unchanged since run {good}" in second.reason and second.key == first.key

    # Keys that cannot change the model do not defeat the skip ...
    moved = load_config(overrides=["mlflow.experiment=skip-test", "state_dir=/elsewhere", "schedule.cron=0 3 * * *",
                                   "train.resume=auto", "train.workers=2"])
    assert check_unchanged(data, moved, store, code_version="abc").skip
    # ... while data, config, code, force and the switch each do.
    assert not check_unchanged(data, cfg, store, code_version="abc", force=True).skip
    assert not check_unchanged(data, cfg, store, code_version="def").skip
    epochs = load_config(overrides=["mlflow.experiment=skip-test", "train.epochs=31"])
    assert not check_unchanged(data, epochs, store, code_version="abc").skip
    off = load_config(overrides=["mlflow.experiment=skip-test", "schedule.skip_unchanged=false"])
    assert not check_unchanged(data, off, store, code_version="abc").skip
    (data.parent / "labels" / "val" / "a.txt").write_text("0 0.2 0.1 0.5 0.1 0.5 0.5\n")
    changed = check_unchanged(data, cfg, store, code_version="abc")
    assert not changed.skip and changed.key != first.key


def test_record_skip_tags_the_run(tmp_path, store):
    from damage.tasks.core import tracking
    data = _fake_dataset(tmp_path / "ds")
    cfg = load_config(overrides=["mlflow.experiment=skip-tags"])
    d = check_unchanged(data, cfg, store, code_version="abc")
    prev = _finish(store, "skip-tags", d)
    d = check_unchanged(data, cfg, store, code_version="abc")
    c = tracking.client(store)
    run_id = tracking.start_run(c, c.get_experiment_by_name("skip-tags").experiment_id, "nightly-skip")
    summary = record_skip(store, run_id, d)
    tracking.end_run(c, run_id, True)
    tags = c.get_run(run_id).data.tags
    assert tags["damage.outcome"] == "skipped" and tags["damage.same_as_run"] == prev
    assert summary["skipped"] and prev in summary["reason"]
    # a skipped run is not itself a "last success": the original run stays the reference
    assert check_unchanged(data, cfg, store, code_version="abc").previous_run_id == prev


def test_key_and_resume_helpers(tmp_path):
    assert pipeline_key("a", "b", "c") == pipeline_key("a", "b", "c") != pipeline_key("a", "b", "d")
    cfg = load_config()
    assert skip_config_hash(cfg) == skip_config_hash(load_config(overrides=["train.resume=auto"]))
    assert resumable_train_config(cfg.train).resume == "auto"
    explicit = load_config(overrides=["train.resume=/x/last.pt"]).train
    assert resumable_train_config(explicit).resume == "/x/last.pt"
    assert train_dir_for(tmp_path, "k1") == tmp_path / "train-k1"
