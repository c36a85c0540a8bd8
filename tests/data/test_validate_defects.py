"""Data gate: datasets with planted defects must yield exactly the right code, severity and file."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from damage.tasks.core.config import ValidateConfig
from damage.tasks.validation.validate import DEFAULT_SEVERITY, validate_dataset

NAMES = ["vehicle", "dent", "scratch"]
TRI = "0.2 0.2 0.8 0.2 0.5 0.8"


def _noise(seed: int, size: int = 64, lo: int = 0, hi: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(lo, hi, (size, size, 3), dtype=np.uint8)


def _jpg(path: Path, img: np.ndarray) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    path.write_bytes(buf.tobytes())
    return buf.tobytes()


def _label(path: Path, text: str, newline: str = "\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.replace("\n", newline).encode())


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels but carries one tiny IDAT: a decompression-bomb header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# (file relative to the dataset root, code) of every planted defect.
PLANTED = [
    ("images/train/zero.jpg", "corrupt_image"),
    ("images/train/text.jpg", "corrupt_image"),
    ("images/train/trunc.jpg", "corrupt_image"),
    ("images/train/trunc_png.png", "corrupt_image"),
    ("images/train/bomb.png", "corrupt_image"),
    ("labels/train/nan.txt", "unreadable_label"),
    ("labels/train/odd.txt", "unreadable_label"),
    ("labels/train/oor.txt", "label_out_of_range"),
    ("labels/train/unk.txt", "unknown_class"),
    ("labels/train/degen.txt", "degenerate_polygon"),
    ("labels/train/bowtie.txt", "degenerate_polygon"),
    ("images/train/nolabel.jpg", "missing_label"),
    ("labels/train/orphan.txt", "orphan_label"),
    ("images/train/dup.jpg", "duplicate_image"),
    ("images/train/near.jpg", "near_duplicate"),
    ("images/val/leak.jpg", "split_leakage"),
    ("images/train/dark.jpg", "too_dark"),
    ("images/train/blurry.jpg", "blurry"),
    ("images/train/small.jpg", "too_small"),
    ("images/train/link_out.jpg", "symlink_outside"),
    ("images/test", "empty_split"),
]
GOOD = ["images/train/good_0.jpg", "images/train/crlf.jpg", "images/train/name with space ü.jpg",
        "images/val/v_good_0.jpg", "labels/train/crlf.txt", "labels/train/name with space ü.txt"]


def build_planted(root: Path) -> Path:
    """A small YOLO-seg dataset with one of each defect (see PLANTED); returns the root."""
    tr_i, tr_l = root / "images/train", root / "labels/train"
    va_i, va_l = root / "images/val", root / "labels/val"
    for i in range(6):
        _jpg(tr_i / f"good_{i}.jpg", _noise(i))
        _label(tr_l / f"good_{i}.txt", f"{i % 3} {TRI}\n{(i + 1) % 3} 0.1 0.1 0.4 0.1 0.4 0.4 0.1 0.4\n")
    for i in range(2):
        _jpg(va_i / f"v_good_{i}.jpg", _noise(100 + i))
        _label(va_l / f"v_good_{i}.txt", f"{i} {TRI}\n")
    (root / "images/test").mkdir(parents=True)

    def planted_image(name: str, data: bytes | None = None, label: str | None = f"0 {TRI}\n") -> None:
        if data is None:
            _jpg(tr_i / name, _noise(zlib.crc32(name.encode()) % 1000 + 10))
        else:
            (tr_i / name).write_bytes(data)
        if label is not None:
            _label(tr_l / (Path(name).stem + ".txt"), label)

    good_jpg = (tr_i / "good_0.jpg").read_bytes()
    planted_image("zero.jpg", b"")
    planted_image("text.jpg", b"this is not an image, just text named .jpg\n")
    planted_image("trunc.jpg", good_jpg[: len(good_jpg) // 2])
    ok, png = cv2.imencode(".png", _noise(7))
    planted_image("trunc_png.png", png.tobytes()[: len(png) // 2])
    planted_image("bomb.png", png_header_only(20000, 20000))
    planted_image("nan.jpg", label=f"0 {TRI}\n1 0.1 nan 0.5 0.5 0.2 0.9\n")
    planted_image("crlf.jpg", label=f"0 {TRI}  \n1 {TRI}\t\n\n   \n")
    (tr_l / "crlf.txt").write_bytes(f"0 {TRI}  \r\n1 {TRI}\t\r\n\r\n   \r\n".encode())
    planted_image("odd.jpg", label="0 0.1 0.1 0.5 0.5 0.9\n")
    planted_image("oor.jpg", label="0 0.1 0.1 1.2 0.1 0.5 0.5\n")
    planted_image("unk.jpg", label=f"9 {TRI}\n")
    planted_image("degen.jpg", label="0 0.1 0.1 0.5 0.5\n")
    planted_image("bowtie.jpg", label="0 0.1 0.1 0.9 0.9 0.9 0.1 0.1 0.9\n")
    planted_image("nolabel.jpg", label=None)
    _label(tr_l / "orphan.txt", f"0 {TRI}\n")
    planted_image("dup.jpg", good_jpg)
    near = np.clip(_noise(1).astype(int) + 3, 0, 255).astype(np.uint8)
    planted_image("near.jpg", _jpg(root / "near_tmp.jpg", near))
    (root / "near_tmp.jpg").unlink()
    (va_i / "leak.jpg").write_bytes((tr_i / "good_2.jpg").read_bytes())
    _label(va_l / "leak.txt", f"0 {TRI}\n")
    planted_image("dark.jpg", _jpg(root / "t.jpg", _noise(11, lo=0, hi=20)))
    grad = np.tile(np.linspace(60, 200, 64, dtype=np.uint8), (64, 1))
    planted_image("blurry.jpg", _jpg(root / "t.jpg", cv2.cvtColor(cv2.GaussianBlur(grad, (0, 0), 8), cv2.COLOR_GRAY2BGR)))
    planted_image("small.jpg", _jpg(root / "t.jpg", _noise(12, size=16)))
    (root / "t.jpg").unlink()
    planted_image("name with space ü.jpg")
    outside = root.parent / f"{root.name}_outside.jpg"
    _jpg(outside, _noise(13))
    os.symlink(outside, tr_i / "link_out.jpg")
    _label(tr_l / "link_out.txt", f"0 {TRI}\n")
    # The copies are the newer files (the gate keeps the older member of a duplicate group).
    later = (tr_i / "good_0.jpg").stat().st_mtime_ns + 10**10
    for name in ("dup.jpg", "near.jpg"):
        os.utime(tr_i / name, ns=(later, later))
    (root / "data.yaml").write_text(yaml.safe_dump(
        {"path": str(root), "train": "images/train", "val": "images/val", "test": "images/test", "names": NAMES}))
    return root


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """(mtime_ns, size, bytes) of every file and link under root, links not followed."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in files + dirs:
            p = Path(dirpath) / name
            st = p.lstat()
            data = p.read_bytes() if p.is_file() and not p.is_symlink() else os.readlink(p).encode() if p.is_symlink() else b""
            out[str(p.relative_to(root))] = (st.st_mtime_ns, st.st_size, data)
    return out


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    return build_planted(tmp_path_factory.mktemp("planted") / "ds")


