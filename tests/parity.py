"""Our ONNX predictor against Ultralytics' ``YOLO(onnx).predict``, as three checks that chance cannot decide.

Comparing the two end to end on a barely trained model, at a confidence 0.1 % under a real score, compared
two independent ONNX Runtime sessions at a threshold that near-tied scores straddle: the instance count,
the NMS survivors and masks whose logits are ~1e-4 flipped between runs. Each difference is now checked
where it can arise:

1. ``assert_same_raw_outputs``: both sides letterbox an image into the same input array, and the two
   sessions' raw tensors agree within ``RAW_ATOL`` (any model: nothing is thresholded).
2. ``assert_same_decoding``: one raw output, fed to our post-processing and to Ultralytics', gives the same
   instances (classes, scores, boxes within ``BOX_ATOL`` px) and masks that differ only at pixels whose
   logit is within ``LOGIT_EPS`` of 0 (float summation order), read from Ultralytics' own post-processing
   with a constant prototype added (``_bracket``).
3. ``assert_matches_ultralytics``: end to end, on a model that detects, at a confidence in the middle of
   the widest gap between candidate scores (``conf_in_widest_gap``). No candidate score is within
   ``GAP_MARGIN`` of it, a margin the two sessions' differences (``RAW_ATOL``) cannot cross, so both keep
   the same candidates; the rule is coarser (``E2E_MIN_IOU``) because 1 and 2 carry the precision.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

RAW_ATOL = 1e-4  # two ORT sessions on one file and one input: same kernels, at most float reordering
GAP_MARGIN = 0.01  # the chosen confidence is this far from every candidate score, 100x RAW_ATOL
GAP_RANGE = (0.05, 0.95)  # where the confidence may lie: above the noise floor, below saturation
BOX_ATOL = 1e-3  # px: the same float32 box through numpy and through torch
LOGIT_EPS = 1e-4  # mask pixels whose logit is closer than this to 0 may go either way
E2E_BOX_ATOL, E2E_MIN_IOU = 0.05, 0.95


def _image(p) -> np.ndarray:
    import cv2

    im = cv2.imread(str(p))
    assert im is not None, p
    return im


def with_odd_aspect_ratios(images: list[Path], folder: Path, sizes) -> list[Path]:
    """``images`` plus resized copies (``sizes``: (w, h) each, of images 0, 1, ...) written to ``folder``:
    the letterbox and the mask resampling see other aspect ratios than the square training size."""
    import cv2

    odd = []
    for i, (w, h) in enumerate(sizes):
        p = Path(folder) / f"odd{i}.png"
        cv2.imwrite(str(p), cv2.resize(_image(images[i % len(images)]), (w, h)))
        odd.append(p)
    return list(images) + odd


def candidate_scores(pred, paths) -> list[np.ndarray]:
    """Per image, the score of every candidate before NMS (best class per anchor; end-to-end: per row)."""
    out = []
    for p in paths:
        det, _ = pred.infer(pred.preprocess([_image(p)]))
        out.append(det[0][:, 4] if pred.end2end else det[0, 4:4 + len(pred.names)].max(0))
    return out


def conf_in_widest_gap(scores: list[np.ndarray], margin: float = GAP_MARGIN,
                       lo: float = GAP_RANGE[0], hi: float = GAP_RANGE[1]) -> float:
    """The middle of the widest gap between candidate scores (all images pooled) that lies in ``[lo, hi]``
    and below every image's top score, so that each image keeps an instance; every candidate score is then
    at least half the gap away from the returned confidence.

    Raises:
        AssertionError: no such gap of at least ``2 * margin``: the model does not separate detections from
            background on every image (a barely trained model), so no threshold is safe from run-to-run noise.
    """
    weakest_top = min(float(np.max(x)) for x in scores)
    s = np.unique(np.concatenate([np.asarray(x, np.float64).ravel() for x in scores]))
    mids, halves = (s[1:] + s[:-1]) / 2, (s[1:] - s[:-1]) / 2
    ok = (mids >= lo) & (mids <= hi) & (s[1:] <= weakest_top)
    assert ok.any(), (f"no candidate scores in [{lo}, {hi}] below the weakest image's top score "
                      f"{weakest_top:.4f}: the model does not detect on every image")
    k = int(np.argmax(np.where(ok, halves, -1.0)))
    assert halves[k] >= margin, (f"the widest score gap in [{lo}, {hi}] below {weakest_top:.4f} is "
                                 f"{2 * halves[k]:.4f} wide (needs {2 * margin}): the model does not separate "
                                 "detections from background")
    return float(mids[k])


def ultralytics_predictor(onnx, first_image, conf: float, iou: float, imgsz: int, rect: bool):
    """``YOLO(onnx)``'s predictor, set up by one ``predict`` call with these arguments (retina masks)."""
    from ultralytics import YOLO

    ul = YOLO(str(onnx), task="segment")
    ul.predict(str(first_image), conf=conf, iou=iou, imgsz=imgsz, retina_masks=True, rect=rect, verbose=False)
    return ul, ul.predictor


