"""A .txt list beside the data.yaml (a K-fold view the pipeline writes) may sit outside the dataset root, but
every line it names must resolve inside the root: no image outside the dataset is ever opened."""

from __future__ import annotations

import pytest
import yaml

from damage.tasks.core.errors import DatasetError
from damage.tasks.data.dataset import load_data_yaml, split_images


def _dataset(tmp_path):
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.png").write_bytes(b"png")
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(b"png")
    view = tmp_path / "view"
    view.mkdir()
    return root, outside, view


def test_a_list_beside_the_yaml_may_name_images_inside_the_root(tmp_path):
    root, _, view = _dataset(tmp_path)
    (view / "train.txt").write_text(f"{root / 'images' / 'a.png'}\n")
    (view / "data.yaml").write_text(yaml.safe_dump({"path": str(root), "train": str(view / "train.txt"),
                                                    "val": str(view / "train.txt"), "names": {0: "x"}}))
    assert split_images(view / "data.yaml", "train") == [root / "images" / "a.png"]


def test_its_lines_outside_the_root_are_refused(tmp_path):
    root, outside, view = _dataset(tmp_path)
    (view / "train.txt").write_text(f"{outside}\n")
    (view / "data.yaml").write_text(yaml.safe_dump({"path": str(root), "train": str(view / "train.txt"),
                                                    "val": str(view / "train.txt"), "names": {0: "x"}}))
    with pytest.raises(DatasetError, match="resolves outside the dataset root"):
        split_images(view / "data.yaml", "train")


def test_a_list_elsewhere_is_still_refused(tmp_path):
    root, _, view = _dataset(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "train.txt").write_text(f"{root / 'images' / 'a.png'}\n")
    (view / "data.yaml").write_text(yaml.safe_dump({"path": str(root), "train": str(other / "train.txt"),
                                                    "val": str(other / "train.txt"), "names": {0: "x"}}))
    with pytest.raises(DatasetError, match="lies outside the dataset root"):
        load_data_yaml(view / "data.yaml")
