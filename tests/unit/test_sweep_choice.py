"""Sweep arithmetic on hand-made detections: P, R, F1, damage MAE and the chosen point are known.

Two images, three labelled vehicles (A, B in image 1; C in image 2). Detections (score):
image 1: A exact (0.9), B exact (0.6), a false positive (0.45); image 2: C exact (0.35), a false
positive (0.8). At NMS IoU 0.6 a duplicate of A (0.55) also survives, and is a false positive.

    conf   IoU 0.5: dets  TP  P      R      F1      IoU 0.6: dets  TP  P    R      F1
    0.30            5     3   0.6    1      0.75             6     3   0.5  1      0.667
    0.40            4     2   0.5    0.667  0.571            5     2   0.4  0.667  0.5
    0.50            3     2   0.667  0.667  0.667            4     2   0.5  0.667  0.571
    0.70            2     1   0.5    0.333  0.4              2     1   0.5  0.333  0.4
"""

from __future__ import annotations

import numpy as np
import pytest

from damage.tasks.core.errors import DamageError
from damage.tasks.evaluation.evaluate import Collected
from damage.tasks.evaluation.metrics import ImageDets, ImageTruth, score_image
from damage.tasks.evaluation.sweep import (
    OBJECTIVES,
    choose_operating_point,
    grid_rows,
    plot_heatmap,
    plot_pr,
    write_csv,
)
from damage.tasks.serving.damage_percent import VehicleError

S = 32
CONFS = [0.3, 0.4, 0.5, 0.7]
IOUS = [0.5, 0.6]


def _sq(x1, y1, x2, y2):
    m = np.zeros((S, S), bool)
    m[y1:y2, x1:x2] = True
    return np.array([x1, y1, x2, y2], float), m


def _truth(name, boxes, damage):
    bs, ms = zip(*[_sq(*b) for b in boxes], strict=True)
    return ImageTruth(name, np.stack(bs), np.zeros(len(bs), int), np.stack(ms), damage)


def _dets(items):
    bs, ms = zip(*[_sq(*b) for b, _ in items], strict=True)
    return ImageDets(np.stack(bs), np.array([s for _, s in items]), np.zeros(len(items), int), np.stack(ms))


A, B, C = (0, 0, 10, 10), (16, 16, 26, 26), (4, 4, 14, 14)
FP1, FP2, DUP_A = (20, 0, 30, 8), (20, 20, 30, 30), (1, 0, 11, 10)


@pytest.fixture()
def collected() -> Collected:
    truths = [_truth("im1", [A, B], damage=10.0), _truth("im2", [C], damage=None)]
    per_iou = {
        0.5: [_dets([(A, 0.9), (B, 0.6), (FP1, 0.45)]), _dets([(C, 0.35), (FP2, 0.8)])],
        0.6: [_dets([(A, 0.9), (B, 0.6), (FP1, 0.45), (DUP_A, 0.55)]), _dets([(C, 0.35), (FP2, 0.8)])],
    }
    # predicted damage % of both labelled vehicles of image 1 (labelled: 10 % each) per conf; at
    # IoU 0.5, conf 0.7 vehicle B is not detected (0 % predicted); image 2 has no labelled damage
    damage = {0.5: {0.3: 12.0, 0.4: 10.5, 0.5: 9.0, 0.7: 12.0}, 0.6: {0.3: 10.2, 0.4: 11.0, 0.5: 13.0, 0.7: 14.0}}
    op = {}
    for iou, dets in per_iou.items():
        op[iou] = [score_image(d, t) for d, t in zip(dets, truths, strict=True)]
        for c, p in damage[iou].items():
            missed_b = iou == 0.5 and c == 0.7
            op[iou][0].damage[c] = [VehicleError(10.0, p, {"dent": (10.0, p)}, True),
                                    VehicleError(10.0, 0.0 if missed_b else p, {"dent": (10.0, 0.0 if missed_b else p)},
                                                 not missed_b)]
            op[iou][1].damage[c] = []
    maps = {iou: [score_image(d, t) for d, t in zip(dets, truths, strict=True)] for iou, dets in per_iou.items()}
    return Collected({0: "vehicle", 1: "dent"}, S, "pt", truths, maps, op, {}, 0.0)


def _row(rows, conf, iou):
    (r,) = [r for r in rows if r["conf"] == conf and r["iou"] == iou]
    return r


