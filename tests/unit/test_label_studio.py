"""To and from Label Studio: exported tasks against label-studio-sdk's task model, the importer on hand-made
Label Studio exports (every bad case refused whole, naming each bad task), re-imports add nothing."""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path

import jsonschema
import pytest

from damage.tasks.core.config import CLASSES, CollectConfig
from damage.tasks.core.errors import DatasetError
from damage.tasks.data.blobstore import LocalStore
from damage.tasks.data.label_studio import (
    export_inbox,
    import_export,
    inbox_tasks,
    issue_tasks,
    label_config,
)
from damage.tasks.serving.inbox import Inbox
from tests.unit.test_inbox import Clock, png, pred

HERE = Path(__file__).resolve().parents[1] / "data" / "label_studio"
SCHEMA = json.loads((HERE / "task_schema.json").read_text())


def make_inbox(root: Path, n: int = 3) -> tuple[LocalStore, list[str]]:
    clock = Clock()
    ib = Inbox(CollectConfig(enabled=True), LocalStore(root), clock=clock)
    ids = []
    for k in range(n):
        clock.t += 60
        ids.append(ib.maybe_collect(png(k), pred(("dent", 0.3, [2, 2, 20, 12]), ("vehicle", 0.9, [0, 0, 31, 31]))))
    return ib.store, ids


def ls_export(tasks: list[dict], label: str | None = None) -> list[dict]:
    """What Label Studio exports after a reviewer accepted each pre-annotation (optionally relabelled)."""
    out = []
    for k, t in enumerate(tasks, 1):
        result = copy.deepcopy(t["predictions"][0]["result"])
        for r in result:
            r.pop("score", None)
            if label:
                r["value"]["polygonlabels"] = [label]
        out.append({"id": k, "data": t["data"], "predictions": [], "annotations": [
            {"id": 100 + k, "completed_by": 1, "result": result, "was_cancelled": False, "ground_truth": False,
             "created_at": "2026-12-02T10:00:00Z", "updated_at": "2026-12-02T10:00:00Z", "lead_time": 3.2}]})
    return out


def write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def test_exported_tasks_follow_the_sdk_task_model(tmp_path):
    store, ids = make_inbox(tmp_path / "inbox")
    tasks_json, n = export_inbox(store, tmp_path / "ls", CLASSES)
    tasks = json.loads(tasks_json.read_text())
    assert n == len(tasks) == 3
    for t in tasks:
        jsonschema.validate(t, SCHEMA)
    t = tasks[0]
    assert t["data"]["inbox_id"] == ids[0] and t["data"]["reason"] == "uncertain"
    assert t["data"]["image"].startswith("/data/local-files/?d=") and t["data"]["image"].endswith(f"{ids[0]}.png")
    dent = next(r for r in t["predictions"][0]["result"] if r["value"]["polygonlabels"] == ["dent"])
    assert dent["value"]["points"][0] == [2 / 32 * 100, 2 / 32 * 100]  # pixels -> percent of the image
    assert (dent["original_width"], dent["original_height"]) == (32, 32)
    assert (tmp_path / "ls" / "label_config.xml").read_text() == label_config(CLASSES)
    bad = copy.deepcopy(t)
    bad["predictions"][0]["result"][0]["value"]["points"][0] = [120.0, 5.0]
    with pytest.raises(jsonschema.ValidationError):  # the schema is not vacuous
        jsonschema.validate(bad, SCHEMA)


def _ls_python() -> Path | None:
    py = Path(os.environ["DAMAGE_STATE_DIR"]) / "label-studio-venv" / "bin" / "python"
    return py if (py.parent.parent / ".complete").is_file() else None


@pytest.mark.skipif(_ls_python() is None, reason="no cached Label Studio venv (tests/integration/test_label_studio_loop.py "
                                                  "creates it); the schema test above covers the default run")
