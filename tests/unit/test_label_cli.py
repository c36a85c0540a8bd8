"""The labelling loop's commands: label-export, import of a Label Studio export (good, bad, twice), inbox-purge."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

from damage.tasks.core.config import CLASSES, CollectConfig
from damage.tasks.data.blobstore import LocalStore
from damage.tasks.data.label_studio import inbox_tasks
from damage.tasks.serving.inbox import Inbox, list_items
from tests.unit.test_inbox import Clock, png, pred
from tests.unit.test_label_studio import bad_export, ls_export, make_inbox, write

ROOT = Path(__file__).resolve().parents[2]


def _damage(*args: str, state: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DAMAGE_STATE_DIR": str(state), "COLUMNS": "400"}
    return subprocess.run([sys.executable, "-m", "damage.flows.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_label_export_import_and_purge(tmp_path):
    state = tmp_path / "s"
    store, ids = make_inbox(tmp_path / "inbox", n=3)
    p = _damage("data", "label-export", str(tmp_path / "inbox"), "-o", str(tmp_path / "ls"), "--url-prefix",
                "s3://claims/inbox/", "--set", "serving.collect.retention_days=36500", state=state)  # the test
    # clock's items are from 2026-12: a long retention keeps them from the purge that precedes the export
    assert p.returncode == 0, p.stderr
    assert "3 task(s)" in p.stdout and str(tmp_path / "ls" / "tasks.json") in p.stdout
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    assert tasks[0]["data"]["image"] == f"s3://claims/inbox/{ids[0]}.png"

    bad = write(tmp_path / "bad.json", bad_export(inbox_tasks(store, CLASSES), store))
    p = _damage("data", "import", str(bad), str(tmp_path / "reviewed"), "--inbox", str(tmp_path / "inbox"), state=state)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "3 bad task(s)" in p.stderr and all(f"task {k}" in p.stderr for k in (1, 2, 3))
    assert not (tmp_path / "reviewed").exists()

    good = write(tmp_path / "good.json", ls_export(inbox_tasks(store, CLASSES)))
    for expect in ("imported 3 reviewed task(s)", "imported 0 reviewed task(s); 3 already imported"):
        p = _damage("data", "import", str(good), str(tmp_path / "reviewed"), "--inbox", str(tmp_path / "inbox"),
                    state=state)
        assert p.returncode == 0, p.stderr
        assert expect in p.stdout
    assert len(list((tmp_path / "reviewed").iterdir())) == 1

    old = Inbox(CollectConfig(enabled=True), LocalStore(tmp_path / "old"), clock=Clock(dt.datetime(2000, 1, 1, tzinfo=dt.UTC)))
    assert old.maybe_collect(png(1), pred(("dent", 0.3, [0, 0, 9, 9])))
    # the real clock: collected now (its own hourly purge keeps the old item: a long retention)
    young = Inbox(CollectConfig(enabled=True, retention_days=36500), LocalStore(tmp_path / "old"))
    assert young.maybe_collect(png(2), pred(("dent", 0.3, [0, 0, 9, 9])))
    p = _damage("data", "inbox-purge", str(tmp_path / "old"), "--set", "serving.collect.retention_days=1", state=state)
    assert p.returncode == 0, p.stderr
    assert "deleted 2 object(s)" in p.stdout and len(young.store.list()) == 2


def test_missing_batch_fails_before_any_run(tmp_path):
    missing = tmp_path / "reviewed"
    p = _damage("run", "--set", f'data.batches=["{missing}"]', state=tmp_path / "s")
    assert p.returncode == 2 and f"{missing}: labelled batch not found (data.batches)" in p.stderr
    assert not (tmp_path / "s" / "mlflow.db").exists()


def test_predict_collect_keeps_the_unsure_images(tmp_path):
    import cv2
    import numpy as np

    from tests.unit.test_issue13_serving import fake_onnx

    onnx = fake_onnx(tmp_path / "m.onnx", [(100, 100, 300, 260)])  # one dent at score 0.9
    photos = tmp_path / "photos"
    photos.mkdir()
    for k in range(2):
        cv2.imwrite(str(photos / f"claim-{k}.png"), np.full((96, 128, 3), 60 + 40 * k, np.uint8))
    inbox = tmp_path / "inbox"
    base = ["predict", str(photos), "-m", str(onnx), "-o", str(tmp_path / "out"), "--no-overlay", "--collect",
            "--set", f"serving.collect.inbox={inbox}"]
    p = _damage(*base, state=tmp_path / "s")  # 0.9 is above the default band [0.25, 0.5)
    assert p.returncode == 0, p.stderr
    assert "collected 0 image(s)" in p.stdout and not list_items(LocalStore(inbox).list())
    p = _damage(*base, "--set", "serving.collect.band=[0.85,0.95]", state=tmp_path / "s")
    assert p.returncode == 0, p.stderr
    assert "collected 2 image(s)" in p.stdout
    items = list_items(LocalStore(inbox).list())
    assert len(items) == 2
    rec = json.loads(LocalStore(inbox).get(next(iter(items.values())).record))
    assert rec["reason"] == "uncertain" and rec["prediction"]["instances"][0]["class"] == "dent"
    assert "claim-" not in json.dumps(rec)  # the file name is not stored
