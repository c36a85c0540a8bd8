"""Dataset import: YOLO folders and COCO JSON (polygons, RLE) -> YOLO-seg, and the CLI around it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import typer
import yaml
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from damage.flows.commands import data as data_cmd
from damage.tasks.core.config import CLASSES
from damage.tasks.core.errors import DatasetError
from damage.tasks.data.dataset import check_structure
from damage.tasks.data.importer import UnknownClassesError, import_dataset

W, H = 100, 80


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(p.relative_to(root).as_posix().encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _image(path: Path, w: int = W, h: int = H, v: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((h, w, 3), v, np.uint8)
    cv2.circle(img, (w // 2, h // 2), 10, (0, 0, 255), -1)
    cv2.imwrite(str(path), img)


def _uncompressed_rle(m: np.ndarray) -> dict:
    """COCO's uncompressed RLE: column-major run lengths, starting with a run of zeros."""
    flat = m.flatten(order="F").astype(np.uint8)
    counts, cur, run = [], 0, 0
    for v in flat:
        if v == cur:
            run += 1
        else:
            counts.append(run)
            cur, run = v, 1
    counts.append(run)
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": [int(c) for c in counts]}


def _labels(root: Path) -> dict[str, list[tuple[int, np.ndarray]]]:
    out = {}
    for p in sorted((root / "labels").rglob("*.txt")):
        rows = []
        for line in p.read_text().splitlines():
            v = line.split()
            rows.append((int(v[0]), np.array(v[1:], dtype=np.float64).reshape(-1, 2)))
        out[p.stem] = rows
    return out


