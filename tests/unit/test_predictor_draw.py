"""Overlay drawing and the JSON document of a hand-built prediction (no model)."""

from __future__ import annotations

import json

import numpy as np

from damage.tasks.serving.damage_percent import damage_report
from damage.tasks.serving.draw import draw_prediction
from damage.tasks.serving.predictor import Instance, Prediction


def _pred() -> Prediction:
    h, w = 60, 100
    car = np.zeros((h, w), bool)
    car[10:50, 10:90] = True
    dent = np.zeros((h, w), bool)
    dent[20:30, 20:40] = True
    rep = damage_report([car, dent], ["vehicle", "dent"])
    insts = [
        Instance(0, 0, "vehicle", 0.9, [10, 10, 90, 50], car, int(car.sum()), [[10, 10], [89, 10], [89, 49], [10, 49]], 0),
        Instance(1, 1, "dent", 0.6, [20, 20, 40, 30], dent, int(dent.sum()), [[20, 20], [39, 20], [39, 29], [20, 29]], 0),
    ]
    return Prediction(width=w, height=h, instances=insts, damage=rep)


def test_overlay_changes_mask_pixels_only_where_drawn():
    img = np.full((60, 100, 3), 128, np.uint8)
    p = _pred()
    out = draw_prediction(img, p)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert not np.array_equal(out[25, 30], img[25, 30])  # dent pixel tinted
    assert np.array_equal(out[58, 98], img[58, 98])  # far corner untouched
    assert np.array_equal(img, np.full((60, 100, 3), 128, np.uint8))  # input not modified


def test_prediction_document():
    p = _pred()
    doc = p.to_dict("a.png", "m.onnx", 0.4, 0.5)
    json.dumps(doc)
    assert doc["damage_percent"] == round(100 * 200 / 3200, 3)
    assert doc["vehicles"] == [{"id": 0, "area_px": 3200, "damage_px": 200, "damage_percent": 6.25,
                                "by_class": {"dent": 6.25}}]
    assert [i["vehicle_id"] for i in doc["instances"]] == [0, 0]
