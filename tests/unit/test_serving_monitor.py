"""Issue 28 without Ray: the canary split, the shadow report on two known models, monitoring windows
with drift on a stream whose brightness shifts halfway, and /metrics read by prometheus_client."""

from __future__ import annotations

import numpy as np
import pytest

from tests.unit.test_issue13_serving import fake_onnx


def test_canary_split_is_deterministic_and_near_weight():
    from damage.tasks.serving.scoring import canary_share

    ids = [f"req-{i}" for i in range(20000)]
    picked = [canary_share(i) < 0.1 for i in ids]
    assert picked == [canary_share(i) < 0.1 for i in ids]  # the same ids, the same split
    share = sum(picked) / len(ids)
    assert abs(share - 0.1) < 4 * (0.1 * 0.9 / len(ids)) ** 0.5  # within 4 standard errors
    assert all(0 <= canary_share(i) < 1 for i in ids[:100])
    assert sum(canary_share(i) < 0.5 for i in ids) / len(ids) == pytest.approx(0.5, abs=0.02)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Production: a vehicle over the whole 640 input and a dent over its left half; candidate: the
    same vehicle and a dent over its left quarter (half of production's dent)."""
    from damage.tasks.serving.predictor import Predictor

    tmp = tmp_path_factory.mktemp("pair")
    prod = fake_onnx(tmp / "prod.onnx", [(0, 0, 640, 640), (0, 0, 320, 640)], cls=[0, 1])
    cand = fake_onnx(tmp / "cand.onnx", [(0, 0, 640, 640), (0, 0, 160, 640)], cls=[0, 1])
    return Predictor(prod, threads=1), Predictor(cand, threads=1)


def test_shadow_report_on_known_models(pair):
    from damage.tasks.serving.shadow import ShadowReport, compare, report_lines

    prod, cand = pair
    image = np.full((64, 64, 3), 100, np.uint8)  # square: the 640 input maps to 64 px at scale 0.1
    p, c = prod.predict(image)[0], cand.predict(image)[0]
    assert [i.name for i in p.instances] == ["vehicle", "dent"] == [i.name for i in c.instances]
    cmp = compare(p, c)
    # the vehicles coincide (IoU 1); the candidate's dent covers half of production's (IoU 0.5)
    assert cmp["iou"] == [1.0, 0.5]
    assert cmp["counts_primary"] == cmp["counts_candidate"] == {"vehicle": 1, "dent": 1}
    # damage: production's dent covers 50 % of the vehicle, the candidate's 25 %: -25 points
    assert cmp["damage_diff"] == [pytest.approx(-25.0, abs=0.5)]
    rep = ShadowReport("4", "3")
    for _ in range(3):
        rep.add(cmp, latency_s=0.010, primary_latency_s=0.020)
    rep.errors, rep.dropped = 1, 2
    d = rep.to_dict()
    assert d["images"] == 3 and d["matched"] == 6 and d["mask_iou_mean"] == pytest.approx(0.75)
    assert d["counts_primary"] == {"dent": 3, "vehicle": 3}
    assert d["damage_diff_abs_mean"] == pytest.approx(25.0, abs=0.5)
    assert d["latency_ms_p95"] == pytest.approx(10.0) and d["primary_latency_ms_p95"] == pytest.approx(20.0)
    assert d["errors"] == 1 and d["dropped"] == 2
    merged = ShadowReport("4", "3")
    merged.merge(rep.to_dict(raw=True))
    merged.merge(rep.to_dict(raw=True))
    assert merged.to_dict()["images"] == 6 and merged.to_dict()["mask_iou_mean"] == pytest.approx(0.75)
    text = "\n".join(report_lines(d))
    assert "dent 3->3" in text and "mask IoU mean 0.75" in text


def test_shadow_mismatch_counts_unmatched(pair):
    from damage.tasks.serving.shadow import compare

    prod, _ = pair
    p = prod.predict(np.full((64, 64, 3), 100, np.uint8))[0]
    empty = type(p)(width=64, height=64)
    cmp = compare(p, empty)
    assert cmp["iou"] == [] and cmp["unmatched_primary"] == 2 and cmp["unmatched_candidate"] == 0
    assert cmp["damage_diff"] == []


def _stream(n: int, brightness: float, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.clip(rng.normal(brightness + rng.normal(0, 6), 20, (48, 64, 3)), 0, 255).astype(np.uint8)
            for _ in range(n)]


def _summary(image: np.ndarray, version: str = "3", latency: float = 0.01, status: int = 200,
             kind: str | None = None) -> dict:
    from damage.tasks.serving.scoring import image_measures

    return {"version": version, "status": status, "error_kind": kind, "row_errors": 0, "latency_s": latency,
            "images": [image_measures(image)] if status == 200 else [], "classes": {"dent": 1},
            "scores": [0.35, 0.9], "damage_percent": [12.5]}


def test_window_profile_and_drift_codes_on_brightness_shift():
    """The first window looks like the training data; the second is 60 grey levels brighter."""
    from damage.tasks.core.config import NotifyConfig, ValidateConfig
    from damage.tasks.serving.monitor import PROFILE_COLUMNS, ServingMonitor
    from damage.tasks.serving.scoring import image_measures
    from damage.tasks.validation.drift import PROFILE_KIND, PROFILE_VERSION, sketch

    train = [image_measures(im) for im in _stream(200, 100, seed=1)]
    reference = {"kind": PROFILE_KIND, "version": PROFILE_VERSION, "dataset": "train", "fingerprint": "fp",
                 "images": 200, "annotations": 10, "classes": ["dent"], "class_counts": {"dent": 10},
                 "class_shares": {"dent": 1.0},
                 "columns": {**{c: sketch(np.array([m[c] for m in train])) for c in PROFILE_COLUMNS},
                             "instances": sketch(np.ones(200)), "area/dent": sketch(np.full(10, 0.1))}}
    sent = []
    mon = ServingMonitor(window=60, window_min=60, validate=ValidateConfig(), notify=NotifyConfig(),
                         sink=lambda kind, v, i, rep: sent.append((kind, v, i, rep)), reference=lambda v: reference)
    mon._notify = lambda title, body: sent.append(("notify", title, body))  # noqa: SLF001 (no Apprise in a unit test)
    for im in _stream(60, 100, seed=2) + _stream(60, 160, seed=3):
        mon.record(_summary(im))
    windows = [s for s in sent if s[0] == "window"]
    assert [w[2] for w in windows] == [1, 2]
    first, second = windows[0][3], windows[1][3]
    assert first["requests"] == first["images"] == 60
    assert first["input"]["brightness"]["median"] == pytest.approx(100, abs=5)
    assert second["input"]["brightness"]["median"] == pytest.approx(160, abs=5)
    assert first["predictions"]["classes"] == {"dent": 60}
    assert sum(first["predictions"]["confidence_hist"]) == 120 and first["predictions"]["confidence_hist"][3] == 60
    assert first["predictions"]["damage_percent"]["p50"] == 12.5
    codes = lambda rep: {(f["code"], f["detail"].split(":")[0]) for f in rep["drift"]["findings"]}  # noqa: E731
    assert ("distribution_drift", "brightness") not in codes(first)
    assert ("distribution_drift", "brightness") in codes(second)
    assert {c for c, _ in codes(second)} <= {"distribution_drift"}  # labels have no counterpart in serving
    notes = [s for s in sent if s[0] == "notify"]
    assert len(notes) == 1 and "window 2" in notes[0][1] and "brightness" in notes[0][2]


def test_error_rate_notifies_and_metrics_parse():
    from prometheus_client.parser import text_string_to_metric_families

    from damage.tasks.serving.monitor import ServingMonitor

    sent = []
    mon = ServingMonitor(window=10, window_min=60, max_error_rate=0.2)
    mon._notify = lambda title, body: sent.append(body)  # noqa: SLF001
    mon.set_version("3")
    mon.set_version("4", previous="3")
    img = np.full((32, 32, 3), 90, np.uint8)
    for k in range(10):
        bad = k < 3
        mon.record(_summary(img, version="4", latency=0.019 * (k + 1), status=400 if bad else 200,
                            kind="bad_request" if bad else None))
    mon.load_failed("5", "models:/m@production", "DamageError: broken")
    mon.load_failed("5", "models:/m@production", "DamageError: broken")  # one notification per version
    assert len(sent) == 2 and "error rate 30.0%" in sent[0] and "failed to load" in sent[1]
    fams = {f.name: f for f in text_string_to_metric_families(mon.metrics_text().decode())}
    req = {(s.labels["version"], s.labels["status"]): s.value for s in fams["damage_serving_requests"].samples
           if s.name.endswith("_total")}
    assert req == {("4", "200"): 7, ("4", "400"): 3}
    errs = {s.labels["kind"]: s.value for s in fams["damage_serving_errors"].samples if s.name.endswith("_total")}
    assert errs == {"bad_request": 3, "load_failed": 2}
    info = {s.labels["version"]: s.value for s in fams["damage_serving_version_info"].samples}
    assert info == {"3": 0, "4": 1}
    lat = {s.labels.get("le"): s.value for s in fams["damage_serving_latency_seconds"].samples
           if s.name.endswith("_bucket")}
    assert lat["0.1"] == 5 and lat["+Inf"] == 10
