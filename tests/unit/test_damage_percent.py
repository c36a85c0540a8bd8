"""Hand-built cases for the damage-percentage definition (tasks/serving/damage_percent.py)."""

from __future__ import annotations

import numpy as np
import pytest

from damage.tasks.serving.damage_percent import damage_report

H, W = 20, 40


def rect(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_no_vehicle_gives_none_with_reason():
    rep = damage_report([rect(0, 0, 5, 5)], ["dent"])
    assert rep.damage_percent is None
    assert rep.vehicles == []
    assert "no vehicle" in rep.note
    assert rep.assignment == {0: None}
    assert rep.outside == [{"id": 0, "class": "dent", "area_px": 25}]


def test_empty_image():
    rep = damage_report([], [])
    assert rep.damage_percent is None and rep.note and rep.vehicles == []


def test_single_vehicle_partial_damage_counts_only_inside():
    car = rect(0, 0, 10, 10)  # 100 px
    dent = rect(5, 0, 15, 2)  # 20 px, 10 inside the car
    rep = damage_report([car, dent], ["vehicle", "dent"])
    assert rep.vehicles[0]["area_px"] == 100
    assert rep.vehicles[0]["damage_px"] == 10
    assert rep.vehicles[0]["damage_percent"] == pytest.approx(10.0)
    assert rep.vehicles[0]["by_class"] == {"dent": pytest.approx(10.0)}
    assert rep.damage_percent == pytest.approx(10.0)
    assert rep.note is None


def test_two_vehicles_assignment_and_image_level():
    a = rect(0, 0, 10, 10)  # 100 px
    b = rect(20, 0, 40, 10)  # 200 px
    scratch_a = rect(0, 0, 10, 3)  # 30 px on a
    dent_b = rect(20, 0, 30, 5)  # 50 px on b
    # straddles both, overlaps b more (8 px on a's side, 12 px on b's): assigned to b only
    crack = rect(8, 5, 23, 9)
    masks = [a, scratch_a, b, dent_b, crack]
    classes = ["vehicle", "scratch", "vehicle", "dent", "crack"]
    rep = damage_report(masks, classes)
    assert rep.assignment == {0: 0, 1: 0, 2: 2, 3: 2, 4: 2}
    va, vb = rep.vehicles
    assert (va["id"], vb["id"]) == (0, 2)
    assert va["damage_px"] == 30 and va["damage_percent"] == pytest.approx(30.0)
    # b: dent 50 px + crack on b (x 20..22, y 5..8 = 12 px) = 62 px, no overlap between them
    assert vb["damage_px"] == 62
    assert vb["damage_percent"] == pytest.approx(31.0)
    assert vb["by_class"] == {"crack": pytest.approx(6.0), "dent": pytest.approx(25.0)}
    # image: union of assigned damage inside union of vehicles, the crack included on both cars
    crack_inside = int((crack & (a | b)).sum())
    expect = 100.0 * (30 + 50 + crack_inside - int((crack & scratch_a).sum())) / 300
    assert rep.damage_percent == pytest.approx(expect)


def test_damage_outside_any_vehicle_reported_separately():
    car = rect(0, 0, 10, 10)
    inside = rect(0, 0, 5, 2)  # 10 px
    away = rect(30, 10, 35, 15)  # 25 px, touches no vehicle
    rep = damage_report([car, inside, away], ["vehicle", "dent", "scratch"])
    assert rep.assignment[2] is None
    assert rep.outside == [{"id": 2, "class": "scratch", "area_px": 25}]
    assert rep.damage_percent == pytest.approx(10.0)
    assert rep.vehicles[0]["by_class"] == {"dent": pytest.approx(10.0)}
    assert "overlap no vehicle" in rep.note


def test_overlapping_damage_not_double_counted():
    car = rect(0, 0, 10, 10)
    d1 = rect(0, 0, 6, 5)  # 30 px
    d2 = rect(3, 0, 10, 5)  # 35 px, 15 shared with d1 -> union 50
    s = rect(0, 0, 10, 5)  # a scratch over the same 50 px
    rep = damage_report([car, d1, d2, s], ["vehicle", "dent", "dent", "scratch"])
    v = rep.vehicles[0]
    assert v["damage_px"] == 50
    assert v["damage_percent"] == pytest.approx(50.0)
    assert v["by_class"] == {"dent": pytest.approx(50.0), "scratch": pytest.approx(50.0)}
    assert rep.damage_percent == pytest.approx(50.0)


def test_tie_goes_to_first_vehicle_and_vehicle_without_damage_is_zero():
    a = rect(0, 0, 10, 10)
    b = rect(10, 0, 20, 10)
    d = rect(8, 0, 12, 1)  # 2 px on each
    rep = damage_report([a, b, d], ["vehicle", "vehicle", "dent"])
    assert rep.assignment[2] == 0
    assert rep.vehicles[1]["damage_percent"] == 0.0 and rep.vehicles[1]["by_class"] == {}


def test_custom_vehicle_class_and_to_dict():
    car = rect(0, 0, 10, 10)
    d = rect(0, 0, 10, 1)
    rep = damage_report([car, d], ["car", "dent"], vehicle_class="car")
    out = rep.to_dict()
    assert out["damage_percent"] == pytest.approx(10.0)
    assert out["assignment"] == {"0": 0, "1": 0}
    assert out["vehicles"][0]["by_class"] == {"dent": pytest.approx(10.0)}


def test_bad_input_is_an_error():
    with pytest.raises(ValueError, match="differ in size"):
        damage_report([np.zeros((2, 2), bool), np.zeros((3, 3), bool)], ["vehicle", "dent"])
    with pytest.raises(ValueError, match="class names"):
        damage_report([np.zeros((2, 2), bool)], [])


# ----------------------------------------------------------------------------- per-vehicle error against labels

A, B = rect(0, 0, 10, 10), rect(20, 0, 30, 10)  # two labelled vehicles, 100 px each


def test_vehicle_mae_known_answer():
    """A: dent 20 % labelled; predicted dent 10 % + glass 10 % -> 20 % total (error 0; dent 10, glass 10).
    B: scratch 12 % labelled, vehicle not detected -> 0 % predicted (error 12). A false vehicle is ignored."""
    from damage.tasks.serving.damage_percent import mae_summary, vehicle_errors

    truth = [A, B, rect(0, 0, 10, 2), rect(20, 0, 26, 2)]
    truth_cls = ["vehicle", "vehicle", "dent", "scratch"]
    pred = [rect(32, 10, 40, 20), A, rect(0, 0, 10, 1), rect(5, 5, 10, 7)]
    pred_cls = ["vehicle", "vehicle", "dent", "glass_shatter"]
    errs = vehicle_errors(truth, truth_cls, pred, pred_cls)
    assert [(e.truth, e.pred, e.matched) for e in errs] == [(20.0, 20.0, True), (12.0, 0.0, False)]
    assert errs[0].by_class == {"dent": (20.0, 10.0), "glass_shatter": (0.0, 10.0)}
    assert errs[1].by_class == {"scratch": (12.0, 0.0)}
    s = mae_summary(errs)
    assert s.mae == pytest.approx(6.0) and s.vehicles == 2
    assert s.by_class == pytest.approx({"dent": 10.0, "glass_shatter": 10.0, "scratch": 12.0})


def test_vehicle_mae_matching_by_mask_iou():
    from damage.tasks.serving.damage_percent import mae_summary, vehicle_errors

    truth, truth_cls = [A, rect(0, 0, 10, 2)], ["vehicle", "dent"]  # 20 %
    # shifted by 2 px: IoU 80/120 = 0.67 -> matched; its dent covers 20 of its 100 px -> error 0
    shifted = vehicle_errors(truth, truth_cls, [rect(2, 0, 12, 10), rect(2, 0, 12, 2)], ["vehicle", "dent"])
    assert [(e.pred, e.matched) for e in shifted] == [(20.0, True)]
    # shifted by 6 px: IoU 40/160 = 0.25 -> not the same vehicle: 0 % predicted, error 20
    far = vehicle_errors(truth, truth_cls, [rect(6, 0, 16, 10), rect(6, 0, 16, 2)], ["vehicle", "dent"])
    assert [(e.pred, e.matched) for e in far] == [(0.0, False)]
    # two candidates for one vehicle: the better IoU takes it (one-to-one), its damage counts
    both = vehicle_errors(truth, truth_cls, [rect(3, 0, 13, 10), A, rect(0, 0, 10, 3)], ["vehicle", "vehicle", "dent"])
    assert [(e.pred, e.matched) for e in both] == [(30.0, True)]
    assert mae_summary(both).mae == pytest.approx(10.0)
    assert np.isnan(mae_summary([]).mae) and mae_summary([]).vehicles == 0
