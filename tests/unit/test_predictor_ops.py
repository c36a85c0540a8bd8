"""The predictor's numpy ops against Ultralytics' torch ops on random inputs (no model needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from damage.tasks.serving.mask_decode import mask_crop, native_axes, single_thread_matmul, taps
from damage.tasks.serving.predictor import (
    _nms_rows,
    _scale_boxes,
    _select,
    letterbox,
    nms,
)

ROOT = Path(__file__).resolve().parents[2]


def test_predictor_imports_no_torch_ultralytics_prefect():
    code = ("import damage.tasks.serving.predictor, sys; bad = {'torch', 'ultralytics', 'prefect'} & set(sys.modules); "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("shape", [(96, 96), (75, 201), (201, 75), (480, 640), (37, 53), (1, 300)])
@pytest.mark.parametrize("auto", [False, True])
def test_letterbox_matches_ultralytics(shape, auto):
    from ultralytics.data.augment import LetterBox

    rng = np.random.default_rng(sum(shape))
    im = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    ours, _ = letterbox(im, (160, 160), auto=auto, stride=32)
    ref = LetterBox((160, 160), auto=auto, stride=32)(image=im.copy())
    assert ours.shape == ref.shape
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("orig,inp", [((96, 96), (96, 96)), ((75, 201), (64, 160)), ((480, 640), (160, 160)),
                                      ((201, 75), (160, 64)), ((333, 517), (128, 192))])
def test_mask_decode_matches_process_mask_native(orig, inp):
    import torch
    from ultralytics.utils import ops

    rng = np.random.default_rng(orig[0] * 7 + inp[1])
    h, w = orig
    mh, mw = inp[0] // 4, inp[1] // 4
    protos = rng.normal(0, 1, (32, mh, mw)).astype(np.float32)
    coefs = rng.normal(0, 0.5, (6, 32)).astype(np.float32)
    x1 = rng.uniform(0, w * 0.6, 6)
    y1 = rng.uniform(0, h * 0.6, 6)
    boxes = np.stack([x1, y1, x1 + rng.uniform(2, w * 0.5, 6), y1 + rng.uniform(2, h * 0.5, 6)], 1).astype(np.float32)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
    ref = ops.process_mask_native(torch.from_numpy(protos), torch.from_numpy(coefs), torch.from_numpy(boxes),
                                  (h, w)).numpy().astype(bool)
    ay, ax = native_axes(mh, mw, h, w)
    ty, tx = taps(ay), taps(ax)
    ours = np.zeros((len(boxes), h, w), bool)
    for k, b in enumerate(boxes):  # the predictor's path: box region only, crop_mask's edge rule
        x0, y0 = (int(np.ceil(v)) for v in b[:2])
        x1, y1 = (int(np.ceil(v)) for v in b[2:])
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        ours[k, y0:y1, x0:x1] = mask_crop(coefs[k], protos, ty, tx, x0, y0, x1, y1)
    # the dense matrices agree too (they define the taps)
    dense = np.einsum("hp,npq,wq->nhw", ay, (coefs @ protos.reshape(32, -1)).reshape(-1, mh, mw), ax) > 0
    cols, rows = np.arange(w)[None, None, :], np.arange(h)[None, :, None]
    bb = boxes[:, :, None, None]
    dense &= (cols >= bb[:, 0]) & (cols < bb[:, 2]) & (rows >= bb[:, 1]) & (rows < bb[:, 3])
    assert (dense ^ ours).sum() <= max(3, 0.001 * ours.sum())
    for k in range(len(boxes)):
        union = (ours[k] | ref[k]).sum()
        iou = (ours[k] & ref[k]).sum() / union if union else 1.0
        assert iou >= 0.995, (k, iou)
        assert (ours[k] ^ ref[k]).sum() <= max(3, 0.002 * union)


def test_nms_matches_ultralytics():
    import torch
    from ultralytics.utils.nms import non_max_suppression

    rng = np.random.default_rng(0)
    nc, nm, n = 7, 32, 600
    xy = rng.uniform(0, 160, (2, n))
    wh = rng.uniform(4, 60, (2, n))
    scores = rng.uniform(0, 1, (nc, n)) ** 3
    coefs = rng.normal(0, 1, (nm, n))
    pred = np.concatenate([xy, wh, scores, coefs]).astype(np.float32)
    for conf, iou in [(0.25, 0.7), (0.1, 0.45), (0.5, 0.5)]:
        ref = non_max_suppression(torch.from_numpy(pred[None]), conf, iou, nc=nc, max_det=300)[0].numpy()
        ours = _select(pred, nc, conf, iou, 300)
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-4)


def test_nms_all_pairs_at_once_keeps_what_the_row_loop_keeps():
    """The all-pairs IoU matrix (up to NMS_MATRIX_MAX boxes) makes the same decisions as one row per kept box,
    including zero-area boxes (NaN IoU keeps them), tied scores and class offsets."""
    rng = np.random.default_rng(3)
    for t in range(60):
        n = int(rng.integers(1, 400))
        xy = rng.uniform(0, 200, (n, 2))
        wh = rng.uniform(0, 60, (n, 2)) * (rng.random((n, 1)) > 0.05)
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        boxes += (rng.integers(0, 3, n) * 7680)[:, None].astype(np.float32)
        scores = np.round(rng.random(n), 1 if t % 2 else 6).astype(np.float32)
        thr = float(rng.choice([0.45, 0.7, 0.9]))
        with np.errstate(invalid="ignore", divide="ignore"):
            ref = _nms_rows(boxes, np.argsort(-scores, kind="stable"), thr)
        assert np.array_equal(nms(boxes, scores, thr), ref), t


def test_single_thread_matmul_equals_one_product():
    rng = np.random.default_rng(5)
    for m, n in [(1, 10), (20, 19200), (64, 25600), (3, 7)]:
        a = rng.normal(0, 1, (m, 32)).astype(np.float32)
        b = rng.normal(0, 1, (32, n)).astype(np.float32)
        # OpenBLAS may pick another kernel for the blocks: last-bit differences only
        np.testing.assert_allclose(single_thread_matmul(a, b), a @ b, rtol=1e-5, atol=1e-5)


def test_nms_empty_and_scale_boxes_roundtrip():
    pred = np.zeros((4 + 3 + 32, 50), np.float32)
    assert _select(pred, 3, 0.25, 0.7, 300).shape == (0, 4 + 2 + 32)
    from ultralytics.utils import ops

    boxes = np.array([[10.0, 20.0, 100.0, 60.0], [0.0, 0.0, 160.0, 96.0]], np.float32)
    ref = ops.scale_boxes((96, 160), boxes.copy(), (75, 201))
    np.testing.assert_allclose(_scale_boxes(boxes.copy(), (96, 160), (75, 201)), ref, rtol=1e-6)


def test_instance_outline_is_traced_from_its_mask_on_first_read():
    """predict() leaves the outline to whoever reads it: traced from the box-cropped mask, in image pixels,
    once (cached), and a given outline is kept as given."""
    import numpy as np

    from damage.tasks.serving.damage_percent import BoxMask
    from damage.tasks.serving.predictor import Instance

    crop = np.zeros((20, 30), bool)
    crop[5:15, 10:25] = True
    inst = Instance(0, 1, "dent", 0.9, [40.0, 60.0, 70.0, 80.0], BoxMask(crop, 40, 60, (100, 120)), int(crop.sum()))
    assert "_polygon" not in vars(inst) or vars(inst)["_polygon"] is None
    poly = inst.polygon
    xs, ys = [p[0] for p in poly], [p[1] for p in poly]
    assert (min(xs), max(xs), min(ys), max(ys)) == (50, 64, 65, 74)  # crop 10:25 x 5:15, offset (40, 60)
    assert inst.polygon is poly and inst.to_dict()["polygon"] == poly
    given = Instance(1, 1, "dent", 0.5, [0, 0, 1, 1], crop, 3, [[0, 0], [1, 0], [1, 1]])
    assert given.polygon == [[0, 0], [1, 0], [1, 1]]
