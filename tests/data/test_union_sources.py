"""data.batches: the union of the base dataset and the labelled batches (deterministic, fingerprinted), and the
nightly's union step, which records the base and every batch as MLflow dataset inputs of the pipeline run.

The full nightly over two sources is the slow test in tests/integration/test_label_studio_loop.py; this is the
union-sources step the nightly runs, with a real MLflow store (cheap: no training)."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from damage.tasks.core.config import CLASSES
from damage.tasks.core.errors import DatasetError
from damage.tasks.data.dataset import check_structure, split_images
from damage.tasks.data.fingerprint import dataset_fingerprint
from damage.tasks.data.label_studio import import_export, inbox_tasks
from damage.tasks.data.union import build_union, expand_batches, union_step
from tests.conftest import make_easy_dataset
from tests.unit.test_label_studio import ls_export, make_inbox, write


@pytest.fixture
def sources(tmp_path):
    """A base dataset (6 train / 2 val) and a batches folder with two imports (2 items, then 1 more)."""
    base = make_easy_dataset(tmp_path / "base", n_train=6, n_val=2, imgsz=32)
    store, ids = make_inbox(tmp_path / "inbox", n=3)
    tasks = inbox_tasks(store, CLASSES)
    reviewed = tmp_path / "reviewed"
    first = import_export(write(tmp_path / "e1.json", ls_export(tasks[:2])), store, reviewed, CLASSES)
    second = import_export(write(tmp_path / "e2.json", ls_export(tasks)), store, reviewed, CLASSES)
    return base, reviewed, [first.batch, second.batch], ids


def test_no_batches_is_the_base_itself(tmp_path):
    base = make_easy_dataset(tmp_path / "base", n_train=2, n_val=1, imgsz=32)
    u = build_union(base, [], tmp_path / "datasets")
    assert u.data_yaml == base and u.sources == []
    assert not (tmp_path / "datasets").exists()


def test_union_holds_every_source_and_is_deterministic(tmp_path, sources):
    base, reviewed, batches, ids = sources
    found = expand_batches([str(reviewed)])
    assert [p.parent for p in found] == batches  # oldest import first
    u = build_union(base, found, tmp_path / "datasets")
    assert [s.kind for s in u.sources] == ["base", "batch", "batch"]
    assert [s.name for s in u.sources[1:]] == [b.name for b in batches]
    info = check_structure(u.data_yaml)
    assert info.images == {"train": 6 + 3, "val": 2}  # batches add to train; val stays the base's
    train = {p.name for p in split_images(u.data_yaml, "train")}
    assert {f"{i}.png" for i in ids} <= train
    assert {p.name for p in split_images(u.data_yaml, "val")} == {p.name for p in split_images(base, "val")}
    fp = dataset_fingerprint(u.data_yaml.parent)
    shutil.rmtree(u.data_yaml.parent)  # rebuilt from scratch: the same folder, byte for byte
    again = build_union(base, found, tmp_path / "datasets")
    assert again.data_yaml == u.data_yaml and dataset_fingerprint(again.data_yaml.parent) == fp
    only_first = build_union(base, found[:1], tmp_path / "datasets")
    assert only_first.data_yaml != u.data_yaml and dataset_fingerprint(only_first.data_yaml.parent) != fp
    assert json.loads((u.data_yaml.parent / "sources.json").read_text())[0]["kind"] == "base"


def test_a_later_batch_wins_for_the_same_image(tmp_path, sources):
    base, reviewed, _, ids = sources
    store, _ = make_inbox(tmp_path / "inbox", n=3)  # the same inbox content (seeded)
    relabel = ls_export(inbox_tasks(store, CLASSES)[:1], label="crack")
    fix = import_export(write(tmp_path / "e3.json", relabel), store, reviewed, CLASSES)
    assert fix.imported == [ids[0]]
    u = build_union(base, expand_batches([str(reviewed)]), tmp_path / "datasets")
    lines = (u.data_yaml.parent / "labels" / "train" / f"{ids[0]}.txt").read_text().splitlines()
    assert {int(ln.split()[0]) for ln in lines} == {CLASSES.index("crack")}


def test_mismatched_batches_are_refused_naming_them(tmp_path, sources):
    base, _, batches, _ = sources
    other = batches[0] / "data.yaml"
    raw = yaml.safe_load(other.read_text())
    raw["names"] = {0: "car"}
    other.write_text(yaml.safe_dump(raw))
    with pytest.raises(DatasetError, match=f"{other}.*class names"):
        build_union(base, [other], tmp_path / "datasets")
    clash = make_easy_dataset(tmp_path / "clash", n_train=1, n_val=1, imgsz=32)
    with pytest.raises(DatasetError, match="named like the base image"):
        build_union(base, [clash], tmp_path / "datasets")
    with pytest.raises(DatasetError, match="labelled batch not found"):
        expand_batches([str(tmp_path / "nope")])


def test_union_step_logs_base_and_every_batch_as_dataset_inputs(tmp_path, sources):
    from damage.tasks.core import tracking

    base, reviewed, batches, _ = sources
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.client(uri)
    exp = tracking.ensure_experiment(c, "union-test", (tmp_path / "art").as_uri())
    run_id = tracking.start_run(c, exp, "nightly-test")
    data_yaml = union_step(base, [str(reviewed)], tmp_path / "datasets", uri, run_id)
    assert data_yaml.parent.name.startswith("union-")
    inputs = c.get_run(run_id).inputs.dataset_inputs
    by_name = {i.dataset.name: i for i in inputs}
    assert set(by_name) == {base.parent.name, *(b.name for b in batches)}
    for b in batches:
        assert by_name[b.name].dataset.digest == dataset_fingerprint(b)
        assert {t.key: t.value for t in by_name[b.name].tags}["mlflow.data.context"] == "labelled-batch"
        assert json.loads(by_name[b.name].dataset.profile)["splits"] == {"train": len(list((b / "images" / "train").iterdir()))}
    assert {t.key: t.value for t in by_name[base.parent.name].tags}["mlflow.data.context"] == "source"
    assert c.get_run(run_id).data.tags["data.batches"] == ",".join(b.name for b in batches)
