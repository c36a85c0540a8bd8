"""The built-in synthetic dataset: deterministic, exact labels, every class, damage on vehicles."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from damage.tasks.core.config import CLASSES
from damage.tasks.core.errors import DatasetError
from damage.tasks.data.dataset import check_structure
from damage.tasks.data.synth import GENERATOR_VERSION, generate_dataset, label_lines, render_sample


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


# ----------------------------------------------------------------------------- v3: close-ups, balance, clipping


@pytest.fixture(scope="module")
def closeups() -> list:
    from damage.tasks.data.synth import DAMAGE_TYPES

    return [render_sample(np.random.default_rng([4, i]), 160, "closeup", DAMAGE_TYPES[i % 6]) for i in range(36)]


def test_closeup_labels_are_exact_and_show_the_requested_damage(closeups):
    from damage.tasks.data.synth import DAMAGE_TYPES

    for k, s in enumerate(closeups):
        assert s.image.shape == (160, 160, 3) and s.image.dtype == np.uint8
        names = [i.name for i in s.instances]
        assert DAMAGE_TYPES[k % 6] in names, f"close-up {k} lacks its target {DAMAGE_TYPES[k % 6]}: {names}"
        for inst, line in zip(s.instances, label_lines(s, 160), strict=True):
            poly = np.array(line.split()[1:], dtype=np.float64).reshape(-1, 2) * 160
            label = _fill(poly, 160)
            iou = (label & inst.mask).sum() / (label | inst.mask).sum()
            assert iou >= 0.9, f"close-up {k} {inst.name}: IoU {iou:.3f}"
            if inst.parent is not None:
                assert not (inst.mask & ~s.instances[inst.parent].mask).any()


def test_closeups_magnify_damage(closeups, samples):
    def median_damage_area(ss):
        return np.median([i.area for s in ss for i in s.instances if i.parent is not None])

    assert median_damage_area(closeups) > 3 * median_damage_area(samples)


def test_damage_cut_by_the_border_is_labelled_by_its_visible_part(closeups):
    cut = [i for s in closeups for i in s.instances if i.parent is not None
           and (i.mask[0].any() or i.mask[-1].any() or i.mask[:, 0].any() or i.mask[:, -1].any())]
    assert len(cut) >= 3, "close-ups must include damage cut by the frame"
    for inst in cut:  # its label reaches the border: the visible part, not dropped, not extrapolated
        assert inst.polygon.min() == 0 or inst.polygon.max() == 159


def test_crop_keeps_every_visible_instance_clipped_to_the_window():
    from damage.tasks.data.synth import _render_scene
    from damage.tasks.data.synth_views import crop_sample

    scene = _render_scene(np.random.default_rng(11), 320, "dent", n_vehicles=1)
    dent = next(i for i in scene.instances if i.name == "dent")
    ys, xs = np.nonzero(dent.mask)
    mid = (xs.min() + xs.max()) // 2
    x0 = int(mid if mid <= 160 else mid - 160)  # one vertical edge of the window through the dent's middle
    y0 = int(np.clip(ys.min() - 40, 0, 160))
    crop = crop_sample(scene, (x0, y0), 160)
    visible = [i for i in scene.instances if i.mask[y0:y0 + 160, x0:x0 + 160].any()]
    assert [i.name for i in crop.instances] == [i.name for i in visible]
    for got, src in zip(crop.instances, visible, strict=True):
        assert np.array_equal(got.mask, src.mask[y0:y0 + 160, x0:x0 + 160])
    cut_dent = next(i for i in crop.instances if i.name == "dent")
    assert 0 < cut_dent.area < dent.area
    assert cut_dent.mask[:, 0].any() or cut_dent.mask[:, -1].any()  # it reaches the cut edge


def _label_counts(root: Path, split: str) -> Counter:
    c: Counter = Counter()
    for f in (root / "labels" / split).glob("*.txt"):
        c.update(CLASSES[int(line.split()[0])] for line in f.read_text().splitlines() if line.strip())
    return c


def test_train_split_damage_counts_are_balanced(tmp_path):
    import json

    data = generate_dataset(tmp_path / "ds", images=48, seed=2, imgsz=96, val_fraction=0.25, closeup_fraction=0.5)
    train = _label_counts(data.parent, "train")
    damage = {c: train[c] for c in CLASSES if c != "vehicle"}
    assert min(damage.values()) >= 5, damage
    # greedy balancing per image (each also carries random extra damage): a spread of a few instances
    # at 48 images; unbalanced random choice spreads ~9 here
    assert max(damage.values()) - min(damage.values()) <= 4, damage
    marker = json.loads((data.parent / ".synth.json").read_text())
    assert marker["damage_counts"]["train"] == damage  # the marker records what the labels hold
    assert marker["version"] == GENERATOR_VERSION and marker["closeup_fraction"] == 0.5


def test_written_labels_never_cross_themselves(tmp_path):
    """The polygons as written (normalised, 6 decimals) are simple: seed 2 at 96 px once wrote a
    pixel-simple polygon whose rounded copy crossed itself, and the data gate refused the set."""
    import numpy as np

    from damage.tasks.data.polygons import polygon_self_intersects

    data = generate_dataset(tmp_path / "ds", images=100, seed=2, imgsz=96, val_fraction=0.25)
    bad = []
    for f in sorted((data.parent / "labels").rglob("*.txt")):
        for k, line in enumerate(f.read_text().splitlines()):
            xy = np.array(line.split()[1:], float).reshape(-1, 2)
            if polygon_self_intersects(xy):
                bad.append(f"{f.name}:{k + 1}")
    assert not bad, bad


def test_closeup_datasets_are_deterministic(tmp_path):
    kw = dict(images=8, seed=5, imgsz=96, val_fraction=0.25, closeup_fraction=0.5)
    a, b = generate_dataset(tmp_path / "a", **kw), generate_dataset(tmp_path / "b", **kw)
    fa, fb = _files(a.parent), _files(b.parent)
    assert fa.keys() == fb.keys()
    assert all(fa[n] == fb[n] for n in fa if n != "data.yaml")


def test_cache_key_holds_generator_version_and_composition(tmp_path):
    from damage.tasks.core.config import DataConfig, SynthConfig
    from damage.tasks.data.source import synth_dir
    from damage.tasks.data.synth import GENERATOR_VERSION

    a = synth_dir(tmp_path, DataConfig(synth=SynthConfig(closeup_fraction=0.0)))
    b = synth_dir(tmp_path, DataConfig(synth=SynthConfig(closeup_fraction=0.6)))
    c = synth_dir(tmp_path, DataConfig(synth=SynthConfig(closeup_fraction=0.6, balance=False)))
    assert len({a, b, c}) == 3
    assert all(p.name.startswith(f"synth-g{GENERATOR_VERSION}-") for p in (a, b, c))


def test_bad_view_target_and_zoom_are_refused(tmp_path):
    with pytest.raises(ValueError, match="view"):
        render_sample(np.random.default_rng(0), 96, "aerial")
    with pytest.raises(ValueError, match="target"):
        render_sample(np.random.default_rng(0), 96, "closeup", "rust")
    with pytest.raises(DatasetError, match="zoom"):
        generate_dataset(tmp_path / "z", images=4, zoom=(0.5, 2.0))


def test_scenes_keep_damage_cut_by_the_image_border(samples):
    cut = [i for s in samples for i in s.instances if i.parent is not None
           and (i.mask[0].any() or i.mask[-1].any() or i.mask[:, 0].any() or i.mask[:, -1].any())]
    assert len(cut) >= 2, "scenes must label damage that the image border cuts (v2 dropped it)"
