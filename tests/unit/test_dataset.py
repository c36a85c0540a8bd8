"""damage.tasks.data.dataset: data.yaml reading, the basic structure check, polygon merging, atomic output."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from damage.tasks.core.atomic import atomic_output_dir
from damage.tasks.core.errors import DatasetError
from damage.tasks.data.dataset import check_structure, label_path, load_data_yaml, split_images
from damage.tasks.data.importer import merge_segments, normalize_name

POLY = "0.1 0.1 0.5 0.1 0.5 0.5"


def _dataset(root: Path, names, labels: dict[str, list[str]], yaml_extra: dict | None = None) -> Path:
    """A minimal YOLO dataset: one 8x8 image per label file, ``labels`` keyed 'split/stem'."""
    for key, lines in labels.items():
        split, stem = key.split("/")
        img = root / "images" / split / f"{stem}.png"
        img.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(img), np.zeros((8, 8, 3), np.uint8))
        lbl = root / "labels" / split / f"{stem}.txt"
        lbl.parent.mkdir(parents=True, exist_ok=True)
        lbl.write_text("\n".join(lines) + "\n")
    data = {"path": str(root), "train": "images/train", "val": "images/val", "names": names, **(yaml_extra or {})}
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    return root / "data.yaml"


def test_class_id_beyond_names_is_named(tmp_path):
    y = _dataset(tmp_path, ["a", "b", "c"], {"train/x": [f"0 {POLY}", f"5 {POLY}"], "val/y": [f"1 {POLY}"]})
    with pytest.raises(DatasetError) as e:
        check_structure(y)
    assert str(e.value) == "labels/train/x.txt: class id 5 not in data.yaml names (3 classes)"


def test_good_dataset_counts_images_and_instances(tmp_path):
    y = _dataset(tmp_path, {0: "car", 1: "dent"},
                 {"train/a": [f"0 {POLY}", f"1 {POLY}"], "train/b": [f"1 {POLY}"], "val/c": ["0 0.5 0.5 0.2 0.2"]})
    info = check_structure(y)
    assert info.names == ["car", "dent"] and info.root == tmp_path.resolve()
    assert info.images == {"train": 2, "val": 1}
    assert info.instances == {"car": 2, "dent": 2}


@pytest.mark.parametrize(("line", "problem"), [
    ("0 0.1 0.1 0.5", "expected 4 box values"),
    ("0 0.1 0.1 1.5 0.1 0.5 0.5", "outside [0, 1]"),
    ("x 0.1 0.1 0.5 0.1 0.5 0.5", "not numbers"),
    ("1.5 0.1 0.1 0.5 0.1 0.5 0.5", "not a non-negative integer"),
])
def test_bad_label_lines(tmp_path, line, problem):
    y = _dataset(tmp_path, ["a", "b"], {"train/x": [line], "val/y": [f"0 {POLY}"]})
    with pytest.raises(DatasetError, match="labels/train/x.txt line 1") as e:
        check_structure(y)
    assert problem in str(e.value)


def test_missing_and_empty_splits(tmp_path):
    y = _dataset(tmp_path, ["a"], {"train/x": [f"0 {POLY}"]})
    with pytest.raises(DatasetError, match="val split images/val not found"):
        check_structure(y)
    (tmp_path / "images" / "val").mkdir()
    with pytest.raises(DatasetError, match="val split has no images"):
        check_structure(y)


def test_load_data_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(DatasetError, match="nope.yaml: not found"):
        load_data_yaml(tmp_path / "nope.yaml")
    with pytest.raises(DatasetError, match="no data.yaml"):
        load_data_yaml(tmp_path)
    bad = tmp_path / "data.yaml"
    bad.write_text("names: [a, b\ntrain: x")
    with pytest.raises(DatasetError, match="data.yaml: not valid YAML"):
        load_data_yaml(bad)
    bad.write_text(yaml.safe_dump({"train": "images/train", "val": "images/val"}))
    with pytest.raises(DatasetError, match="no 'names'"):
        load_data_yaml(tmp_path)  # the folder form finds data.yaml
    bad.write_text(yaml.safe_dump({"train": "images/train", "names": ["a"]}))
    with pytest.raises(DatasetError, match="no 'val' split"):
        load_data_yaml(bad)
    bad.write_text(yaml.safe_dump({"train": "t", "val": "v", "names": {0: "a", 2: "c"}}))
    with pytest.raises(DatasetError, match="without gaps"):
        load_data_yaml(bad)


def test_relative_path_resolves_against_the_yaml(tmp_path):
    (tmp_path / "sub").mkdir()
    y = tmp_path / "sub" / "data.yaml"
    y.write_text(yaml.safe_dump({"path": "..", "train": "images/train", "val": ["images/val", "extra/val"],
                                 "names": ["a"]}))
    info = load_data_yaml(y)
    assert info.root == tmp_path.resolve()
    assert info.splits["val"] == [tmp_path.resolve() / "images/val", tmp_path.resolve() / "extra/val"]


def test_label_path_follows_ultralytics():
    assert label_path(Path("/d/images/train/a.jpg")) == Path("/d/labels/train/a.txt")
    assert label_path(Path("/images/d/images/x/b.png")) == Path("/images/d/labels/x/b.txt")


def test_normalize_name():
    assert normalize_name("Glass Shatter") == normalize_name("glass_shatter") == normalize_name(" glass-shatter ")
    assert normalize_name("lamp  broken") == "lamp_broken"


def test_merge_segments_covers_every_part():
    parts = [np.array([[5, 5], [20, 5], [20, 20], [5, 20]]), np.array([[40, 40], [60, 40], [60, 55], [40, 55]]),
             np.array([[70, 5], [90, 5], [80, 25]])]
    merged = merge_segments(parts)
    want = np.zeros((64, 100), np.uint8)
    cv2.fillPoly(want, [p.astype(np.int32) for p in parts], 1)
    got = np.zeros_like(want)
    cv2.fillPoly(got, [np.round(merged).astype(np.int32)], 1)
    assert (got & want).sum() / (got | want).sum() >= 0.95
    assert merge_segments(parts[:1]).shape == (4, 2)
    from ultralytics.data.converter import merge_multi_segment  # the library's rule, not a copy

    assert np.array_equal(merged, np.concatenate(merge_multi_segment([p.copy() for p in parts])))


def test_atomic_output_dir_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError), atomic_output_dir(out) as tmp:
        (tmp / "f.txt").write_text("partial")
        raise RuntimeError("boom")
    assert not (tmp_path / "a").exists()
    with atomic_output_dir(out) as tmp:
        (tmp / "f.txt").write_text("done")
    assert (out / "f.txt").read_text() == "done"
    assert [p.name for p in out.parent.iterdir()] == ["out"]
    with pytest.raises(DatasetError, match="not empty"), atomic_output_dir(out):
        pass
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "g.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["g.txt"]


def test_one_rule_for_txt_image_lists(tmp_path):
    """A list file's relative lines are relative to the list's folder, for every reader."""
    from damage.tasks.evaluation.explain import pick_explain_samples
    from damage.tasks.export.calibration import calibration_images

    ds = tmp_path / "ds"
    for stem in ("a", "b", "c"):
        img = ds / "images" / f"{stem}.png"
        img.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(img), np.zeros((8, 8, 3), np.uint8))
        (ds / "labels").mkdir(exist_ok=True)
        (ds / "labels" / f"{stem}.txt").write_text(f"0 {POLY}\n")
    (ds / "lists").mkdir()
    # relative to lists/ (the list's folder), not to the dataset root: "images/a.png" from the
    # root would point at ds/images/a.png too, so the lines climb out of lists/ to tell them apart
    (ds / "lists" / "train.txt").write_text("../images/a.png\n./../images/b.png\n\n")
    (ds / "lists" / "val.txt").write_text(f"{(ds / 'images' / 'c.png').resolve()}\n")
    y = ds / "data.yaml"
    y.write_text(yaml.safe_dump({"train": "lists/train.txt", "val": "lists/val.txt", "names": ["a"]}))
    want = [(ds / "images" / "a.png").resolve(), (ds / "images" / "b.png").resolve()]
    assert split_images(y, "train") == want
    assert sorted(calibration_images(y, 5, split="train")) == want
    assert sorted(pick_explain_samples(y, 5, split="train")) == want
    assert split_images(y, "val") == [(ds / "images" / "c.png").resolve()]
    assert check_structure(y).images == {"train": 2, "val": 1}


def test_nc_alone_names_classes_by_id_and_missing_split_source_is_named(tmp_path):
    y = tmp_path / "data.yaml"
    y.write_text(yaml.safe_dump({"train": "images/train", "val": "images/val", "nc": 2}))
    assert load_data_yaml(y).names == ["0", "1"]
    with pytest.raises(DatasetError, match=r"data.yaml: train images not found at .*images/train"):
        split_images(y, "train")
    with pytest.raises(DatasetError, match="no 'test' split"):
        split_images(y, "test")
