"""Sanity of Grad-CAM on a model that actually detects; default run.

The session fixture ``trained_model`` (a yolov8n-seg trained from scratch on the easy synthetic
set, see ``tests/conftest.py``) detects big objects. For the instances it detects, the Grad-CAM
mass inside the instance's box (dilated 10 % per side) must be a larger share than the box's
share of the image area for most instances: the heatmap concentrates where the detection is.
Damage instances are used when the model finds at least ``MIN_INSTANCES`` of them; otherwise
every class counts (the easy set has only vehicles).

Knobs (environment): ``DAMAGE_TEST_EXPLAIN_CONF`` (default 0.25). ``DAMAGE_TEST_EXPLAIN_MODEL`` +
``DAMAGE_TEST_EXPLAIN_DATA`` (+ ``DAMAGE_TEST_EXPLAIN_IMGSZ``) use an already trained model instead,
e.g. the demo's: ``best_weights`` and ``dataset`` from ``.state/last_run.json``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from damage.tasks.evaluation.explain import box_mass_share, explain_image, load_model, pick_explain_samples

CONF = float(os.environ.get("DAMAGE_TEST_EXPLAIN_CONF", "0.25"))
MIN_INSTANCES = 3
MAX_AREA = 0.8  # dilated box share of the image above which an instance says nothing about concentration


@pytest.fixture(scope="module")
def trained(request):
    """(weights, data.yaml, imgsz) of a model that detects: the session's, or one named by the environment."""
    if os.environ.get("DAMAGE_TEST_EXPLAIN_MODEL"):
        return (Path(os.environ["DAMAGE_TEST_EXPLAIN_MODEL"]), Path(os.environ["DAMAGE_TEST_EXPLAIN_DATA"]),
                int(os.environ.get("DAMAGE_TEST_EXPLAIN_IMGSZ", "96")))
    return (request.getfixturevalue("trained_model"), request.getfixturevalue("easy_dataset"),
            request.getfixturevalue("easy_imgsz"))


@pytest.fixture(scope="module")
def detections(trained):
    """Grad-CAM explanations of every instance detected on the val images (never trained on)."""
    model, data, imgsz = trained
    net = load_model(model)
    images = pick_explain_samples(data, 100, seed=0)
    return [(img, explain_image(net, img, "gradcam", conf=CONF, iou=0.5, imgsz=imgsz)) for img in images]


def _informative(e) -> bool:
    """A box (dilated) covering most of the frame cannot show concentration: an untrained model's boxes do."""
    return box_mass_share(e.heatmap, e.box, dilate=0.1)[1] < MAX_AREA


def test_gradcam_concentrates_on_detections(detections):
    found = [e for _, exps in detections for e in exps if _informative(e)]
    damage = [e for e in found if e.name != "vehicle"]
    chosen = damage if len(damage) >= MIN_INSTANCES else found
    if len(chosen) < MIN_INSTANCES:
        pytest.fail(f"the test model detected only {len(chosen)} instance(s) with a box under {MAX_AREA:.0%} "
                    f"of the image at conf {CONF}; the trained_model fixture should detect more (train longer)")
    ratios = []
    for e in chosen:
        share, area = box_mass_share(e.heatmap, e.box, dilate=0.1)
        ratios.append((share, area, e.name))
    inside = [s > a for s, a, _ in ratios]
    kinds = sorted({n for *_, n in ratios})
    print(f"{sum(inside)}/{len(inside)} instances ({', '.join(kinds)}) have more heat in their box than its area; "
          f"median share/area = {np.median([s / a for s, a, _ in ratios if a > 0]):.2f}")
    assert sum(inside) > len(inside) / 2, ratios


def test_two_instances_in_one_image_differ(detections):
    multi = [exps for _, exps in detections if len(exps) >= 2]
    if not multi:
        pytest.fail("no image with two detected instances; train longer")
    compared = 0
    for exps in multi:
        a, b = exps[0], exps[1]
        assert a.anchor != b.anchor
        if a.heatmap.max() <= 0 or b.heatmap.max() <= 0:
            continue  # Grad-CAM's ReLU left no positive evidence for one of them: nothing to compare
        compared += 1
        assert not np.allclose(a.heatmap, b.heatmap, atol=1e-3), (a.summary(), b.summary())
    assert compared, "no image with two instances whose heatmaps both carry signal; train longer"
