"""Evaluator metric core vs independent implementations (pycocotools COCOeval, Ultralytics).

Ground truth and predictions are synthetic: random instance masks, predictions made by
jittering, dropping, duplicating and mis-classifying them plus false positives with varied
scores, so mAP lands mid-range and a disagreement would show.
"""

from __future__ import annotations

import numpy as np
import pytest

from damage.tasks.evaluation.metrics import (
    IOU_THRESHOLDS,
    ImageDets,
    ImageTruth,
    box_iou_np,
    map_metrics,
    mask_iou_np,
    match_detections,
    score_image,
)

H = W = 64
NC = 3


def _box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)


def _blob(rng: np.random.Generator) -> np.ndarray:
    """A random ellipse or rectangle mask, at least a few pixels large."""
    yy, xx = np.mgrid[:H, :W]
    cx, cy = rng.uniform(8, W - 8), rng.uniform(8, H - 8)
    a, b = rng.uniform(3, 14), rng.uniform(3, 14)
    if rng.random() < 0.5:
        m = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1
    else:
        m = (abs(xx - cx) <= a) & (abs(yy - cy) <= b)
    return m


def _jitter(rng: np.random.Generator, m: np.ndarray, strength: int) -> np.ndarray:
    dy, dx = rng.integers(-strength, strength + 1, 2)
    out = np.roll(np.roll(m, dy, 0), dx, 1)
    if rng.random() < 0.5:  # grow or shrink by a pixel
        pad = np.pad(out, 1)
        nb = [pad[1 + oy:1 + oy + H, 1 + ox:1 + ox + W] for oy in (-1, 0, 1) for ox in (-1, 0, 1)]
        out = np.any(nb, 0) if rng.random() < 0.5 else np.all(nb, 0)
    return out if out.any() else m


def make_case(seed: int = 0, n_images: int = 30):
    """(truths, dets) with mid-range mAP."""
    rng = np.random.default_rng(seed)
    truths, dets = [], []
    for i in range(n_images):
        n = int(rng.integers(1, 6))
        masks = [_blob(rng) for _ in range(n)]
        cls = rng.integers(0, NC, n)
        truths.append(ImageTruth(f"im{i}", np.stack([_box(m) for m in masks]), cls, np.stack(masks)))
        pm, ps, pc = [], [], []
        for m, c in zip(masks, cls, strict=True):
            if rng.random() < 0.15:  # missed
                continue
            q = float(rng.uniform(0.2, 1.0))
            pm.append(_jitter(rng, m, int(rng.integers(0, 4))))
            ps.append(q)
            pc.append(int(c) if rng.random() < 0.9 else int((c + 1) % NC))
            if rng.random() < 0.2:  # duplicate with lower score
                pm.append(_jitter(rng, m, 2))
                ps.append(q * 0.7)
                pc.append(int(c))
        for _ in range(int(rng.integers(0, 4))):  # false positives
            pm.append(_blob(rng))
            ps.append(float(rng.uniform(0.01, 0.7)))
            pc.append(int(rng.integers(0, NC)))
        if pm:
            dets.append(ImageDets(np.stack([_box(m) for m in pm]), np.array(ps), np.array(pc), np.stack(pm)))
        else:
            dets.append(ImageDets(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int), np.zeros((0, H, W), bool)))
    return truths, dets