def test_exported_tasks_pass_label_studio_sdk(tmp_path):
    store, _ = make_inbox(tmp_path / "inbox")
    tasks_json, _ = export_inbox(store, tmp_path / "ls", CLASSES)
    out = subprocess.run([str(_ls_python()), str(HERE / "sdk_check.py"), "validate", str(tmp_path / "ls" / "label_config.xml"),
                          str(tasks_json)], capture_output=True, text=True, timeout=120, check=True,
                         env={"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")})
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_import_writes_one_batch_and_adds_nothing_the_second_time(tmp_path):
    store, ids = make_inbox(tmp_path / "inbox")
    tasks = inbox_tasks(store, CLASSES)
    export = ls_export(tasks[:2]) + [{"id": 3, "data": tasks[2]["data"], "annotations": [], "predictions": []}]
    res = import_export(write(tmp_path / "e1.json", export), store, tmp_path / "reviewed", CLASSES)
    assert sorted(res.imported) == sorted(ids[:2]) and res.unreviewed == ["3"] and res.batch is not None
    labels = sorted((res.batch / "labels" / "train").iterdir())
    assert [p.stem for p in labels] == sorted(ids[:2])
    lines = labels[0].read_text().splitlines()
    assert sorted(int(ln.split()[0]) for ln in lines) == [CLASSES.index("vehicle"), CLASSES.index("dent")]
    dent = next(ln for ln in lines if ln.startswith(f"{CLASSES.index('dent')} "))
    assert dent.split()[1:3] == [f"{2 / 32:.6f}"] * 2  # back to the pixel it came from
    assert (res.batch / "images" / "train" / f"{ids[0]}.png").read_bytes() == store.get(f"{ids[0]}.png")

    again = import_export(write(tmp_path / "e1b.json", export), store, tmp_path / "reviewed", CLASSES)
    assert again.batch is None and again.imported == [] and sorted(again.already) == sorted(ids[:2])
    assert len(list((tmp_path / "reviewed").iterdir())) == 1

    # a later, cumulative export: only the newly reviewed task and the relabelled one are new
    later = ls_export(tasks)
    later[0]["annotations"][0]["result"][0]["value"]["polygonlabels"] = ["scratch"]
    res3 = import_export(write(tmp_path / "e2.json", later), store, tmp_path / "reviewed", CLASSES)
    assert sorted(res3.imported) == sorted([ids[0], ids[2]]) and res3.already == [ids[1]]


def test_cancelled_and_ground_truth_annotations(tmp_path):
    store, ids = make_inbox(tmp_path / "inbox", n=1)
    [task] = ls_export(inbox_tasks(store, CLASSES))
    first = task["annotations"][0]
    task["annotations"] = [dict(first, id=1, was_cancelled=True),
                           dict(first, id=2, result=[], ground_truth=True, updated_at="2026-12-01T00:00:00Z"),
                           dict(first, id=3, updated_at="2026-12-03T00:00:00Z")]
    res = import_export(write(tmp_path / "e.json", [task]), store, tmp_path / "reviewed", CLASSES)
    assert res.imported == ids
    assert (res.batch / "labels" / "train" / f"{ids[0]}.txt").read_text() == ""  # the ground truth: no damage
    task["annotations"] = [dict(first, was_cancelled=True)]
    res = import_export(write(tmp_path / "e2.json", [task]), store, tmp_path / "reviewed2", CLASSES)
    assert res.batch is None and res.unreviewed == ["1"]


def bad_export(tasks: list[dict], store) -> list[dict]:
    """An export of 3+ tasks whose first three are bad: unknown label, point outside, image not in the inbox."""
    export = ls_export(tasks)
    res = [t["annotations"][0]["result"] for t in export]
    res[0][0]["value"]["polygonlabels"] = ["hail_damage"]  # unknown label
    res[1][0]["value"]["points"][1] = [101.5, 40.0]  # outside the image
    export[2]["data"] = {"image": "/data/local-files/?d=elsewhere/20261201T000000Z-0123456789abcdef.png"}  # not in inbox
    return export


def test_bad_exports_are_refused_whole_naming_each_task(tmp_path):
    store, ids = make_inbox(tmp_path / "inbox", n=5)
    tasks = inbox_tasks(store, CLASSES)
    export = bad_export(tasks, store)
    res = [t["annotations"][0]["result"] for t in export]
    res[3][0]["value"]["points"] = res[3][0]["value"]["points"][:2]  # two points
    res[4][0]["original_width"] = 64  # annotated on another image size
    with pytest.raises(DatasetError) as e:
        import_export(write(tmp_path / "bad.json", export), store, tmp_path / "reviewed", CLASSES)
    msg = str(e.value)
    assert "5 bad task(s); nothing imported" in msg
    assert f"task 1 ({ids[0]}): region" in msg and "unknown label 'hail_damage'" in msg
    assert f"task 2 ({ids[1]})" in msg and "polygon point [101.5, 40.0] lies outside the image" in msg
    assert "task 3: image '20261201T000000Z-0123456789abcdef' is not in the inbox" in msg
    assert f"task 4 ({ids[3]})" in msg and "at least 3 points" in msg
    assert f"task 5 ({ids[4]})" in msg and "annotated at 64x32 but the inbox image is 32x32" in msg
    assert not (tmp_path / "reviewed").exists()  # nothing half-imported
    # the good tasks alone import fine afterwards
    ok = import_export(write(tmp_path / "ok.json", ls_export(tasks)), store, tmp_path / "reviewed", CLASSES)
    assert len(ok.imported) == 5


