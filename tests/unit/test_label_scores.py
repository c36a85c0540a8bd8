"""Label-issue scores on hand-made evidence: calibration per class, the tie rule, the CSV columns."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from damage.tasks.evaluation import label_scores
from damage.tasks.evaluation.label_rows import CSV_COLUMNS, write_issues_csv
from damage.tasks.evaluation.label_scores import (
    Calibration,
    fit_robust,
    image_evidence,
    rank_key,
    score_annotations,
    score_candidates,
)

S = 32


def _sq(x: int, y: int, s: int = 6) -> np.ndarray:
    m = np.zeros((S, S), np.float32)
    m[y:y + s, x:x + s] = 1
    return m


def _image(labels: list[tuple[int, np.ndarray]], preds: list[tuple[int, float, np.ndarray]], nc: int = 3,
           dense: list[float] | None = None):
    lc = np.array([c for c, _ in labels], int)
    lm = np.stack([m for _, m in labels]) if labels else np.zeros((0, S, S), np.float32)
    pc = np.array([c for c, _, _ in preds], int)
    pf = np.array([q for _, q, _ in preds], float)
    pm = np.stack([m for _, _, m in preds]) if preds else np.zeros((0, S, S), np.float32)
    return image_evidence(lc, lm, pc, pf, pm, nc, None if dense is None else np.array(dense))


def _held_out(n: int = 40):
    """Class 0: the model always finds it (conf 0.9, exact mask). Class 1: the model never does.
    Class 2: found at conf 0.6. A little background noise of every class."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        x0, y0, x1, y1, x2, y2 = rng.integers(0, S - 7, 6)
        a, b, c = _sq(x0, 0), _sq(x1, 12), _sq(x2, 24)
        preds = [(0, float(rng.uniform(0.8, 0.95)), a), (2, float(rng.uniform(0.5, 0.7)), c)]
        preds.append((int(rng.integers(0, 3)), float(rng.uniform(0.001, 0.05)), _sq(*rng.integers(0, S - 5, 2), 4)))
        out.append(_image([(0, a), (1, b), (2, c)], preds))
    return out


@pytest.fixture(scope="module")
def cal() -> Calibration:
    return Calibration.fit(_held_out(), nc=3, prior=0.05)


def test_unsupported_label_of_an_always_missed_class_scores_below_one_of_an_always_found_class(cal):
    ev = _image([(0, _sq(3, 3)), (1, _sq(20, 20))], [])
    rows = {r["annotation"]: r for r in score_annotations(ev, cal, prior=0.05)}
    assert rows[0]["kind"] == rows[1]["kind"] == "spurious_label"
    # class 0 is always found: no support at all is strong evidence; class 1 is never found: weak
    assert rows[1]["score"] < rows[0]["score"] / 3, (rows[0]["score"], rows[1]["score"])
    assert rows[0]["score"] > 0.3 and rows[1]["score"] < 0.1


def test_a_found_label_is_not_flagged_and_a_swapped_one_is_wrong_class(cal):
    m = _sq(5, 5)
    ok = score_annotations(_image([(0, m)], [(0, 0.9, m)]), cal, 0.05)[0]
    assert ok["score"] < 0.05
    swapped = score_annotations(_image([(2, m)], [(0, 0.9, m)]), cal, 0.05)[0]
    assert swapped["kind"] == "wrong_class" and swapped["score"] > 0.5


