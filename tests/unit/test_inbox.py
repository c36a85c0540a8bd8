"""The labelling inbox: collection rules (band, disagreement, rate cap), what is stored, write failures, retention."""

from __future__ import annotations

import datetime as dt
import json
import logging

import cv2
import numpy as np
import pytest

from damage.tasks.core.config import CollectConfig
from damage.tasks.data.blobstore import LocalStore, S3Store
from damage.tasks.serving.inbox import Inbox, collected_at, disagree, list_items, uncertain
from tests.helpers import S3_BUCKET

T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


def png(seed: int = 0, size: int = 32) -> bytes:
    img = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    return cv2.imencode(".png", img)[1].tobytes()


def pred(*inst: tuple[str, float, list[float]]) -> dict:
    return {"image": "/home/client/secret-claim-42.png", "width": 32, "height": 32, "model": "m.onnx",
            "conf": 0.25, "iou": 0.5, "damage_percent": 3.0, "vehicles": [{"id": 0}],
            "instances": [{"id": k, "class": c, "score": s, "box": b, "area_px": 9, "vehicle_id": 0,
                           "polygon": [[b[0], b[1]], [b[2], b[1]], [b[2], b[3]]]} for k, (c, s, b) in enumerate(inst)]}


class Clock:
    def __init__(self, t: dt.datetime = T0) -> None:
        self.t = t.timestamp()

    def __call__(self) -> float:
        return self.t


def inbox(tmp_path, clock=None, **kw) -> Inbox:
    return Inbox(CollectConfig(enabled=True, **kw), LocalStore(tmp_path / "inbox"), clock=clock or Clock())


def test_band_rule_counts_damage_only():
    band = (0.25, 0.5)
    assert uncertain(pred(("dent", 0.25, [0, 0, 5, 5])), band)  # low end included
    assert not uncertain(pred(("dent", 0.5, [0, 0, 5, 5])), band)  # high end excluded
    assert not uncertain(pred(("dent", 0.9, [0, 0, 5, 5]), ("dent", 0.1, [0, 0, 5, 5])), band)
    assert not uncertain(pred(("vehicle", 0.3, [0, 0, 5, 5])), band)  # a vehicle is not damage
    assert not uncertain(pred(), band)


def test_disagreement_rule():
    a = pred(("dent", 0.9, [0, 0, 10, 10]), ("scratch", 0.8, [20, 20, 30, 30]))
    assert not disagree(a, a)
    assert not disagree(a, pred(("scratch", 0.7, [21, 20, 30, 30]), ("dent", 0.6, [1, 0, 10, 10])))  # order, jitter
    assert disagree(a, pred(("dent", 0.9, [0, 0, 10, 10])))  # one missed
    assert disagree(a, pred(("dent", 0.9, [0, 0, 10, 10]), ("crack", 0.8, [20, 20, 30, 30])))  # other class
    assert disagree(a, pred(("dent", 0.9, [5, 5, 15, 15]), ("scratch", 0.8, [20, 20, 30, 30])))  # IoU 0.14
    assert not disagree(pred(("vehicle", 0.9, [0, 0, 9, 9])), pred())  # vehicles do not count


def test_collects_uncertain_and_disagreeing_requests_only(tmp_path):
    ib = inbox(tmp_path)
    confident = pred(("dent", 0.95, [0, 0, 10, 10]))
    assert ib.maybe_collect(png(0), confident) is None
    assert ib.maybe_collect(png(1), pred(("dent", 0.3, [0, 0, 10, 10]))) is not None
    shadow = pred(("crack", 0.9, [0, 0, 10, 10]))
    iid = ib.maybe_collect(png(2), confident, other=shadow)
    assert iid is not None
    assert ib.maybe_collect(png(3), confident, reason="disagreement") is not None  # the server compared
    reasons = sorted(json.loads(ib.store.get(f"{i}.json"))["reason"] for i in list_items(ib.store.list()))
    assert reasons == ["disagreement", "disagreement", "uncertain"]
    off = inbox(tmp_path / "b", disagreement=False)
    assert off.maybe_collect(png(2), confident, other=shadow) is None
    assert off.maybe_collect(png(3), confident, reason="disagreement") is None
    assert Inbox(CollectConfig(), LocalStore(tmp_path / "c")).maybe_collect(png(1), pred(("dent", 0.3, [0, 0, 9, 9]))) \
        is None  # serving.collect.enabled is off by default
    assert not (tmp_path / "c").exists()


def test_stores_the_image_prediction_and_reason_only(tmp_path):
    ib = inbox(tmp_path)
    data = png(4)
    iid = ib.maybe_collect(data, pred(("dent", 0.3, [0, 0, 10, 10])))
    assert sorted(ib.store.list()) == [f"{iid}.json", f"{iid}.png"]
    assert ib.store.get(f"{iid}.png") == data
    rec = json.loads(ib.store.get(f"{iid}.json"))
    assert set(rec) == {"reason", "prediction"}
    assert set(rec["prediction"]) == {"width", "height", "model", "conf", "iou", "instances"}
    assert set(rec["prediction"]["instances"][0]) == {"class", "score", "box", "polygon"}
    assert "secret-claim" not in ib.store.get(f"{iid}.json").decode()  # the client's file name is not kept
    assert collected_at(iid) == T0