@pytest.mark.parametrize("text", ["{not json", '{"images": []}', '[1, 2]'])
def test_unreadable_export_names_the_file(tmp_path, text):
    store, _ = make_inbox(tmp_path / "inbox", n=1)
    p = tmp_path / "x.json"
    p.write_text(text)
    with pytest.raises(DatasetError, match=str(p)):
        import_export(p, store, tmp_path / "reviewed", CLASSES)


def test_a_failing_write_leaves_no_batch(tmp_path, monkeypatch):
    store, _ = make_inbox(tmp_path / "inbox", n=2)
    export = write(tmp_path / "e.json", ls_export(inbox_tasks(store, CLASSES)))
    import damage.tasks.data.label_studio as ls

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ls, "atomic_write_json", boom)  # the manifest, written last
    with pytest.raises(OSError):
        import_export(export, store, tmp_path / "reviewed", CLASSES)
    assert not (tmp_path / "reviewed").exists() or not any((tmp_path / "reviewed").iterdir())


def test_issue_rows_become_label_and_suggestion_pre_annotations():
    rows = [
        {"image": "images/val/a.png", "kind": "bad_outline", "score": 0.8, "label_class": "dent", "pred_class": "dent",
         "conf": 0.9, "evidence": "IoU 0.2", "ann_polygon": "[[1, 1], [10, 1], [10, 10]]",
         "pred_polygon": [[2, 2], [12, 2], [12, 12], [2, 12]], "ann_box": "", "pred_box": ""},
        {"image": "images/val/a.png", "kind": "missing_label", "score": 0.7, "label_class": "", "pred_class": "crack",
         "conf": 0.7, "evidence": "", "ann_polygon": "", "pred_polygon": "", "ann_box": "", "pred_box": "[0, 0, 4, 4]"},
        {"image": "images/val/b.png", "kind": "spurious_label", "score": 0.1, "label_class": "dent"},  # not flagged
    ]
    tasks = issue_tasks(rows, lambda im: f"/data/local-files/?d={im}", lambda im: (20, 40), min_score=0.5)
    assert len(tasks) == 1
    [t] = tasks
    jsonschema.validate(t, SCHEMA)
    sides = {p["model_version"]: p["result"] for p in t["predictions"]}
    assert [r["value"]["polygonlabels"] for r in sides["dataset-label"]] == [["dent"]]
    assert [r["value"]["polygonlabels"] for r in sides["model-suggestion"]] == [["dent"], ["crack"]]
    assert sides["dataset-label"][0]["value"]["points"][1] == [50.0, 2.5]  # x / 20, y / 40 in percent
    assert sides["model-suggestion"][1]["value"]["points"][2] == [20.0, 10.0]  # a box as four corners
    assert "bad_outline 0.80" in t["data"]["issues"] and t["data"]["source_image"] == "images/val/a.png"


def test_s3_inbox_round_trip(s3, tmp_path):
    from damage.tasks.data.blobstore import S3Store
    from tests.helpers import S3_BUCKET

    store = S3Store(f"s3://{S3_BUCKET}/inbox", client=s3)
    ib = Inbox(CollectConfig(enabled=True), store, clock=Clock())
    iid = ib.maybe_collect(png(7), pred(("dent", 0.3, [2, 2, 20, 12])))
    tasks = inbox_tasks(store, CLASSES)
    assert tasks[0]["data"]["image"] == f"s3://{S3_BUCKET}/inbox/{iid}.png"
    res = import_export(write(tmp_path / "e.json", ls_export(tasks)), store, tmp_path / "reviewed", CLASSES)
    assert res.imported == [iid] and (res.batch / "images" / "train" / f"{iid}.png").read_bytes() == png(7)