def test_a_box_over_an_object_labelled_already_is_spurious_not_a_relabel_or_an_outline_of_it(cal):
    """A prediction that another annotation matches better (IoU >= match_iou) is that annotation's: a box drawn over
    an object that has its own label (of another class, or half over one of the box's class) is a spurious label,
    not that object with a wrong class or a bad outline. Without the object's own label, the same boxes are those
    (the half box cites the prediction as its outline)."""
    obj, over, half = _sq(5, 5, 8), _sq(7, 7, 6), _sq(9, 9, 6)  # IoU with obj: 0.56, 0.19
    pred = [(0, 0.9, obj)]
    dup = score_annotations(_image([(0, obj), (2, over)], pred), cal, 0.05)
    assert dup[0]["score"] < 0.05 and dup[1]["kind"] == "spurious_label", dup
    assert score_annotations(_image([(2, over)], pred), cal, 0.05)[0]["kind"] == "wrong_class"
    beside = score_annotations(_image([(0, obj), (0, half)], pred), cal, 0.05)
    assert beside[0]["score"] < 0.05 and beside[1]["kind"] == "spurious_label", beside
    # alone, the half box is an outline of the predicted object (its bad-outline evidence cites the prediction)
    assert _image([(0, half)], pred).best_pred.tolist() == [0]
    assert _image([(0, obj), (0, half)], pred).best_pred.tolist() == [0, -1]


def test_no_ties_unless_the_same_case(cal):
    """Unsupported labels of one class are ordered by the anchors' raw scores inside them (continuous
    evidence below any floor), not by the image names; identical evidence is the same case."""
    rows = []
    for name, dense in (("a.png", 0.004), ("b.png", 0.0011), ("c.png", 0.004)):
        ev = _image([(0, _sq(3, 3))], [], dense=[[dense, 1e-4, 1e-4]])
        for r in score_annotations(ev, cal, 0.05):
            rows.append({**r, "image": name})
    rows.sort(key=rank_key)
    assert rows[0]["image"] == "b.png"  # less class-0 evidence: more suspicious, although "b" > "a"
    keys = [rank_key(r)[:4] for r in rows]
    assert keys[0] != keys[1]  # different evidence: no tie
    assert keys[1] == keys[2]  # identical evidence (a.png and c.png): the same case, tied
    # the order of distinct rows does not depend on the names
    renamed = sorted(({**r, "image": {"a.png": "z.png", "b.png": "y.png", "c.png": "x.png"}[r["image"]]}
                      for r in rows), key=rank_key)
    assert renamed[0]["image"] == "y.png"


def test_every_evidence_level_ranks_apart(cal):
    """Where the calibrated densities are flat (the histogram ratio plateaus), the kind's own evidence
    still orders the rows: no two evidence levels share a rank key."""
    keys = []
    for q in np.linspace(0.01, 0.9, 25):
        ev = _image([(0, _sq(3, 3))], [(0, float(q), _sq(3, 3))])
        keys.append(rank_key({**score_annotations(ev, cal, 0.05)[0], "image": "a.png"})[:4])
    assert len(set(keys)) == len(keys)


def test_a_prediction_over_another_label_is_a_less_likely_missing_label_than_one_on_open_ground():
    """Calibration: correct labels sit apart (best IoU with each other 0) while confident unexplained predictions
    mostly lie half over another class's label (a confusion). At equal confidence, a candidate on open ground
    outranks one lying over a label."""
    rng = np.random.default_rng(1)
    held = []
    for k in range(40):
        x0, x1 = (int(v) for v in rng.integers(0, S - 10, 2))
        a, b = _sq(x0, 0), _sq(x1, 12)
        preds = [(0, 0.9, a), (1, 0.9, b), (2, 0.6, _sq(x0 + 3, 0))]  # class 2 half over the class-0 label
        if k % 4 == 0:  # now and then one on open ground
            preds.append((2, 0.6, _sq(int(rng.integers(0, S - 7)), 24)))
        held.append(_image([(0, a), (1, b)], preds))
    cal = Calibration.fit(held, nc=3, prior=0.05)
    a, b = _sq(2, 0), _sq(20, 12)
    ev = _image([(0, a), (1, b)], [(0, 0.9, a), (1, 0.9, b), (2, 0.6, _sq(5, 0)), (2, 0.6, _sq(10, 24))])
    over, apart = sorted(score_candidates(ev, cal), key=lambda r: -r["_why"]["iou"])
    assert over["_why"]["iou"] > 0.3 and apart["_why"]["iou"] == 0
    assert over["strength"] == apart["strength"]  # the same confidence: only the overlap differs
    assert apart["log_odds"] > over["log_odds"] + 1, (apart["log_odds"], over["log_odds"])


