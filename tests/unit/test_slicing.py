"""Sliced inference (tasks/serving/slicing.py) without a model: tile geometry, the merge across tiles, and the
damage percentage on hand-made whole-vehicle masks, through ``predict_sliced`` with a stand-in predictor that
segments perfectly what each pass sees (a tile at full resolution, the whole image downscaled to the input)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from damage.tasks.core.errors import DamageError
from damage.tasks.serving.damage_percent import BoxMask, damage_report
from damage.tasks.serving.predictor import Instance, Prediction
from damage.tasks.serving.slicing import (
    Piece,
    SliceSpec,
    merge_pieces,
    parse_slices,
    predict_sliced,
    tile_starts,
    tile_windows,
)

NAMES = ["vehicle", "dent", "scratch"]


@pytest.mark.parametrize(("h", "w", "tile", "overlap"), [
    (640, 640, 160, 0.2), (1000, 3000, 640, 0.25), (161, 900, 160, 0.5), (480, 641, 96, 0.1), (100, 100, 160, 0.2)])
def test_tiles_cover_the_image_with_the_overlap(h, w, tile, overlap):
    wins = tile_windows(h, w, (tile, tile), overlap)
    cover = np.zeros((h, w), np.int32)
    th, tw = min(tile, h), min(tile, w)
    for x0, y0, x1, y1 in wins:
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert (y1 - y0, x1 - x0) == (th, tw)  # every tile has the model's scale: none is cut short
        cover[y0:y1, x0:x1] += 1
    assert cover.min() >= 1  # every pixel is seen
    for length, t in ((h, th), (w, tw)):
        starts = tile_starts(length, t, overlap)
        assert starts[0] == 0 and starts[-1] + t == length
        # neighbours share at least `overlap` of a tile (the last one is moved back: it shares more)
        assert all(t - (b - a) >= overlap * t - 1 for a, b in zip(starts, starts[1:], strict=False))
        assert all(b > a for a, b in zip(starts, starts[1:], strict=False))


def test_parse_slices_values_and_errors():
    assert parse_slices("off") == parse_slices(None) == parse_slices(False) == SliceSpec("off")
    assert parse_slices("auto").mode == "auto"
    s = parse_slices({"size": 320, "overlap": 0.25})
    assert (s.mode, s.size, s.overlap) == ("fixed", 320, 0.25) and s.to_value() == {"size": 320, "overlap": 0.25}
    assert s.active(321, 100, (160, 160)) and not s.active(320, 320, (160, 160))
    auto = parse_slices("auto")
    assert not auto.active(240, 240, (160, 160)) and auto.active(241, 100, (160, 160))
    assert not SliceSpec("off").active(10_000, 10_000, (160, 160))
    for bad in ("on", {"size": 16}, {"size": 320, "overlap": 0.9}, {"size": 320, "stride": 3}, 5):
        with pytest.raises(DamageError, match="slices"):
            parse_slices(bad)


def _piece(mask: np.ndarray, cls: int, win, score=0.9, whole=False) -> Piece:
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    bm = BoxMask(mask[y0:y1, x0:x1], x0, y0, mask.shape)
    return Piece(cls, NAMES[cls], score, [float(x0), float(y0), float(x1), float(y1)], bm, tuple(win), whole)


def _seen(mask: np.ndarray, win) -> np.ndarray:
    x0, y0, x1, y1 = win
    out = np.zeros_like(mask)
    out[y0:y1, x0:x1] = mask[y0:y1, x0:x1]
    return out


def test_a_mask_cut_by_a_tile_border_merges_into_one_instance():
    h = w = 320
    wins = tile_windows(h, w, (160, 160), 0.2)  # starts 0, 128, 160
    dent = np.zeros((h, w), np.uint8)
    cv2.ellipse(dent, (150, 60), (40, 18), 20, 0, 360, 1, -1)  # crosses x=128 and x=160
    dent = dent.astype(bool)
    other = np.zeros((h, w), bool)
    other[250:270, 20:50] = True  # a second dent far away: must stay its own instance
    pieces = [_piece(_seen(m, win), 1, win, score=0.5 + 0.01 * k)
              for k, win in enumerate(wins) for m in (dent, other) if _seen(m, win).any()]
    assert sum(p.mask.crop.any() and p.mask.count() != dent.sum() for p in pieces) >= 2  # some pieces are cut
    merged = merge_pieces(pieces, (160, 160))
    assert len(merged) == 2
    big = max(merged, key=lambda p: p.mask.count())
    assert abs(big.mask.count() - dent.sum()) <= 0.02 * dent.sum()
    assert (np.asarray(big.mask) == dent).all()  # exactly the uncut mask
    assert big.score == max(p.score for p in pieces if p.mask.count() and (np.asarray(p.mask) & dent).any())


def test_neighbouring_objects_of_one_class_stay_apart_and_whole_pass_fills_gaps():
    h = w = 320
    wins = tile_windows(h, w, (160, 160), 0.2)
    a = np.zeros((h, w), bool)
    a[40:80, 130:150] = True  # inside the strip both tile columns see
    b = np.zeros((h, w), bool)
    b[40:80, 152:158] = True  # right next to it, same class, no pixel in common
    pieces = [_piece(_seen(m, win), 1, win) for win in wins for m in (a, b) if _seen(m, win).any()]
    lost = np.zeros((h, w), bool)
    lost[200:230, 200:240] = True  # only the whole pass found this one
    pieces += [_piece(a, 1, (0, 0, w, h), whole=True), _piece(lost, 1, (0, 0, w, h), 0.3, whole=True)]
    merged = merge_pieces(pieces, (160, 160))
    counts = sorted(p.mask.count() for p in merged)
    assert counts == sorted([int(a.sum()), int(b.sum()), int(lost.sum())])  # the whole-pass copy of `a` is dropped


class PerfectSegmenter:
    """Stands in for ``Predictor`` in ``predict_sliced``: segments exactly the labels a pass sees.

    The image is a label map (channel 0: vehicle instance ids, channel 1: damage instance ids, 0 =
    nothing), so damage lies on its vehicle as in a photo; tiles are seen at full
    resolution, the whole image through a nearest-neighbour downscale to ``imgsz`` and back (what a
    letterboxed pass can resolve). ``tile_classes`` limits which classes the tiles find.
    """

    instance_type = Instance
    vehicle_class = "vehicle"
    max_det = 300
    dynamic_batch = True

    def __init__(self, classes: dict[int, int], imgsz: int = 160, tile_classes=(0, 1, 2)):
        self.classes, self.imgsz, self.tile_classes = classes, (imgsz, imgsz), set(tile_classes)
        self.runs, self.timings, self._seen = [], {}, []

    def preprocess(self, crops):
        self._seen = list(crops)
        return np.zeros((len(crops), 3, *self.imgsz), np.float32)

    def infer(self, batch):
        self.runs.append(len(batch))
        idx = np.arange(len(batch))
        return idx, idx

    def postprocess(self, det, proto, shape, input_hw, conf=None, iou=None):
        seen = self._seen[int(det)]
        whole = int(det) == len(self._seen) - 1 and max(seen.shape[:2]) > self.imgsz[0]
        if whole:
            small = cv2.resize(seen, self.imgsz[::-1], interpolation=cv2.INTER_NEAREST)
            seen = cv2.resize(small, seen.shape[1::-1], interpolation=cv2.INTER_NEAREST)
        insts = []
        for ch, iid in sorted((c, i) for c in (0, 1) for i in set(np.unique(seen[..., c]).tolist()) - {0}):
            cls = self.classes[iid]
            if not whole and cls not in self.tile_classes:
                continue
            m = seen[..., ch] == iid
            ys, xs = np.nonzero(m)
            x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
            insts.append(Instance(len(insts), cls, NAMES[cls], 0.9 - 0.1 * cls, [x0, y0, x1, y1],
                                  BoxMask(m[y0:y1, x0:x1], x0, y0, m.shape), int(m.sum())))
        return Prediction(shape[1], shape[0], insts, damage_report([], []))


def _scene() -> tuple[np.ndarray, dict[int, int], dict[int, np.ndarray]]:
    """A 640-px whole-vehicle label map: vehicle 480x260, a dent across a tile border, a long scratch."""
    lab = np.zeros((640, 640, 3), np.uint8)
    lab[200:460, 80:560, 0] = 1  # vehicle: 124800 px (edges on multiples of 4: exact through the downscale)
    lab[300:330, 140:180, 1] = 2  # dent 40x30 = 1200 px across the border x=160 of tile 0
    lab[400:406, 200:400, 1] = 3  # scratch 200x6 = 1200 px: longer than a tile, across three tiles
    masks = {1: lab[..., 0] == 1, 2: lab[..., 1] == 2, 3: lab[..., 1] == 3}
    return lab, {1: 0, 2: 1, 3: 2}, masks


@pytest.mark.parametrize("tile_classes", [(0, 1, 2), (1, 2)], ids=["tiles-see-vehicle", "vehicle-only-whole"])
def test_whole_vehicle_damage_percent_known_answer(tile_classes):
    lab, classes, masks = _scene()
    seg = PerfectSegmenter(classes, 160, tile_classes)
    pred = predict_sliced(seg, lab, SliceSpec("auto"))
    n_tiles = len(tile_windows(640, 640, (160, 160), 0.2))
    assert seg.runs == [8] * (n_tiles // 8) + ([n_tiles % 8 + 1] if (n_tiles + 1) % 8 else [8])  # batched
    assert sum(seg.runs) == n_tiles + 1  # every tile and the whole image, each once
    by = {i.name: i for i in pred.instances}
    assert sorted(by) == ["dent", "scratch", "vehicle"] and len(pred.instances) == 3  # no duplicate
    for iid, cls in classes.items():
        inst = by[NAMES[cls]]
        assert abs(inst.area_px - masks[iid].sum()) <= 0.02 * masks[iid].sum()
        assert inst.area_px == inst.mask.count()
    assert (np.asarray(by["dent"].mask) == masks[2]).all() and (np.asarray(by["scratch"].mask) == masks[3]).all()
    veh = by["vehicle"].id
    assert by["dent"].vehicle_id == veh and by["scratch"].vehicle_id == veh
    assert pred.damage.damage_percent == pytest.approx(100 * 2400 / 124800, abs=1e-6)  # 1.923 %
    [v] = pred.damage.vehicles
    assert v["by_class"] == pytest.approx({"dent": 100 * 1200 / 124800, "scratch": 100 * 1200 / 124800})
    assert (pred.width, pred.height) == (640, 640)


def test_unbatched_graph_gets_one_input_per_run():
    lab, classes, _ = _scene()
    seg = PerfectSegmenter(classes, 160)
    seg.dynamic_batch = False
    pred = predict_sliced(seg, lab, SliceSpec("fixed", 320, 0.2))
    assert set(seg.runs) == {1} and len(seg.runs) == len(tile_windows(640, 640, (320, 320), 0.2)) + 1
    assert len(pred.instances) == 3


def test_tile_pieces_do_not_chain_into_an_instance_the_whole_pass_did_not_see():
    """A close-up model sees "vehicle" over most of every tile of a whole scene: joined, the pieces would
    make one vehicle over the whole photo. Larger than a tile, a group needs the whole pass's word for it."""
    h = w = 480
    wins = tile_windows(h, w, (160, 160), 0.2)
    pieces = []
    for win in wins:
        m = np.zeros((h, w), bool)
        x0, y0, x1, y1 = win
        m[y0 + 2:y1 - 2, x0 + 2:x1 - 2] = True  # most of the tile; neighbours agree where they overlap
        pieces.append(_piece(m, 0, win, score=0.8))
    car = np.zeros((h, w), bool)
    car[300:400, 40:260] = True  # the one vehicle the whole pass found
    pieces.append(_piece(car, 0, (0, 0, w, h), 0.7, whole=True))
    merged = merge_pieces(pieces, (160, 160))
    assert not any(p.mask.count() > 2 * car.sum() for p in merged)  # no photo-sized "vehicle"
    assert any((np.asarray(p.mask) == car).all() for p in merged)
