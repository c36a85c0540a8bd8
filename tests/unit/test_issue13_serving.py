"""Issue 13, items 10-13 (serving): decompression bombs, per-instance masks, the pyfunc's path
column, untrusted ONNX metadata. A constant-output ONNX model stands in for a trained one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from damage.tasks.core.errors import DamageError

REPO = Path(__file__).resolve().parents[2]
NM, IMGSZ = 32, 640


def fake_onnx(path: Path, boxes: list[tuple[float, float, float, float]], metadata: dict[str, str] | None = None,
              nc: int = 2, cls: int | list[int] = 1) -> Path:
    """An ONNX "YOLOv8-seg" whose outputs are constants: one detection per box (class ``cls``, or
    ``cls[k]`` for box k; score 0.9) with masks covering each box, prototypes 160x160."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    a = max(len(boxes), 1)
    det = np.zeros((1, 4 + nc + NM, a), np.float32)
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        det[0, :4, k] = [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]
        det[0, 4 + (cls[k] if isinstance(cls, list) else cls), k] = 0.9
        det[0, 4 + nc:, k] = 1.0
    proto = np.ones((1, NM, IMGSZ // 4, IMGSZ // 4), np.float32)
    nodes = [helper.make_node("Constant", [], ["output0"], value=numpy_helper.from_array(det)),
             helper.make_node("Constant", [], ["output1"], value=numpy_helper.from_array(proto))]
    graph = helper.make_graph(
        nodes, "fake", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, IMGSZ, IMGSZ])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, list(det.shape)),
         helper.make_tensor_value_info("output1", TensorProto.FLOAT, list(proto.shape))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    meta = {"names": "{0: 'vehicle', 1: 'dent'}", "imgsz": f"[{IMGSZ}, {IMGSZ}]", "stride": "32", **(metadata or {})}
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return path


def png_bomb(path: Path, side: int = 20000) -> Path:
    """A valid greyscale PNG of side x side pixels that compresses to a few hundred KB."""
    import struct

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp, row, parts = zlib.compressobj(9), b"\x00" * (side + 1), []
    for _ in range(side):
        parts.append(comp.compress(row))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    return png_bomb(tmp_path_factory.mktemp("bomb") / "bomb.png")


# ---- item 10 -----------------------------------------------------------------------------------------

BOMB_SCRIPT = r"""
import base64, sys
from pathlib import Path
from damage.tasks.core.errors import DamageError
from damage.tasks.serving.predictor import Predictor
from damage.tasks.serving.pyfunc_model import DamageSegModel
from damage.tasks.validation.html import _thumb

onnx, bomb = sys.argv[1], sys.argv[2]
p = Predictor(onnx)
refusals = []
try:
    p.predict(bomb)
except DamageError as e:
    refusals.append(str(e))
m = DamageSegModel()
m.predictor, m.onnx_name = p, "m.onnx"
out = m.predict(None, [{"image": base64.b64encode(Path(bomb).read_bytes()).decode()}])
refusals.append(out[0].get("error", ""))
refusals.append(str(_thumb(bomb)))
print("REFUSALS", refusals)
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork+exec, so it would report the pytest
# parent's peak; the new address space's high-water mark starts at exec
hwm = [line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:")][0]
print("MAXRSS_MB", int(hwm.split()[1]) / 1024)
"""


def test_13_10_decompression_bomb_refused_before_decoding(tmp_path, bomb):
    assert bomb.stat().st_size < 2_000_000  # a small file declaring 400 MP
    onnx = fake_onnx(tmp_path / "m.onnx", [(10, 10, 50, 50)])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", BOMB_SCRIPT, str(onnx), str(bomb)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    refusals = r.stdout.split("REFUSALS", 1)[1].split("\n", 1)[0]
    assert refusals.count("20000x20000 = 400000000 pixels exceeds max_pixels=178956970") == 2, refusals
    assert f"{bomb}: 20000x20000" in refusals  # the predictor names the file
    assert refusals.rstrip().endswith("'None']")  # no thumbnail
    rss = float(r.stdout.split("MAXRSS_MB", 1)[1].split()[0])
    assert rss < 600, f"peak RSS {rss:.0f} MB: the bomb was decoded (it needs >= 1200 MB)"


def test_13_10_predictor_limit_from_onnx_metadata(tmp_path):
    import cv2

    from damage.tasks.core.images import ImageTooLarge
    from damage.tasks.serving.predictor import Predictor

    onnx = fake_onnx(tmp_path / "m.onnx", [(10, 10, 50, 50)], {"damage.max_pixels": "4096"})
    img = tmp_path / "x.png"
    cv2.imwrite(str(img), np.zeros((65, 64, 3), np.uint8))
    with pytest.raises(ImageTooLarge, match=r"x.png: 64x65 = 4160 pixels exceeds max_pixels=4096"):
        Predictor(onnx).predict(img)
    assert len(Predictor(onnx, max_pixels=10_000).predict(img)) == 1


# ---- item 11 -----------------------------------------------------------------------------------------