def test_an_unsupported_small_label_says_less_where_the_model_misses_small_ones(monkeypatch):
    """Class 0: the model finds every large one (10 px) and misses every small one (3 px); class-1 labels (no class 0
    near them) are the null. An unsupported large class-0 label is strong evidence of a spurious label, an
    unsupported small one weak: the presence densities are conditioned on the label's width. Without (an
    unbounded kernel) they would tie."""
    rng = np.random.default_rng(2)
    held = []
    for _ in range(40):
        xb, xs, x1 = (int(v) for v in rng.integers(0, S - 10, 3))
        big, small, other = _sq(xb, 0, 10), _sq(xs, 13, 3), _sq(x1, 20, int(rng.choice([3, 10])))
        held.append(_image([(0, big), (0, small), (1, other)], [(0, 0.9, big), (1, 0.9, other)]))
    ev = _image([(0, _sq(2, 2, 10)), (0, _sq(20, 20, 3))], [])
    big, small = score_annotations(ev, Calibration.fit(held, nc=3, prior=0.05), 0.05)
    assert big["kind"] == small["kind"] == "spurious_label"
    assert big["log_odds"] > small["log_odds"] + 2, (big["log_odds"], small["log_odds"])
    monkeypatch.setattr(label_scores, "WIDTH_KERNEL", 1e9)
    big1, small1 = score_annotations(ev, Calibration.fit(held, nc=3, prior=0.05), 0.05)
    assert abs(big1["log_odds"] - small1["log_odds"]) < 0.1  # not conditioned: the width is no evidence


def _outlines(shifted_every: int, n: int = 40) -> tuple[list, list[np.ndarray]]:
    """Class 0 found at conf 0.9; its labels match the mask exactly or within a pixel, except every
    ``shifted_every``-th, moved by (3, 3) px (IoU 0.24). Returns the evidence and which labels are shifted."""
    held, bad = [], []
    for k in range(n):
        x = 2 + k % 20
        obj = _sq(x, 4, 8)
        shifted = k % shifted_every == 0
        lab = _sq(x + 3, 7, 8) if shifted else _sq(x + k % 2, 4, 8)
        held.append(_image([(0, lab)], [(0, 0.9, obj)]))
        bad.append(np.array([shifted]))
    return held, bad


def test_bad_outlines_among_the_held_out_labels_do_not_make_a_low_iou_look_normal():
    """A tenth of class 0's held-out labels are shifted off the model's confident mask. A label shifted the same way
    still scores as a likely bad outline (likelihood ratio above 3): the IoU density of correct labels is fitted
    unimodal, so the errors' own bump at low IoU is not taken for the class's normal."""
    held, _ = _outlines(shifted_every=10)
    ev = _image([(0, _sq(8, 7, 8))], [(0, 0.9, _sq(5, 4, 8))])
    row = score_annotations(ev, Calibration.fit(held, nc=3, prior=0.05), 0.05)[0]
    assert row["kind"] == "bad_outline" and 0.2 < row["_why"]["iou"] < 0.3
    assert row["_why"]["lr"] > 3, row["_why"]