def _fill(poly_px: np.ndarray, h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    cv2.fillPoly(m, [np.round(poly_px).astype(np.int32).reshape(-1, 1, 2)], 1)
    return m.astype(bool)


@pytest.fixture
def coco(tmp_path) -> dict:
    """A COCO instances JSON with CarDD category names, polygons, multi-part polygons and both RLE kinds."""
    root = tmp_path / "src"
    for i in range(5):
        _image(root / "images" / f"img{i}.jpg", v=40 + 30 * i)
    poly = [10.0, 10.0, 40.0, 12.0, 35.0, 30.0, 12.0, 28.0]
    part_a, part_b = [5.0, 50.0, 20.0, 50.0, 20.0, 70.0, 5.0, 70.0], [60.0, 50.0, 80.0, 50.0, 80.0, 65.0, 60.0, 65.0]
    m1 = np.zeros((H, W), np.uint8)
    cv2.ellipse(m1, (50, 40), (20, 12), 0, 0, 360, 1, -1)
    m2 = np.zeros((H, W), np.uint8)
    cv2.rectangle(m2, (30, 20), (70, 50), 1, -1)
    rle_c = mask_utils.encode(np.asfortranarray(m1))
    rle_c["counts"] = rle_c["counts"].decode()
    cats = [{"id": 1, "name": "dent"}, {"id": 2, "name": "scratch"}, {"id": 3, "name": "glass shatter"},
            {"id": 4, "name": "Tire-Flat"}, {"id": 7, "name": "person"}]
    anns = [
        {"id": 1, "image_id": 0, "category_id": 1, "segmentation": [poly], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 2, "segmentation": [part_a, part_b], "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 3, "segmentation": rle_c, "iscrowd": 0},
        {"id": 4, "image_id": 3, "category_id": 4, "segmentation": _uncompressed_rle(m2), "iscrowd": 1},
        {"id": 5, "image_id": 3, "category_id": 7, "segmentation": [poly], "iscrowd": 0},
        {"id": 6, "image_id": 4, "category_id": 7, "segmentation": [poly], "iscrowd": 0},
    ]
    images = [{"id": i, "file_name": f"img{i}.jpg", "width": W, "height": H} for i in range(5)]
    js = root / "annotations" / "instances_train.json"
    js.parent.mkdir(parents=True)
    js.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return {"json": js, "root": root, "poly": poly, "parts": (part_a, part_b), "m1": m1, "m2": m2}


def test_coco_import_converts_polygons_and_rle(coco, tmp_path):
    before = _tree_hash(coco["root"])
    with pytest.raises(UnknownClassesError) as exc:
        import_dataset(coco["json"], tmp_path / "out", val_fraction=0.4, seed=1)
    assert exc.value.report.unknown == {"person": 2}
    assert "person" in str(exc.value)
    assert not (tmp_path / "out").exists()

    rep = import_dataset(coco["json"], tmp_path / "out", val_fraction=0.4, seed=1, allow_unknown=True)
    assert _tree_hash(coco["root"]) == before, "source modified"
    assert rep.unknown == {"person": 2}
    assert rep.images == {"train": 3, "val": 2}  # dict equality ignores key order
    assert rep.rle_converted == 2 and rep.merged_segments == 1
    assert rep.mapping["glass shatter"] == "glass_shatter" and rep.mapping["Tire-Flat"] == "tire_flat"
    assert rep.instances["dent"] == rep.instances["scratch"] == rep.instances["glass_shatter"] == 1
    assert rep.instances["tire_flat"] == 1 and rep.instances["vehicle"] == 0

    out = tmp_path / "out"
    info = check_structure(out / "data.yaml")
    assert info.names == CLASSES
    labels = _labels(out)
    assert sorted(labels) == [f"img{i}" for i in range(5)]
    assert labels["img4"] == []  # only an unknown class: background image, still imported
    # polygon round trip: exact coordinates back after de-normalising
    (cls, xy), = labels["img0"]
    assert CLASSES[cls] == "dent"
    np.testing.assert_allclose(xy * [W, H], np.array(coco["poly"]).reshape(-1, 2), atol=1e-3)
    # two-part polygon: one polygon that still covers both parts
    (cls, xy), = labels["img1"]
    parts = _fill(np.array(coco["parts"][0]).reshape(-1, 2)) | _fill(np.array(coco["parts"][1]).reshape(-1, 2))
    got = _fill(xy * [W, H])
    assert CLASSES[cls] == "scratch" and (got & parts).sum() / (got | parts).sum() >= 0.9
    # compressed and uncompressed RLE -> polygons that rasterise to the original masks
    for stem, m, name in (("img2", coco["m1"], "glass_shatter"), ("img3", coco["m2"], "tire_flat")):
        (cls, xy), = labels[stem]
        got, want = _fill(xy * [W, H]), m.astype(bool)
        assert CLASSES[cls] == name
        assert (got & want).sum() / (got | want).sum() >= 0.9, stem


def test_coco_split_is_deterministic_by_seed(coco, tmp_path):
    def split_of(out):
        return {p.stem: p.parent.name for p in (out / "images").rglob("*.jpg")}

    a = split_of(import_dataset(coco["json"], tmp_path / "a", seed=3, allow_unknown=True).out)
    b = split_of(import_dataset(coco["json"], tmp_path / "b", seed=3, allow_unknown=True).out)
    assert a == b and len(a) == 5 and set(a.values()) == {"train", "val"}


def test_explicit_class_map_and_bad_target(coco, tmp_path):
    rep = import_dataset(coco["json"], tmp_path / "out", class_map={"person": "-"})
    assert rep.ignored == {"person": 2} and rep.unknown == {}
    with pytest.raises(DatasetError, match="not one of the classes"):
        import_dataset(coco["json"], tmp_path / "out2", class_map={"person": "pedestrian"})
    with pytest.raises(DatasetError, match="does not have"):
        import_dataset(coco["json"], tmp_path / "out3", class_map={"bicycle": "vehicle"})
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


def test_missing_coco_image_leaves_no_output(coco, tmp_path):
    (coco["root"] / "images" / "img3.jpg").unlink()
    with pytest.raises(DatasetError, match="img3.jpg"):
        import_dataset(coco["json"], tmp_path / "deep" / "out", allow_unknown=True)
    assert not (tmp_path / "deep").exists()


@pytest.fixture
def yolo_src(tmp_path) -> Path:
    root = tmp_path / "yolo"
    names = {0: "car", 1: "Dent", 2: "glass shatter", 3: "person"}
    rows = {
        ("train", "a"): ["0 0.1 0.1 0.9 0.1 0.9 0.9 0.1 0.9", "1 0.2 0.2 0.3 0.2 0.25 0.3"],
        ("train", "b"): ["2 0.5 0.5 0.6 0.5 0.6 0.6", "3 0.1 0.1 0.2 0.1 0.2 0.2"],
        ("val", "c"): ["0 0.1 0.1 0.5 0.1 0.5 0.5", "3 0.5 0.5 0.2 0.2"],
    }
    for (split, stem), lines in rows.items():
        _image(root / "images" / split / f"{stem}.png")
        lbl = root / "labels" / split / f"{stem}.txt"
        lbl.parent.mkdir(parents=True, exist_ok=True)
        lbl.write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text(yaml.safe_dump({"path": ".", "train": "images/train", "val": "images/val",
                                                    "names": names}))
    return root


def test_yolo_import_remaps_classes_and_keeps_splits(yolo_src, tmp_path):
    before = _tree_hash(yolo_src)
    with pytest.raises(UnknownClassesError) as exc:
        import_dataset(yolo_src, tmp_path / "out", class_map={"car": "vehicle"})
    assert exc.value.report.unknown == {"person": 2}
    rep = import_dataset(yolo_src, tmp_path / "out", class_map={"car": "vehicle"}, allow_unknown=True)
    assert _tree_hash(yolo_src) == before
    assert rep.format == "yolo" and rep.images == {"train": 2, "val": 1}
    assert rep.unknown == {"person": 2}
    out = tmp_path / "out"
    assert (out / "images" / "val" / "c.png").is_file()
    labels = _labels(out)
    assert [c for c, _ in labels["a"]] == [CLASSES.index("vehicle"), CLASSES.index("dent")]
    assert [c for c, _ in labels["b"]] == [CLASSES.index("glass_shatter")]
    np.testing.assert_allclose(labels["a"][0][1], [[0.1, 0.1], [0.9, 0.1], [0.9, 0.9], [0.1, 0.9]])
    assert check_structure(out).instances["vehicle"] == 2


def test_refuses_non_empty_output_and_output_inside_source(yolo_src, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(DatasetError, match="not empty"):
        import_dataset(yolo_src, tmp_path / "full", allow_unknown=True)
    with pytest.raises(DatasetError, match="inside the source"):
        import_dataset(yolo_src, yolo_src / "copy", allow_unknown=True)


# ----------------------------------------------------------------------------- CLI


@pytest.fixture
def cli():
    app = typer.Typer()

    @app.callback()
    def _root() -> None:  # keeps "data" a sub-command even when it is the only group
        pass

    data_cmd.register(app)
    return lambda *args: CliRunner().invoke(app, ["data", *map(str, args)])


def test_cli_missing_source_is_one_line_exit_2(cli, tmp_path):
    r = cli("import", tmp_path / "nope.json", tmp_path / "out")
    assert r.exit_code == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "nope.json" in r.stderr
    assert not (tmp_path / "out").exists()


def test_cli_unknown_classes_exit_1_then_allowed(cli, coco, tmp_path):
    r = cli("import", coco["json"], tmp_path / "out")
    assert r.exit_code == 1
    assert "person" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    r = cli("import", coco["json"], tmp_path / "out", "--allow-unknown")
    assert r.exit_code == 0, r.output
    assert "unknown classes SKIPPED" in r.stdout and "person" in r.stdout
    assert str((tmp_path / "out" / "data.yaml").resolve()) in r.stdout.replace("\n", "")
    r = cli("import", coco["json"], tmp_path / "out2", "--map", "person=vehicle")
    assert r.exit_code == 0 and "person -> vehicle" in r.stdout


def test_cli_bad_map_syntax(cli, coco, tmp_path):
    r = cli("import", coco["json"], tmp_path / "out", "--map", "person")
    assert r.exit_code == 2 and "SRC=DST" in r.stderr
    assert not (tmp_path / "out").exists()


def test_cli_synth_writes_and_refuses_foreign_folder(cli, tmp_path):
    r = cli("synth", tmp_path / "ds", "--images", 4, "--imgsz", 64, "--seed", 2)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ds" / "data.yaml").is_file() and "data.yaml" in r.stdout
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "f").write_text("x")
    r = cli("synth", tmp_path / "other", "--images", 4, "--imgsz", 64)
    assert r.exit_code == 2 and "not empty" in r.stderr
    r = cli("synth", tmp_path / "ds2", "--images", 1)
    assert r.exit_code == 2 and not (tmp_path / "ds2").exists()
