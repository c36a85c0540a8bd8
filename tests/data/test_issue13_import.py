"""Issue 13, items 8-10 (import): references outside the dataset, --overwrite over the source,
RLE sizes that do not match the image."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from damage.tasks.core.errors import DatasetError
from damage.tasks.data.importer import import_dataset


def _img(path: Path, size: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((size, size, 3), 120, np.uint8))
    return path


def _coco(root: Path, file_names: list[str], seg=None) -> Path:
    images = [{"id": i + 1, "file_name": f, "width": 64, "height": 64} for i, f in enumerate(file_names)]
    seg = seg or [[10, 10, 40, 10, 40, 40, 10, 40]]
    anns = [{"id": i + 1, "image_id": i + 1, "category_id": 1, "segmentation": seg, "iscrowd": 0}
            for i in range(len(file_names))]
    js = root / "ann.json"
    js.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "dent"}]}))
    return js


@pytest.fixture
def project(tmp_path):
    """project/coco/{ann.json, images/a.png}, a secret beside the project, an unrelated file inside it."""
    proj = tmp_path / "project"
    _img(proj / "coco" / "images" / "a.png")
    _img(proj / "coco" / "images" / "b.png")
    (tmp_path / "secret.png").write_bytes(Path(proj / "coco" / "images" / "a.png").read_bytes())
    (proj / "notes.txt").write_text("unrelated")
    return proj


def test_13_08_import_traversal_coco(project, tmp_path):
    js = _coco(project / "coco", ["a.png", "../../../secret.png", "/etc/hostname", "b.png"])
    out = tmp_path / "out"
    rep = import_dataset(js, out, images_dir=project / "coco" / "images", val_fraction=0.5)
    copied = sorted(p.name for p in (out / "images").rglob("*") if p.is_file())
    assert copied == ["a.png", "b.png"]
    assert "resolves outside" in rep.refused["../../../secret.png"]
    assert "resolves outside" in rep.refused["/etc/hostname"] or "extension" in rep.refused["/etc/hostname"]
    assert "REFUSED" in " ".join(rep.summary())
    assert json.loads((out / "import_report.json").read_text())["refused"].keys() == rep.refused.keys()


def test_13_08_import_traversal_yolo_list(tmp_path):
    ds = tmp_path / "ds"
    _img(ds / "images" / "train" / "a.png")
    (ds / "labels" / "train").mkdir(parents=True)
    (ds / "labels" / "train" / "a.txt").write_text("0 0.1 0.1 0.5 0.1 0.5 0.5\n")
    outside = _img(tmp_path / "private" / "images" / "victim.png")
    (ds / "train.txt").write_text(f"images/train/a.png\n../private/images/victim.png\n{outside}\n")
    (ds / "data.yaml").write_text(yaml.safe_dump({"path": str(ds), "train": "train.txt", "val": "train.txt",
                                                  "names": {0: "dent"}}))
    out = tmp_path / "out"
    rep = import_dataset(ds, out)
    copied = [p.name for p in (out / "images").rglob("*") if p.is_file()]
    assert "victim.png" not in copied and copied == ["a.png"]
    assert str(outside) in rep.refused and "resolves outside" in rep.refused[str(outside)]


def test_13_09_import_overwrite_never_deletes_the_source(project, tmp_path):
    js = _coco(project / "coco", ["a.png", "b.png"])
    before = {p: p.read_bytes() for p in project.rglob("*") if p.is_file()}
    with pytest.raises(DatasetError, match=r"output folder is or contains the source .*ann.json"):
        import_dataset(js, project, overwrite=True)
    (tmp_path / "ann").mkdir()
    js2 = _coco(tmp_path / "ann", ["a.png", "b.png"])  # JSON elsewhere, images inside the output
    with pytest.raises(DatasetError, match=r"output folder is or contains the images folder"):
        import_dataset(js2, project, images_dir=project / "coco" / "images", overwrite=True)
    assert {p: p.read_bytes() for p in project.rglob("*") if p.is_file()} == before


def test_13_10_import_rle_size_checked_before_decoding(project, tmp_path, monkeypatch):
    from pycocotools import mask as mask_utils

    def no_decode(*a, **kw):
        raise AssertionError("the 20000x20000 RLE was decoded")

    monkeypatch.setattr(mask_utils, "decode", no_decode)
    bomb = {"size": [20000, 20000], "counts": [0, 400000000]}  # 250 bytes declaring 400 MP
    js = _coco(project / "coco", ["a.png"], seg=bomb)
    with pytest.raises(DatasetError, match=r"ann.json: annotation 1 of 'a.png': RLE size \[20000, 20000\] does "
                                           r"not match the image's 64x64"):
        import_dataset(js, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_13_10_import_refuses_images_over_max_pixels(project, tmp_path):
    js = _coco(project / "coco", ["a.png", "b.png"])
    _img(project / "coco" / "images" / "b.png", size=100)  # 10000 px > limit below
    js.write_text(js.read_text().replace('"file_name": "b.png", "width": 64, "height": 64',
                                         '"file_name": "b.png", "width": 100, "height": 100'))
    rep = import_dataset(js, tmp_path / "out", max_pixels=64 * 64, val_fraction=0.5)
    assert "exceeds max_pixels=4096" in rep.refused["b.png"]
    assert [p.name for p in (tmp_path / "out" / "images").rglob("*.png")] == ["a.png"]