def test_13_11_masks_stay_cropped_memory_bounded(tmp_path):
    from damage.tasks.serving.predictor import Predictor

    # 63 small instances on a 12 MP photo: full-frame masks would cost 63 x 12 MB = 756 MB
    # inside the letterboxed photo (rows 80-560 of the 640 input), 9 x 7 boxes of 50x50 input px
    boxes = [(10 + 70 * (k % 9), 90 + 70 * (k // 9), 60 + 70 * (k % 9), 140 + 70 * (k // 9)) for k in range(63)]
    onnx = fake_onnx(tmp_path / "m.onnx", boxes)
    p = Predictor(onnx, conf=0.5, iou=0.5)
    image = np.full((3000, 4000, 3), 90, np.uint8)
    tracemalloc.start()
    try:
        pred = p.predict(image)[0]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(pred.instances) == 63
    assert peak < 150 * 2**20, f"postprocess peaked at {peak / 2**20:.0f} MB"
    held = sum(i.mask.crop.nbytes for i in pred.instances)
    assert held < 63 * 400 * 400  # each mask is its box (~310x310 px here), not 12 MB
    inst = pred.instances[0]
    full = np.asarray(inst.mask)  # the full frame is still available on demand
    assert full.shape == (3000, 4000) and int(full.sum()) == inst.area_px
    with pytest.raises(DamageError, match="max_det must be in"):
        Predictor(onnx, max_det=10**6)
    assert len(Predictor(onnx, conf=0.5, max_det=5).predict(image)[0].instances) == 5


def test_13_11_rows_per_request_capped(tmp_path, monkeypatch):
    from damage.tasks.serving.predictor import Predictor
    from damage.tasks.serving.pyfunc_model import DamageSegModel

    m = DamageSegModel()
    m.predictor, m.onnx_name = Predictor(fake_onnx(tmp_path / "m.onnx", [(10, 10, 50, 50)])), "m.onnx"
    monkeypatch.setenv("DAMAGE_SERVING_MAX_ROWS", "3")
    with pytest.raises(DamageError, match=r"request has 4 rows; at most 3 per request"):
        m.predict(None, [{"image": "x"}] * 4)


# ---- item 12 -----------------------------------------------------------------------------------------

def test_13_12_pyfunc_path_column_off_by_default_and_rooted(tmp_path, monkeypatch):
    import cv2

    from damage.tasks.serving.predictor import Predictor
    from damage.tasks.serving.pyfunc_model import PATH_ERROR, DamageSegModel

    m = DamageSegModel()
    m.predictor, m.onnx_name = Predictor(fake_onnx(tmp_path / "m.onnx", [(10, 10, 50, 50)])), "m.onnx"
    root = tmp_path / "served"
    root.mkdir()
    cv2.imwrite(str(root / "ok.png"), np.zeros((64, 64, 3), np.uint8))
    secret = tmp_path / "secret.png"
    cv2.imwrite(str(secret), np.zeros((64, 64, 3), np.uint8))
    unreadable = root / "locked.png"
    unreadable.write_bytes(b"x")
    unreadable.chmod(0)
    monkeypatch.delenv("DAMAGE_SERVING_PATH_ROOT", raising=False)
    assert m.predict(None, [{"path": str(root / "ok.png")}])[0]["error"] == PATH_ERROR  # off by default
    monkeypatch.setenv("DAMAGE_SERVING_PATH_ROOT", str(root))
    assert "error" not in m.predict(None, [{"path": "ok.png"}])[0]
    errors = {p: m.predict(None, [{"path": p}])[0].get("error")
              for p in (str(secret), "../secret.png", "missing.png", "/etc/shadow", "/etc/hostname")}
    if os.geteuid() != 0:  # root reads mode-000 files anyway
        errors["locked.png"] = m.predict(None, [{"path": "locked.png"}])[0].get("error")
    assert set(errors.values()) == {PATH_ERROR}, errors  # one text: no probing the server's disk


# ---- item 13 -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("key", "value", "match"), [
    ("damage.conf", '"high"', r"'damage.conf' must be a number in \[0, 1\], got 'high'"),
    ("damage.iou", "7", r"'damage.iou' must be a number in \[0, 1\], got 7"),
    ("imgsz", "[60000, 60000]", r"'imgsz' must be two integers in \[32, 4096\]"),
    ("stride", "0", r"'stride' must be an integer"),
    ("damage.max_pixels", "-1", r"'damage.max_pixels' must be an integer"),
])
def test_13_13_onnx_metadata_validated(tmp_path, key, value, match):
    from damage.tasks.serving.predictor import Predictor

    onnx = fake_onnx(tmp_path / "m.onnx", [(10, 10, 50, 50)], {key: value})
    tracemalloc.start()
    try:
        with pytest.raises(DamageError, match=match) as e:
            Predictor(onnx)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(onnx) in str(e.value) and peak < 50 * 2**20


def test_13_13_zero_thresholds_are_kept(tmp_path):
    from damage.tasks.serving.predictor import Predictor

    p = Predictor(fake_onnx(tmp_path / "m.onnx", [(10, 10, 50, 50)], {"damage.conf": "0", "damage.iou": "0.0"}))
    assert (p.conf, p.iou) == (0.0, 0.0)
    assert json.dumps(p.metadata["names"]) == '["vehicle", "dent"]'


# ---- item 14 -----------------------------------------------------------------------------------------

def test_13_14_predict_output_names_never_clash(tmp_path):
    import cv2
    from typer.testing import CliRunner

    from damage.flows.cli import app

    onnx = fake_onnx(tmp_path / "m.onnx", [(10, 90, 60, 140)])
    src = tmp_path / "photos"
    src.mkdir()
    for n in ("index.png", "index.jpg", "car.png", "Car.jpg"):
        cv2.imwrite(str(src / n), np.full((48, 64, 3), 100, np.uint8))
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    # output folder == input folder: an overlay NAME.png must not replace the input NAME.png either
    r = CliRunner().invoke(app, ["predict", str(src), "--model", str(onnx), "--out", str(src)])
    assert r.exit_code == 0, r.output
    assert all((src / n).read_bytes() == b for n, b in before.items())  # no input overwritten
    index = json.loads((src / "index.json").read_text())
    assert isinstance(index, list) and len(index) == 4
    jsons = [e["json"] for e in index]
    assert len(set(j.lower() for j in jsons)) == 4 and "index.json" not in jsons
    for e in index:  # each image's document is its own
        assert json.loads((src / e["json"]).read_text())["image"] == e["image"]