def assert_same_raw_outputs(onnx, paths, atol: float = RAW_ATOL) -> float:
    """Check 1: the same letterboxed input on both sides, raw tensors within ``atol``; returns the largest
    difference seen."""
    import torch

    from damage.tasks.serving.predictor import Predictor

    pred = Predictor(onnx, backend="onnxruntime")
    _, ulp = ultralytics_predictor(onnx, paths[0], 0.25, pred.iou, pred.imgsz[0], pred.rect)
    worst = 0.0
    for p in paths:
        im = _image(p)
        x = pred.preprocess([im])
        t = ulp.preprocess([im])
        assert np.array_equal(t.numpy(), x), f"{Path(p).name}: the letterboxed inputs differ"
        ours = pred.infer(x)
        with torch.no_grad():
            theirs = ulp.model(t)
        assert len(theirs) == len(ours) == 2
        for a, b, what in zip(ours, theirs, ("detections", "prototypes"), strict=True):
            b = b.numpy()
            assert a.shape == b.shape, (p, what, a.shape, b.shape)
            d = float(np.abs(a - b).max())
            assert d <= atol, f"{Path(p).name}: {what} of the two sessions differ by {d:.2e} > {atol}"
            worst = max(worst, d)
    return worst


def _with_constant_prototype(det: np.ndarray, proto: np.ndarray, coef: float, end2end: bool):
    """The raw output with one more prototype, constant 1, whose coefficient is ``coef`` for every
    candidate: every mask logit moves by exactly ``coef`` (bilinear weights sum to 1), nothing else does."""
    ones = np.ones_like(proto[:, :1])
    if end2end:  # (N, k, 6 + nm) rows
        col = np.full(det.shape[:2] + (1,), coef, det.dtype)
        return np.concatenate([det, col], 2), np.concatenate([proto, ones], 1)
    row = np.full((det.shape[0], 1, det.shape[2]), coef, det.dtype)  # (N, 4 + nc + nm, anchors)
    return np.concatenate([det, row], 1), np.concatenate([proto, ones], 1)


def _ul_decode(ulp, det: np.ndarray, proto: np.ndarray, t, im: np.ndarray, path) -> list[tuple]:
    """Ultralytics' post-processing of one raw output: (class, score, box, full-size mask) per instance."""
    import torch

    ulp.batch = ([str(path)], [im], [""])
    res = ulp.postprocess([torch.from_numpy(det.copy()), torch.from_numpy(proto.copy())], t, [im])[0]
    if res.boxes is None or not len(res.boxes):
        return []
    return list(zip(res.boxes.cls.numpy().astype(int).tolist(), res.boxes.conf.numpy().tolist(),
                    res.boxes.xyxy.numpy(), res.masks.data.numpy().astype(bool), strict=True))


