"""Data gate building blocks: header parsing, bomb guard, label parsing, near-duplicate search."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from damage.expectations import SUITE_NAMES, load_suite_json, suite_codes
from damage.tasks.validation.scan import image_header, measure_image, parse_label_line, truncation_error
from damage.tasks.validation.tables import near_pairs
from damage.tasks.validation.validate import DEFAULT_SEVERITY, severities


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels but carries one tiny IDAT (decompression-bomb header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _encode(ext: str, w: int, h: int) -> bytes:
    img = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    return cv2.imencode(ext, img)[1].tobytes()


@pytest.mark.parametrize("ext", [".jpg", ".png", ".bmp", ".webp"])
def test_header_size_without_decoding(ext):
    fmt, w, h, c = image_header(_encode(ext, 70, 40))
    assert (w, h) == (70, 40) and c in (3, 4)


def test_bomb_refused_without_decode(tmp_path, monkeypatch):
    """Refused from the header: the decoder is never called (a spy on ``cv2.imdecode``, not a stopwatch)."""
    decoded = []
    real = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda *a: decoded.append(a) or real(*a))
    ok = tmp_path / "ok.png"
    ok.write_bytes(_encode(".png", 8, 8))
    assert measure_image(str(ok), max_pixels=64)[0] is True and len(decoded) == 1  # the spy sees decodes
    p = tmp_path / "bomb.png"
    p.write_bytes(png_header_only(20000, 20000))
    row = measure_image(str(p), max_pixels=178956970)
    assert row[0] is False and "max_pixels" in row[1] and (row[3], row[4]) == (20000, 20000)
    assert len(decoded) == 1  # the bomb's 400 M pixels were never decoded


def test_truncation_detected():
    jpg, png = _encode(".jpg", 64, 64), _encode(".png", 64, 64)
    assert truncation_error("jpeg", jpg) is None and truncation_error("png", png) is None
    assert "JPEG" in truncation_error("jpeg", jpg[:-10])
    assert "PNG" in truncation_error("png", png[: len(png) // 2])


def test_measure_good_image(tmp_path):
    p = tmp_path / "ok ü.jpg"
    p.write_bytes(_encode(".jpg", 640, 480))
    row = measure_image(str(p), max_pixels=10**9)
    decodes, err, fmt, w, h, c, nbytes, sha, phash, blur, bright, contrast, mtime, thumb = row
    assert decodes and not err and fmt == "jpeg" and (w, h, c) == (640, 480, 3)
    assert len(thumb) == 64
    assert len(sha) == 64 and len(phash) == 16 and blur > 100 and 50 < bright < 200


@pytest.mark.parametrize(("line", "ok", "n_points", "self_int"), [
    ("0 0.1 0.1 0.9 0.1 0.5 0.9", True, 3, False),
    ("1 0.1 0.1 0.9 0.9 0.9 0.1 0.1 0.9", True, 4, True),  # bow-tie
    ("0 0.1 0.1 0.9 0.1 0.9 0.9 0.1 0.9", True, 4, False),  # square
    ("0 0.1 nan 0.9 0.1 0.5 0.9", False, None, False),
    ("0 0.1 0.1 0.9", False, None, False),  # odd coordinate count
    ("x 0.1 0.1 0.9 0.1 0.5 0.9", False, None, False),
])
def test_parse_label_line(line, ok, n_points, self_int):
    row = parse_label_line(1, line)
    assert row[1] is ok
    if ok:
        assert row[4] == n_points and row[12] is self_int
        assert 0 <= row[11] <= 1 and (self_int or row[11] > 0)  # area fraction (bow-tie: signed halves cancel)


def test_near_pairs_match_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 300, dtype=np.uint64)
    flips = np.uint64(1) << rng.integers(0, 64, 300).astype(np.uint64)
    hashes = np.unique(np.concatenate([base, base[:100] ^ flips[:100], base[:50] ^ flips[:50] ^ (flips[50:100])]))
    for d in (0, 1, 3, 6):
        got = {(i, j) for i, j, _ in near_pairs(hashes, d)}
        x = hashes[:, None] ^ hashes[None, :]
        dist = np.bitwise_count(x)
        want = {(i, j) for i, j in zip(*np.nonzero(dist <= d), strict=True) if i < j} if d > 0 else set()
        assert got == want


def test_suites_are_ge_json_with_codes():
    for name in SUITE_NAMES:
        raw = load_suite_json(name)
        assert raw["name"] == name and raw["expectations"]
        for e in raw["expectations"]:
            assert e["type"].startswith("expect_") and e["meta"]["code"] in DEFAULT_SEVERITY
    assert suite_codes() == set(DEFAULT_SEVERITY)


def test_unknown_severity_code_is_config_error():
    from damage.tasks.core.config import ConfigError, ValidateConfig

    with pytest.raises(ConfigError, match="did you mean 'blurry'"):
        severities(ValidateConfig(severity={"blury": "error"}))


def test_flat_images_are_not_near_duplicates_but_recompressed_copies_are(tmp_path):
    """dHash collapses for flat/gradient images; the thumbnail check keeps them apart."""
    import cv2
    import pandas as pd

    from damage.tasks.validation.tables import duplicate_rows

    h, w = 120, 160
    grad_lr = np.tile(np.linspace(220, 90, w, dtype=np.float32), (h, 1))  # bright -> dark, left to right
    grad_tb = np.tile(np.linspace(110, 70, h, dtype=np.float32)[:, None], (1, w))  # dark, top to bottom
    rng = np.random.default_rng(0)
    textured = rng.integers(0, 255, (h, w), dtype=np.uint8)
    textured = cv2.GaussianBlur(textured, (0, 0), 3)
    imgs = {"a.png": grad_lr, "b.png": grad_tb, "c.png": textured}
    rows = []
    for name, g in imgs.items():
        p = tmp_path / name
        cv2.imwrite(str(p), np.dstack([g.astype(np.uint8)] * 3))
        rows.append(measure_image(str(p), max_pixels=10**9))
    p = tmp_path / "c_copy.jpg"  # the textured image again, re-encoded as JPEG
    cv2.imwrite(str(p), np.dstack([textured] * 3), [cv2.IMWRITE_JPEG_QUALITY, 80])
    rows.append(measure_image(str(p), max_pixels=10**9))
    names = [*imgs, "c_copy.jpg"]
    frame = pd.DataFrame({"file": names, "split": ["train", "val", "train", "train"],
                          "decodes": [r[0] for r in rows], "sha256": [r[7] for r in rows],
                          "phash": [r[8] for r in rows], "mtime_ns": [0, 0, 0, 1]})
    thumbs = np.stack([np.frombuffer(r[13], np.uint8) for r in rows])
    assert bin(int(rows[0][8], 16) ^ int(rows[1][8], 16)).count("1") <= 4  # the hashes alone collide
    found = duplicate_rows(frame, 4, thumbs)
    files = {r["file"] for r in found}
    assert "b.png" not in files and "a.png" not in files  # different flat images: no leakage finding
    assert files == {"c_copy.jpg"}
