"""Whole scenes at a high resolution and tile-scale training crops of the generator (issue 34)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from damage.tasks.core.errors import DatasetError
from damage.tasks.data.synth import generate_dataset, label_lines, render_sample


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _label_iou(sample, size: int) -> list[float]:
    out = []
    for inst, line in zip(sample.instances, label_lines(sample, size), strict=True):
        poly = np.array(line.split()[1:], dtype=np.float64).reshape(-1, 2) * size
        m = np.zeros((size, size), np.uint8)
        cv2.fillPoly(m, [np.round(poly).astype(np.int32).reshape(-1, 1, 2)], 1)
        lab = m.astype(bool)
        out.append((lab & inst.mask).sum() / (lab | inst.mask).sum())
    return out


def test_whole_scenes_at_640_are_deterministic_with_exact_labels(tmp_path):
    a = generate_dataset(tmp_path / "a", images=3, seed=1034, imgsz=640, val_fraction=0.5)
    b = generate_dataset(tmp_path / "b", images=3, seed=1034, imgsz=640, val_fraction=0.5)
    fa, fb = _files(a.parent), _files(b.parent)
    assert {n: v for n, v in fa.items() if n != "data.yaml"} == {n: v for n, v in fb.items() if n != "data.yaml"}
    im = cv2.imread(str(next(iter(sorted((a.parent / "images").rglob("*.png"))))))
    assert im.shape[:2] == (640, 640)
    s = render_sample(np.random.default_rng([1034, 0]), 640, "scene")
    assert s.instances and min(_label_iou(s, 640)) >= 0.9


def test_tile_views_are_crops_of_larger_scenes_with_exact_labels():
    tiles = [render_sample(np.random.default_rng([5, i]), 160, "tile", tile_scale=4.0) for i in range(12)]
    scenes = [render_sample(np.random.default_rng([5, i]), 160, "scene") for i in range(12)]
    for s in tiles:
        assert s.image.shape[:2] == (160, 160)
        assert any(i.name == "vehicle" for i in s.instances)  # every tile shows some vehicle
        assert min(_label_iou(s, 160)) >= 0.9
        for inst in s.instances:
            if inst.parent is not None:
                assert not (inst.mask & ~s.instances[inst.parent].mask).any()  # damage on its vehicle
    # the same damage at 4x the scale: instances cover a larger share of the frame than in whole scenes
    def dmg_share(ss):
        return np.mean([i.area for s in ss for i in s.instances if i.parent is not None]) / 160 ** 2
    assert dmg_share(tiles) > 2 * dmg_share(scenes)
    again = render_sample(np.random.default_rng([5, 0]), 160, "tile", tile_scale=4.0)
    assert (again.image == tiles[0].image).all()  # deterministic by seed


def test_tile_fraction_composition_and_errors(tmp_path):
    plain = generate_dataset(tmp_path / "p", images=6, seed=2, imgsz=64, closeup_fraction=0.5)
    same = generate_dataset(tmp_path / "s", images=6, seed=2, imgsz=64, closeup_fraction=0.5, tile_fraction=0.0)
    fp, fs = _files(plain.parent), _files(same.parent)
    assert {n: v for n, v in fp.items() if n != "data.yaml"} == {n: v for n, v in fs.items() if n != "data.yaml"}
    tiled = generate_dataset(tmp_path / "t", images=6, seed=2, imgsz=64, closeup_fraction=0.5, tile_fraction=0.5)
    ft = _files(tiled.parent)
    # the close-ups keep their draws; only the former whole scenes became tiles
    changed = [n for n in fp if n.endswith(".png") and fp[n] != ft[n]]
    assert 0 < len(changed) < 6
    with pytest.raises(DatasetError, match="tile_fraction"):
        generate_dataset(tmp_path / "x", images=4, seed=0, imgsz=64, closeup_fraction=0.7, tile_fraction=0.5)