def _crop_edges_agree(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per box edge: both boxes keep the same pixel rows/columns (``ceil`` of the edge), or the edge sits
    within ``BOX_ATOL`` of a whole pixel, where float rounding may move it by one."""
    near = np.abs(b - np.round(b)) <= BOX_ATOL
    return (np.ceil(a) == np.ceil(b)) | near


def assert_same_decoding(onnx, paths, conf: float) -> int:
    """Check 2: per image, our ``Predictor.postprocess`` and Ultralytics' on one raw output. Returns the
    number of instances compared."""
    from damage.tasks.serving.predictor import Predictor

    pred = Predictor(onnx, backend="onnxruntime")
    _, ulp = ultralytics_predictor(onnx, paths[0], conf, pred.iou, pred.imgsz[0], pred.rect)
    n = 0
    for p in paths:
        im = _image(p)
        x = pred.preprocess([im])
        t = ulp.preprocess([im])
        det, proto = pred.infer(x)
        ours = pred.postprocess(det[0], proto[0], im.shape[:2], x.shape[2:], conf=conf)
        theirs = _ul_decode(ulp, det, proto, t, im, p)
        # the same decoding with every logit moved by -eps / +eps: pixels sure to be in / possibly in
        sure = _ul_decode(ulp, *_with_constant_prototype(det, proto, -LOGIT_EPS, pred.end2end), t, im, p)
        maybe = _ul_decode(ulp, *_with_constant_prototype(det, proto, LOGIT_EPS, pred.end2end), t, im, p)
        name = Path(p).name
        assert len(ours.instances) == len(theirs), (name, len(ours.instances), len(theirs))
        free = list(range(len(theirs)))
        for inst in ours.instances:
            box = np.asarray(inst.box, np.float64)
            # same class and score (one float32 array on both sides), the nearest box; order-free: NMS
            # implementations may rank exactly tied scores either way
            cands = [j for j in free if theirs[j][0] == inst.cls and abs(theirs[j][1] - inst.score) <= 1e-6]
            assert cands, (name, inst.cls, inst.score, "no instance of Ultralytics' with this class and score")
            j = min(cands, key=lambda j: float(np.abs(theirs[j][2] - box).max()))
            free.remove(j)
            tb = theirs[j][2]
            np.testing.assert_allclose(box, tb, atol=BOX_ATOL, err_msg=name)
            edges = _crop_edges_agree(box, tb)
            mask = np.asarray(inst.mask)
            lo = next((m for _, _, b, m in sure if np.array_equal(b, tb)), np.zeros_like(mask))
            hi = next(m for _, _, b, m in maybe if np.array_equal(b, tb))
            off = (lo & ~mask) | (mask & ~hi)  # pixels decided otherwise than a logit outside +-eps says
            if not edges.all():  # an edge on a whole pixel: its one row/column may differ
                x1, y1, x2, y2 = (int(np.ceil(v)) for v in tb)
                for k, (a, b) in enumerate(((x1 - 1, x1 + 1), (y1 - 1, y1 + 1), (x2 - 1, x2 + 1), (y2 - 1, y2 + 1))):
                    if not edges[k]:
                        sl = (slice(None), slice(max(a, 0), b)) if k % 2 == 0 else (slice(max(a, 0), b), slice(None))
                        off[sl] = False
            assert not off.any(), (name, inst.cls, int(off.sum()), "mask pixels differ beyond +-LOGIT_EPS")
            assert inst.area_px == int(mask.sum())
            n += 1
    return n


def assert_matches_ultralytics(onnx, paths, conf: float | None = None, backend: str = "onnxruntime") -> int:
    """Check 3: ``Predictor.predict`` on ``backend`` vs ``YOLO(onnx).predict`` (ONNX Runtime) at the model's
    size, at ``conf`` (default ``conf_in_widest_gap`` of the model's candidate scores): the same instances
    (count; each of ours pairs with a reference instance of its class whose box is within ``E2E_BOX_ATOL``
    px, order-free: NMS may rank tied scores either way), mask IoU >= ``E2E_MIN_IOU``, ours in descending
    score order. Returns the number of instances matched."""
    from damage.tasks.serving.predictor import Predictor

    pred = Predictor(onnx, backend=backend)
    assert pred.backend == backend
    if conf is None:
        conf = conf_in_widest_gap(candidate_scores(pred, paths))
    pred.conf = conf
    ul, _ = ultralytics_predictor(onnx, paths[0], conf, pred.iou, pred.imgsz[0], pred.rect)
    matched = 0
    for p in paths:
        name = Path(p).name
        ours = pred.predict(p)[0]
        # end-to-end graphs are fed the full square (their TopK size is fixed): pred.rect is False for them
        ref = ul.predict(str(p), conf=conf, iou=pred.iou, imgsz=pred.imgsz[0], retina_masks=True, verbose=False,
                         rect=pred.rect)[0]
        n_ref = 0 if ref.boxes is None else len(ref.boxes)
        assert len(ours.instances) == n_ref, (name, len(ours.instances), n_ref)
        scores = [i.score for i in ours.instances]
        assert scores == sorted(scores, reverse=True), (name, scores)
        if not n_ref:
            continue
        rb, rc = ref.boxes.xyxy.numpy(), ref.boxes.cls.numpy().astype(int)
        rm = ref.masks.data.numpy().astype(bool)
        assert rm.shape[1:] == (ours.height, ours.width)
        free = list(range(n_ref))
        for k, inst in enumerate(ours.instances):
            box = np.asarray(inst.box, dtype=float)
            cands = [r for r in free if rc[r] == inst.cls and np.abs(rb[r] - box).max() <= E2E_BOX_ATOL]
            assert cands, (name, k, "no reference instance of the same class and box")
            r = min(cands, key=lambda r: float(np.abs(rb[r] - box).max()))
            free.remove(r)
            mask = np.asarray(inst.mask)
            union = (mask | rm[r]).sum()
            iou = (mask & rm[r]).sum() / union if union else 1.0
            assert iou >= E2E_MIN_IOU, (name, k, iou)
            assert inst.area_px == int(mask.sum())
            matched += 1
    return matched