@pytest.mark.parametrize(("conf", "iou", "p", "r", "dets"), [
    (0.3, 0.5, 0.6, 1.0, 2.5), (0.4, 0.5, 0.5, 2 / 3, 2.0), (0.5, 0.5, 2 / 3, 2 / 3, 1.5), (0.7, 0.5, 0.5, 1 / 3, 1.0),
    (0.3, 0.6, 0.5, 1.0, 3.0), (0.4, 0.6, 0.4, 2 / 3, 2.5), (0.5, 0.6, 0.5, 2 / 3, 2.0),
])
def test_precision_recall_f1_per_grid_point(collected, conf, iou, p, r, dets):
    row = _row(grid_rows(collected, CONFS, IOUS), conf, iou)
    f1 = 2 * p * r / (p + r)
    for kind in ("box", "mask"):
        assert row[f"{kind}/precision"] == pytest.approx(p)
        assert row[f"{kind}/recall"] == pytest.approx(r)
        assert row[f"{kind}/f1"] == pytest.approx(f1)
    assert row["dets_per_image"] == pytest.approx(dets)


def test_map_is_per_iou_and_independent_of_conf(collected):
    rows = grid_rows(collected, CONFS, IOUS)
    for iou in IOUS:
        vals = {round(_row(rows, c, iou)["mask/mAP50-95"], 12) for c in CONFS}
        assert len(vals) == 1  # measured at the 0.001 floor, not at the row's conf
    # the surviving duplicate at IoU 0.6 is a false positive ranked above a true positive
    assert _row(rows, 0.3, 0.5)["box/mAP50"] > _row(rows, 0.3, 0.6)["box/mAP50"] > 0


def test_damage_mae(collected):
    rows = grid_rows(collected, CONFS, IOUS)
    assert _row(rows, 0.3, 0.5)["damage_mae"] == pytest.approx(2.0)
    assert _row(rows, 0.7, 0.5)["damage_mae"] == pytest.approx(6.0)  # B not found -> 0 % predicted: (2 + 10) / 2
    assert _row(rows, 0.3, 0.6)["damage_mae"] == pytest.approx(0.2)
    assert _row(rows, 0.3, 0.6)["damage_vehicles"] == 2


@pytest.mark.parametrize(("objective", "min_precision", "conf", "iou", "feasible"), [
    ("mask_f1", 0.8, 0.3, 0.5, True),
    ("fitness", 0.8, 0.3, 0.5, True),  # fitness ties across conf -> mask F1 decides
    ("recall_at_precision", 0.65, 0.5, 0.5, True),
    ("recall_at_precision", 0.5, 0.3, 0.5, True),  # recall 1 at P 0.6 and at P 0.5: higher precision wins
    ("recall_at_precision", 0.9, 0.5, 0.5, False),  # none qualifies: most precise point, flagged
    ("damage_mae", 0.8, 0.3, 0.6, True),
])
def test_chosen_operating_point(collected, objective, min_precision, conf, iou, feasible):
    best = choose_operating_point(grid_rows(collected, CONFS, IOUS), objective, min_precision)
    assert (best["conf"], best["iou"], best["feasible"]) == (conf, iou, feasible)


def test_unknown_objective_is_a_loud_error(collected):
    with pytest.raises(DamageError, match="unknown sweep objective 'f2'.*mask_f1"):
        choose_operating_point(grid_rows(collected, CONFS, IOUS), "f2")
    assert set(OBJECTIVES) == {"mask_f1", "fitness", "recall_at_precision", "damage_mae"}


def test_bad_grid_is_refused_before_inference(tmp_path):
    from damage.tasks.evaluation.sweep import sweep_thresholds

    with pytest.raises(DamageError, match="conf thresholds must be in"):
        sweep_thresholds(tmp_path / "missing.pt", tmp_path / "data.yaml", conf_grid=[0.3, 1.5])
    with pytest.raises(DamageError, match="unknown sweep objective"):
        sweep_thresholds(tmp_path / "missing.pt", tmp_path / "data.yaml", objective="nope")


def test_files(collected, tmp_path):
    rows = grid_rows(collected, CONFS, IOUS)
    best = choose_operating_point(rows, "recall_at_precision", 0.65)
    csv_path = write_csv(rows, tmp_path / "sweep.csv")
    lines = csv_path.read_text().splitlines()
    assert len(lines) == 1 + len(CONFS) * len(IOUS) and lines[0].startswith("conf,iou,")
    for p in (plot_heatmap(rows, best, "recall_at_precision", 0.65, tmp_path / "h.png"),
              plot_pr(rows, best, tmp_path / "pr.png")):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["h.png", "pr.png", "sweep.csv"]  # no temp files left