@pytest.fixture(scope="module")
def planted_run(planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("planted_out")
    before = snapshot(planted)
    res = validate_dataset(planted, ValidateConfig(workers=1), report_path=out / "report.json",
                           html_dir=out / "html", clean_out=out / "clean")
    return res, before, out


def test_report_schema_and_verdict(planted_run, planted):
    res, _, out = planted_run
    report = json.loads((out / "report.json").read_text())
    assert report == res.report
    assert set(report) == {"passed", "dataset", "fingerprint", "summary", "findings"}
    assert set(report["summary"]) == {"images", "annotations", "errors", "warnings", "by_code"}
    assert report["passed"] is False and res.passed is False
    assert report["dataset"] == str(planted.resolve())
    assert report["fingerprint"] == res.fingerprint and len(res.fingerprint) == 16
    for f in report["findings"]:
        assert set(f) == {"code", "severity", "file", "detail"}
        assert f["severity"] in ("error", "warning") and f["detail"]
    errors = sum(f["severity"] == "error" for f in report["findings"])
    assert report["summary"]["errors"] == errors
    assert report["summary"]["warnings"] == len(report["findings"]) - errors
    assert sum(report["summary"]["by_code"].values()) == len(report["findings"])
    n_images = sum(1 for p in planted.rglob("*") if p.suffix in (".jpg", ".png") and "images" in p.parts)
    assert report["summary"]["images"] == n_images


@pytest.mark.parametrize(("file", "code"), PLANTED)
def test_planted_defect_reported(planted_run, file, code):
    findings = planted_run[0].report["findings"]
    hits = [f for f in findings if f["file"] == file and f["code"] == code]
    assert hits, f"{code} not reported for {file}; got {[f for f in findings if f['file'] == file]}"
    assert all(f["severity"] == DEFAULT_SEVERITY[code] for f in hits)


def test_no_false_positives(planted_run):
    findings = planted_run[0].report["findings"]
    planted_pairs = set(PLANTED)
    for f in findings:
        assert f["file"] not in GOOD, f
        if (f["file"], f["code"]) not in planted_pairs:
            # the only extra findings allowed: warnings about dataset-level balance
            assert f["code"] == "class_imbalance", f


def test_duplicate_details_name_the_twin(planted_run):
    by = {(f["file"], f["code"]): f["detail"] for f in planted_run[0].report["findings"]}
    assert "images/train/good_0.jpg" in by[("images/train/dup.jpg", "duplicate_image")]
    assert "images/train/good_1.jpg" in by[("images/train/near.jpg", "near_duplicate")]
    assert "images/train/good_2.jpg" in by[("images/val/leak.jpg", "split_leakage")]
    assert "max_pixels" in by[("images/train/bomb.png", "corrupt_image")]
    assert "truncated" in by[("images/train/trunc.jpg", "corrupt_image")]


def test_input_untouched_and_clean_copy(planted_run, planted):
    res, before, out = planted_run
    assert snapshot(planted) == before  # names, bytes and mtimes
    clean = out / "clean"
    assert res.clean_data_yaml == clean / "data.yaml"
    q = json.loads((clean / "quarantine.json").read_text())
    left = {e["file"]: e["codes"] for e in q["left_out"]}
    for file, code in PLANTED:
        if DEFAULT_SEVERITY[code] == "error" or code in ("duplicate_image", "near_duplicate", "split_leakage"):
            if file.startswith("images/") and Path(file).suffix:
                assert code in left[file] and not (clean / file).exists()
    assert "labels/train/unk.txt" in left and not (clean / "images/train/unk.jpg").exists()
    for keep in ("images/train/good_0.jpg", "images/train/good_1.jpg", "images/train/good_2.jpg",
                 "images/train/name with space ü.jpg", "images/train/nolabel.jpg", "images/train/dark.jpg"):
        assert (clean / keep).is_file() and not (clean / keep).is_symlink()
    assert (clean / "labels/train/crlf.txt").read_bytes() == (planted / "labels/train/crlf.txt").read_bytes()
    assert not any(p.is_symlink() for p in clean.rglob("*"))
    again = validate_dataset(clean, ValidateConfig(workers=1, severity={"empty_split": "warning"}))
    assert again.passed, again.summary_line()
    assert not {"duplicate_image", "near_duplicate", "split_leakage"} & set(again.by_code)


def test_html_is_self_contained(planted_run):
    res, _, out = planted_run
    page = res.html_path.read_text(encoding="utf-8")
    assert res.html_path == out / "html" / "index.html"
    assert "corrupt_image" in page and "split_leakage" in page and "FAILED" in page
    assert "data:image/jpeg;base64," in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert (out / "html" / "data_docs" / "index.html").is_file()
    assert res.docs_path == out / "html" / "data_docs" / "index.html"


def test_summary_line_names_counts_and_report(planted_run):
    res = planted_run[0]
    line = res.summary_line()
    assert "FAILED" in line and str(res.report_path) in line
    assert f"corrupt_image={res.by_code['corrupt_image']} (error)" in line


def test_worker_pool_gives_same_findings(planted, planted_run):
    res = validate_dataset(planted, ValidateConfig(workers=2, chunk_size=2))
    assert res.report["findings"] == planted_run[0].report["findings"]


def test_thresholds_come_from_config(planted):
    res = validate_dataset(planted, ValidateConfig(workers=1, min_width=65, min_height=65,
                                                   severity={"too_small": "error", "orphan_label": "warning"}))
    small = {f["file"] for f in res.report["findings"] if f["code"] == "too_small"}
    assert "images/train/good_0.jpg" in small  # 64 px < 65
    assert all(f["severity"] == "error" for f in res.report["findings"] if f["code"] == "too_small")
    assert all(f["severity"] == "warning" for f in res.report["findings"] if f["code"] == "orphan_label")


def test_alternative_layout_split_dirs(tmp_path):
    root = tmp_path / "alt"
    for split, n in (("train", 3), ("valid", 2)):
        for i in range(n):
            _jpg(root / split / "images" / f"{split}{i}.jpg", _noise(zlib.crc32(f"{split}{i}".encode()) % 997))
            _label(root / split / "labels" / f"{split}{i}.txt", f"{i % 3} {TRI}\n")
    (root / "valid/labels/stray.txt").write_text(f"0 {TRI}\n")
    (root / "data.yaml").write_text(yaml.safe_dump({"train": "train/images", "val": "valid/images", "names": NAMES}))
    res = validate_dataset(root / "data.yaml", ValidateConfig(workers=1, imbalance_ratio=100))
    assert res.report["summary"]["images"] == 5
    assert [(f["code"], f["file"]) for f in res.report["findings"]] == [("orphan_label", "valid/labels/stray.txt")]