def coco_eval(truths, dets) -> dict[str, float]:
    """box and mask mAP50 / mAP50-95 from pycocotools on the same data."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def rle(m):
        r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        r["counts"] = r["counts"].decode()
        return r

    def xywh(b):
        return [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]

    gt = {"images": [], "annotations": [], "categories": [{"id": c + 1, "name": str(c)} for c in range(NC)]}
    results = []
    aid = 1
    for i, (t, d) in enumerate(zip(truths, dets, strict=True)):
        gt["images"].append({"id": i + 1, "height": H, "width": W})
        for b, c, m in zip(t.boxes, t.cls, t.masks, strict=True):
            gt["annotations"].append({"id": aid, "image_id": i + 1, "category_id": int(c) + 1, "bbox": xywh(b),
                                      "area": float(m.sum()), "iscrowd": 0, "segmentation": rle(m)})
            aid += 1
        for b, s, c, m in zip(d.boxes, d.scores, d.cls, d.masks, strict=True):
            results.append({"image_id": i + 1, "category_id": int(c) + 1, "bbox": xywh(b), "score": float(s),
                            "segmentation": rle(m)})
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    out = {}
    for iou_type, kind in (("bbox", "box"), ("segm", "mask")):
        ev = COCOeval(coco, coco.loadRes(results), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        out[f"{kind}/mAP50-95"], out[f"{kind}/mAP50"] = float(ev.stats[0]), float(ev.stats[1])
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_map_agrees_with_cocoeval(seed):
    truths, dets = make_case(seed)
    ours, _ = map_metrics([score_image(d, t) for d, t in zip(dets, truths, strict=True)], truths)
    ref = coco_eval(truths, dets)
    for k, v in ref.items():
        assert 0.1 < v < 0.95, f"case should give a mid-range {k}, got {v}"  # a meaningful comparison
        assert abs(ours[k] - v) <= 0.01, f"{k}: ours {ours[k]:.4f} vs COCOeval {v:.4f}"


def test_map_and_fitness_agree_with_ultralytics_segment_metrics():
    """Same matched stats through Ultralytics' SegmentMetrics: same mAP, P, R and fitness."""
    from ultralytics.utils.metrics import SegmentMetrics

    truths, dets = make_case(3)
    scores = [score_image(d, t) for d, t in zip(dets, truths, strict=True)]
    ours, _ = map_metrics(scores, truths)
    sm = SegmentMetrics(names={i: str(i) for i in range(NC)})
    for i, (s, t) in enumerate(zip(scores, truths, strict=True)):
        sm.update_stats({"tp": s.tp_box, "tp_m": s.tp_mask, "conf": s.conf, "pred_cls": s.cls,
                         "target_cls": t.cls, "target_img": np.unique(t.cls), "im_name": f"im{i}"})
    sm.process()
    mp, mr, map50, map_ = sm.box.mean_results()
    assert ours["box/mAP50"] == pytest.approx(map50, abs=1e-9)
    assert ours["box/mAP50-95"] == pytest.approx(map_, abs=1e-9)
    assert ours["box/precision"] == pytest.approx(mp, abs=1e-9)
    assert ours["box/recall"] == pytest.approx(mr, abs=1e-9)
    assert ours["mask/mAP50-95"] == pytest.approx(sm.seg.map, abs=1e-9)
    assert ours["fitness"] == pytest.approx(sm.fitness, abs=1e-9)


def test_greedy_matching_prefers_best_unclaimed_and_respects_class():
    # two ground truths of class 0 and one of class 1; detections in descending score order
    gt_cls = np.array([0, 0, 1])
    pred_cls = np.array([0, 0, 1, 0])
    iou = np.array([[0.9, 0.8, 0.0, 0.6],   # gt0
                    [0.2, 0.55, 0.0, 0.0],  # gt1
                    [0.0, 0.0, 0.4, 0.0]])  # gt2 (class 1): best IoU 0.4 < 0.5
    tp = match_detections(pred_cls, gt_cls, iou)
    assert tp[0, 0] and tp[0, 8]  # det0 takes gt0 up to IoU 0.9
    assert tp[1, 0] and not tp[1, 2]  # det1: gt0 taken, gt1 at 0.55 -> TP at 0.50/0.55 only
    assert tp[1, 1] and not tp[1, 2]
    assert not tp[2].any()  # 0.4 is below every threshold
    assert not tp[3, 0]  # gt0 already claimed at 0.5; gt1 has IoU 0 with det3


def test_iou_helpers():
    a = np.array([[0, 0, 10, 10]], float)
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30]], float)
    np.testing.assert_allclose(box_iou_np(a, b), [[50 / 150, 0.0]], atol=1e-9)
    m1 = np.zeros((1, 4, 4), bool)
    m1[0, :2] = True
    m2 = np.zeros((1, 4, 4), bool)
    m2[0, 1:3] = True
    np.testing.assert_allclose(mask_iou_np(m1, m2), [[4 / 12]], atol=1e-6)
    assert len(IOU_THRESHOLDS) == 10


def test_filtering_after_nms_at_floor_equals_nms_at_threshold():
    """The sweep's shortcut: NMS at 0.001 then keep score > c == NMS run at c (greedy NMS)."""
    import torch
    from ultralytics.utils.nms import non_max_suppression

    g = torch.Generator().manual_seed(0)
    n, nc, nm = 60, 3, 4
    xy = torch.rand(n, 2, generator=g) * 60
    wh = torch.rand(n, 2, generator=g) * 25 + 5
    scores = torch.rand(n, nc, generator=g) * 0.9
    pred = torch.cat([xy, wh, scores, torch.randn(n, nm, generator=g)], 1).T[None]
    for iou in (0.45, 0.6):
        floor = non_max_suppression(pred.clone(), 0.001, iou, nc=nc, multi_label=False)[0]
        for c in (0.3, 0.5, 0.7):
            direct = non_max_suppression(pred.clone(), c, iou, nc=nc, multi_label=False)[0]
            kept = floor[floor[:, 4] > c]
            assert kept.shape == direct.shape
            torch.testing.assert_close(kept, direct)
