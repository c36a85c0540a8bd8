"""The built-in synthetic dataset: deterministic, exact labels, every class, damage on vehicles."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from tasks.core.config import CLASSES
from tasks.core.errors import DatasetError
from tasks.data.dataset import check_structure
from tasks.data.synth import generate_dataset, label_lines, render_sample


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _fill(poly: np.ndarray, size: int) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    cv2.fillPoly(m, [np.round(poly).astype(np.int32).reshape(-1, 1, 2)], 1)
    return m.astype(bool)


@pytest.fixture(scope="module")
def samples() -> list:
    return [render_sample(np.random.default_rng([3, i]), 160) for i in range(60)]


def test_same_arguments_give_byte_identical_files(tmp_path):
    a = generate_dataset(tmp_path / "a", images=10, seed=5, imgsz=96, val_fraction=0.3)
    b = generate_dataset(tmp_path / "b", images=10, seed=5, imgsz=96, val_fraction=0.3)
    fa, fb = _files(a.parent), _files(b.parent)
    assert fa.keys() == fb.keys()
    for name in fa:
        if name != "data.yaml":  # holds its own absolute path
            assert fa[name] == fb[name], name
    assert len([n for n in fa if n.startswith("images/train/")]) == 7
    assert len([n for n in fa if n.startswith("images/val/")]) == 3
    c = generate_dataset(tmp_path / "c", images=10, seed=6, imgsz=96, val_fraction=0.3)
    fc = _files(c.parent)
    assert all(fc[n] != fa[n] for n in fa if n.endswith(".png") and n in fc), "another seed, other images"


def test_data_yaml_and_structure(tmp_path):
    data_yaml = generate_dataset(tmp_path / "ds", images=8, seed=0, imgsz=64, val_fraction=0.25)
    raw = yaml.safe_load(data_yaml.read_text())
    assert raw["path"] == str((tmp_path / "ds").resolve())
    assert raw["train"] == "images/train" and raw["val"] == "images/val"
    assert [raw["names"][i] for i in range(len(CLASSES))] == CLASSES
    info = check_structure(data_yaml)
    assert info.images == {"train": 6, "val": 2}
    assert not list(tmp_path.glob(".ds.tmp-*")), "temp folder left behind"


def test_replaces_own_output_but_refuses_foreign_folder(tmp_path):
    out = tmp_path / "ds"
    generate_dataset(out, images=4, seed=0, imgsz=64)
    generate_dataset(out, images=6, seed=1, imgsz=64)  # earlier synth output: replaced
    assert len(list((out / "images").rglob("*.png"))) == 6
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("precious")
    with pytest.raises(DatasetError, match="not empty"):
        generate_dataset(foreign, images=4, seed=0, imgsz=64)
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]
    assert not list(tmp_path.glob(".mine.tmp-*"))


def test_label_polygons_rasterise_to_the_rendered_regions(samples):
    small = 0
    for k, s in enumerate(samples):
        lines = label_lines(s, 160)
        assert len(lines) == len(s.instances)
        for inst, line in zip(s.instances, lines, strict=True):
            vals = line.split()
            assert int(vals[0]) == inst.cls
            poly = np.array(vals[1:], dtype=np.float64).reshape(-1, 2) * 160  # what a reader of the label gets
            label = _fill(poly, 160)
            iou = (label & inst.mask).sum() / (label | inst.mask).sum()
            assert iou >= 0.9, f"sample {k} {inst.name}: IoU {iou:.3f}"
            small += inst.name != "vehicle" and inst.area < 60
    assert small >= 5, "small damage instances must be part of the check"


def test_every_class_appears_and_is_not_microscopic(samples):
    counts = Counter(inst.name for s in samples for inst in s.instances)
    assert set(counts) == set(CLASSES), counts
    damage = {c: n for c, n in counts.items() if c != "vehicle"}
    assert max(damage.values()) <= 4 * min(damage.values()), damage  # roughly balanced
    for s in samples:
        for inst in s.instances:
            ys, xs = np.nonzero(inst.mask)
            assert max(np.ptp(xs), np.ptp(ys)) + 1 >= 6, f"{inst.name} spans < 6 px"


def test_damage_lies_inside_its_vehicle(samples):
    n = 0
    for s in samples:
        for inst in s.instances:
            if inst.name == "vehicle":
                assert inst.parent is None
                continue
            parent = s.instances[inst.parent]
            assert parent.name == "vehicle"
            assert not (inst.mask & ~parent.mask).any(), f"{inst.name} outside its vehicle"
            n += 1
    assert n > 50


def test_damage_regions_do_not_overlap_and_sit_on_their_part(samples):
    for s in samples:
        dmg = [i for i in s.instances if i.parent is not None]
        for a in range(len(dmg)):
            for b in range(a + 1, len(dmg)):
                assert not (dmg[a].mask & dmg[b].mask).any()
        for inst in dmg:
            veh = s.instances[inst.parent].mask
            vy = np.nonzero(veh)[0]
            cy = np.nonzero(inst.mask)[0].mean()
            rel = (cy - vy.min()) / max(1, np.ptp(vy))  # 0 = top of the vehicle, 1 = bottom
            if inst.name == "tire_flat":
                assert rel > 0.5, "flat tyres are at the bottom of the vehicle"
            if inst.name in ("crack", "glass_shatter"):
                assert rel < 0.75, "glass is in the upper part of the vehicle"


def test_low_light_images_exist_and_stay_above_the_dark_gate(samples):
    low = [s.image.mean() for s in samples if s.low_light]
    normal = [s.image.mean() for s in samples if not s.low_light]
    assert low and normal
    assert np.mean(low) < 0.6 * np.mean(normal)
    assert min(low) > 25  # the data gate's default dark_threshold


def test_images_are_bgr_uint8_and_varied(samples):
    assert all(s.image.shape == (160, 160, 3) and s.image.dtype == np.uint8 for s in samples)
    assert any(len([i for i in s.instances if i.name == "vehicle"]) == 2 for s in samples)
    # partially cut-off vehicles touch the border
    assert any(i.name == "vehicle" and (i.mask[:, 0].any() or i.mask[:, -1].any())
               for s in samples for i in s.instances)
    means = [tuple(s.image.reshape(-1, 3).mean(0).round()) for s in samples]
    assert len(set(means)) == len(means)
