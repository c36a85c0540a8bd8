"""Label-issue scores on hand-made evidence: calibration per class, the tie rule, the CSV columns."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from damage.tasks.evaluation.label_rows import CSV_COLUMNS, write_issues_csv
from damage.tasks.evaluation.label_scores import Calibration, image_evidence, rank_key, score_annotations

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