def test_rate_cap_is_a_sliding_hour(tmp_path):
    clock = Clock()
    ib = inbox(tmp_path, clock, max_per_hour=3)
    unsure = pred(("dent", 0.3, [0, 0, 10, 10]))
    got = []
    for k in range(5):
        clock.t += 60
        got.append(ib.maybe_collect(png(10 + k), unsure))
    assert [g is not None for g in got] == [True, True, True, False, False]
    clock.t += 3600 - 4 * 60 + 1  # the first slot is now more than an hour old
    assert ib.maybe_collect(png(20), unsure) is not None
    assert ib.maybe_collect(png(21), unsure) is None
    assert len(list_items(ib.store.list())) == 4
    assert inbox(tmp_path / "z", max_per_hour=0).maybe_collect(png(1), unsure) is None


def test_write_failure_is_a_warning_not_an_error(tmp_path, caplog):
    class Broken(LocalStore):
        def put(self, key, data):
            raise OSError("disk full")

    ib = Inbox(CollectConfig(enabled=True), Broken(tmp_path / "x"), clock=Clock())
    with caplog.at_level(logging.WARNING, logger="damage.tasks.serving.inbox"):
        assert ib.maybe_collect(png(1), pred(("dent", 0.3, [0, 0, 10, 10]))) is None
        assert ib.maybe_collect(b"not an image", pred(("dent", 0.3, [0, 0, 10, 10]))) is None
        assert ib.maybe_collect(png(1), object()) is None  # a malformed prediction
    assert "disk full" in caplog.text and "not a readable image" in caplog.text
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 3


def test_oversized_image_is_refused_before_decoding(tmp_path):
    ib = Inbox(CollectConfig(enabled=True), LocalStore(tmp_path / "i"), max_pixels=100, clock=Clock())
    assert ib.maybe_collect(png(1, size=32), pred(("dent", 0.3, [0, 0, 10, 10]))) is None
    assert ib.store.list() == []


def test_retention_deletes_everything_older(tmp_path):
    clock = Clock()
    ib = inbox(tmp_path, clock, retention_days=30)
    unsure = pred(("dent", 0.3, [0, 0, 10, 10]))
    old = ib.maybe_collect(png(1), unsure)
    clock.t += 20 * 86400
    young = ib.maybe_collect(png(2), unsure)
    (tmp_path / "inbox" / f"{old}.jpg.part").write_bytes(b"x")  # a leftover of an interrupted item
    (tmp_path / "inbox" / "README.txt").write_text("not the inbox's")
    gone = ib.purge_expired(T0 + dt.timedelta(days=31))
    assert sorted(gone) == sorted([f"{old}.png", f"{old}.json", f"{old}.jpg.part"])
    assert sorted(ib.store.list()) == sorted(["README.txt", f"{young}.json", f"{young}.png"])
    assert ib.purge_expired(T0 + dt.timedelta(days=31)) == []
    ib.purge_expired(T0 + dt.timedelta(days=51))
    assert ib.store.list() == ["README.txt"]


def test_s3_inbox_collects_and_purges(s3):
    store = S3Store(f"s3://{S3_BUCKET}/inbox", client=s3)
    clock = Clock()
    ib = Inbox(CollectConfig(enabled=True, retention_days=1), store, clock=clock)
    iid = ib.maybe_collect(png(1), pred(("dent", 0.3, [0, 0, 10, 10])))
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=S3_BUCKET)["Contents"]]
    assert sorted(keys) == [f"inbox/{iid}.json", f"inbox/{iid}.png"]
    assert ib.purge_expired(T0 + dt.timedelta(hours=23)) == []
    assert len(ib.purge_expired(T0 + dt.timedelta(days=2))) == 2
    assert "Contents" not in s3.list_objects_v2(Bucket=S3_BUCKET)


@pytest.mark.parametrize("key", ["../x.png", "/etc/passwd", "a/../../b"])
def test_store_keys_stay_inside(tmp_path, key):
    from damage.tasks.core.errors import DatasetError

    with pytest.raises(DatasetError):
        LocalStore(tmp_path).put(key, b"x")


def test_collecting_purges_expired_items_hourly(tmp_path):
    clock = Clock()
    ib = inbox(tmp_path, clock, retention_days=1)
    unsure = pred(("dent", 0.3, [0, 0, 10, 10]))
    first = ib.maybe_collect(png(1), unsure)
    clock.t += 2 * 86400
    second = ib.maybe_collect(png(2), unsure)  # more than an hour since the last purge: the first item expires
    assert {k.split(".")[0] for k in ib.store.list()} == {second}
    assert first != second
