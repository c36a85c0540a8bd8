"""The data gate reads data.yaml splits given as ``.txt`` image lists through the project's one reader
(``damage.tasks.data.dataset.list_images``): lines relative to the list's folder, every path inside the
dataset root. A list line that leaves the root is refused, naming the list file and the line."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from damage.tasks.core.config import ValidateConfig
from damage.tasks.core.errors import DatasetError
from damage.tasks.data.dataset import split_images
from damage.tasks.validation.validate import validate_dataset

NAMES = ["vehicle", "dent", "scratch"]
TRI = "0.2 0.2 0.8 0.2 0.5 0.8"


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def _listed_dataset(root: Path) -> Path:
    """images/{train,val}/*.jpg with labels, named by lists/train.txt and lists/val.txt (relative lines)."""
    for split, n in (("train", 3), ("val", 2)):
        for i in range(n):
            _image(root / "images" / split / f"{split}{i}.jpg", zlib.crc32(f"{split}{i}".encode()) % 997)
            lbl = root / "labels" / split / f"{split}{i}.txt"
            lbl.parent.mkdir(parents=True, exist_ok=True)
            lbl.write_text(f"{i % 3} {TRI}\n")
    (root / "lists").mkdir()
    (root / "lists" / "train.txt").write_text("".join(f"../images/train/train{i}.jpg\n" for i in range(3)))
    (root / "lists" / "val.txt").write_text("./../images/val/val0.jpg\n../images/val/val1.jpg\n\n")
    y = root / "data.yaml"
    y.write_text(yaml.safe_dump({"train": "lists/train.txt", "val": "lists/val.txt", "names": NAMES}))
    return y


def test_image_lists_are_scanned_reported_and_cleaned(tmp_path):
    y = _listed_dataset(tmp_path / "ds")
    (tmp_path / "ds" / "images" / "train" / "train2.jpg").write_bytes(b"not a jpeg")  # a listed, corrupt image
    res = validate_dataset(y, ValidateConfig(workers=1, imbalance_ratio=100), clean_out=tmp_path / "clean")
    assert res.report["summary"]["images"] == 5
    assert [(f["code"], f["file"]) for f in res.report["findings"]] == [("corrupt_image", "images/train/train2.jpg")]
    # the cleaned copy keeps the lists, naming the kept images, and reads back through the same reader
    clean = res.clean_data_yaml
    assert yaml.safe_load(clean.read_text())["train"] == "lists/train.txt"
    assert [p.name for p in split_images(clean, "train")] == ["train0.jpg", "train1.jpg"]
    assert [p.name for p in split_images(clean, "val")] == ["val0.jpg", "val1.jpg"]
    again = validate_dataset(clean, ValidateConfig(workers=1, imbalance_ratio=100))
    assert again.passed and again.report["summary"]["images"] == 4


@pytest.mark.parametrize("escape", ["relative", "absolute", "symlink"])
def test_list_line_leaving_the_root_is_refused_naming_the_file(tmp_path, escape):
    y = _listed_dataset(tmp_path / "ds")
    outside = tmp_path / "secret" / "x.jpg"
    _image(outside, 1)
    line = {"relative": "../../secret/x.jpg", "absolute": str(outside), "symlink": "../images/train/link.jpg"}[escape]
    if escape == "symlink":  # inside by name, outside once resolved
        os.symlink(outside, tmp_path / "ds" / "images" / "train" / "link.jpg")
    lst = tmp_path / "ds" / "lists" / "train.txt"
    lst.write_text(lst.read_text() + line + "\n")
    with pytest.raises(DatasetError, match=rf"{lst}.* line 4: .*resolves outside the dataset root"):
        validate_dataset(y, ValidateConfig(workers=1))
    with pytest.raises(DatasetError, match=r"train\.txt line 4"):
        split_images(y, "train")  # the same rule for every reader


def test_list_file_outside_the_root_is_refused(tmp_path):
    y = _listed_dataset(tmp_path / "ds")
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text(f"{tmp_path / 'ds' / 'images' / 'val' / 'val0.jpg'}\n")
    y.write_text(yaml.safe_dump({"train": "lists/train.txt", "val": str(elsewhere), "names": NAMES}))
    with pytest.raises(DatasetError, match=r"data\.yaml: split 'val' list .*elsewhere\.txt lies outside"):
        validate_dataset(y, ValidateConfig(workers=1))