def test_a_mask_inside_its_label_is_an_under_segmenting_model_not_a_bad_outline():
    """The model under-segments class 0: its confident mask (6 px) lies inside each correct label (10 px) or pokes
    out of it by up to a third (IoU 0.21-0.36, share of the mask inside 0.67-1; correct at a match IoU of 0.2). A
    label the mask fills from inside scores far below one that leaves half the mask outside at about the same IoU
    (0.33): the share of the prediction inside the label tells the two apart, the IoU alone cannot."""

    def image(label: np.ndarray, pred: np.ndarray):
        return image_evidence(np.array([0]), label[None], np.array([0]), np.array([0.9]), pred[None], 3,
                              match_iou=0.2)

    held = [image(_sq(1 + k % 15, 4, 10), _sq(1 + k % 15 + k % 7, 6 + k % 3, 6)) for k in range(60)]
    cal = Calibration.fit(held, nc=3, prior=0.05)
    inside = score_annotations(image(_sq(4, 4, 10), _sq(6, 6, 6)), cal, 0.05)[0]
    half_out = score_annotations(image(_sq(4, 20, 6), _sq(7, 20, 6)), cal, 0.05)[0]
    assert inside["kind"] == half_out["kind"] == "bad_outline"
    assert abs(inside["_why"]["iou"] - half_out["_why"]["iou"]) < 0.05
    assert half_out["log_odds"] > inside["log_odds"] + 1, (half_out["_why"], inside["_why"])


def test_weights_remove_annotations_from_the_densities_and_the_robust_fit_discounts_likely_errors():
    held, bad = _outlines(shifted_every=5)
    weighted = Calibration.fit(held, nc=3, prior=0.05, label_weight=[(~b).astype(float) for b in bad])
    clean = Calibration.fit([e for e, b in zip(held, bad, strict=True) if not b[0]], nc=3, prior=0.05)
    for w, c in zip(weighted.iou_self, clean.iou_self, strict=True):
        assert np.allclose(w.pdf_table, c.pdf_table)  # weight 0 is the same as absent
    ev = _image([(0, _sq(8, 7, 8))], [(0, 0.9, _sq(5, 4, 8))])
    plain = score_annotations(ev, Calibration.fit(held, nc=3, prior=0.05), 0.05)[0]
    robust = score_annotations(ev, fit_robust(held, nc=3, prior=0.05, rounds=1), 0.05)[0]
    assert plain["kind"] == robust["kind"] == "bad_outline"
    assert robust["log_odds"] > plain["log_odds"]  # the shifted held-out labels weigh less as "correct"


def test_csv_columns_and_geometry_round_trip(tmp_path):
    rows = [
        {"rank": 1, "image": "images/val/a.png", "split": "val", "annotation": -1, "kind": "missing_label",
         "score": 0.91, "label_class": "", "pred_class": "dent", "conf": 0.8, "iou": 0.0, "in_sample": False,
         "fold": "", "evidence": "x", "ann_box": "", "ann_polygon": "", "pred_box": [1.0, 2.0, 11.5, 12.0],
         "pred_polygon": [[1.0, 2.0], [11.5, 2.0], [11.5, 12.0]]},
        {"rank": 2, "image": "images/val/b.png", "split": "val", "annotation": 0, "kind": "spurious_label",
         "score": 0.7, "label_class": "scratch", "pred_class": "", "conf": 0.0, "iou": 0.0, "in_sample": True,
         "fold": "", "evidence": "y", "ann_box": [0.0, 0.0, 4.0, 4.0],
         "ann_polygon": [[0.0, 0.0], [4.0, 0.0], [4.0, 4.0], [0.0, 4.0]], "pred_box": "", "pred_polygon": ""},
    ]
    path = write_issues_csv(rows, tmp_path / "li.csv")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        back = list(reader)
    assert tuple(reader.fieldnames) == CSV_COLUMNS
    assert {"ann_box", "ann_polygon", "pred_box", "pred_polygon"} <= set(CSV_COLUMNS)
    assert json.loads(back[0]["pred_box"]) == [1.0, 2.0, 11.5, 12.0]
    assert json.loads(back[0]["pred_polygon"])[1] == [11.5, 2.0]
    assert back[0]["ann_box"] == "" and back[0]["ann_polygon"] == ""  # a missing label has no annotation
    assert json.loads(back[1]["ann_polygon"]) == [[0.0, 0.0], [4.0, 0.0], [4.0, 4.0], [0.0, 4.0]]
    assert back[1]["pred_box"] == "" and back[1]["in_sample"] == "True"
