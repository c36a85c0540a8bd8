"""Explanations point at their instance (issue 32), measured by their own fidelity figures.

On the session's small trained model (``trained_model``, the easy set), every instance detected on
the val images is explained with the configured method. Against two controls, by a sign test whose
chance level is fixed (no threshold set at a measured score):

* box-share baseline: a map that ignores the instance puts its box's area share in the box; the
  method's heat in the box must beat it on more instances than a fair coin would (p < 0.001);
* random-heat control: a uniform-noise map, scored the same way, must lose to the method as often;
* deletion: greying the map's hottest pixels must drop the instance's score more than greying as
  many random pixels, again on more instances than chance gives.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from damage.tasks.core.config import ExplainConfig
from damage.tasks.evaluation.explain import explain_image, load_model, pick_explain_samples
from damage.tasks.evaluation.fidelity import pointing, summarise

ALPHA = 1e-3
MIN_INSTANCES = 10


def sign_test_needs(n: int, alpha: float = ALPHA) -> int:
    """Smallest k with P(Binomial(n, 1/2) >= k) < alpha: wins a fair coin reaches that rarely.

    Example:
        >>> sign_test_needs(10), sign_test_needs(20)
        (10, 18)
    """
    tail = 0.0
    for k in range(n, -1, -1):
        tail += math.comb(n, k) / 2 ** n
        if tail >= alpha:
            return k + 1
    return 0


@pytest.fixture(scope="module")
def explained(trained_model, easy_dataset, easy_imgsz):
    method = ExplainConfig().method
    net = load_model(trained_model)
    images = pick_explain_samples(easy_dataset, 100, seed=0)
    exps = [e for img in images for e in explain_image(net, img, method, conf=0.25, iou=0.5, imgsz=easy_imgsz)]
    informative = [e for e in exps if e.fidelity and e.fidelity["box_area_share"] < 0.5]
    if len(informative) < MIN_INSTANCES:
        pytest.fail(f"the test model detected {len(informative)} instances with a box under half the image; "
                    f"the fidelity test needs {MIN_INSTANCES} (train the trained_model fixture longer)")
    return method, informative


def test_heat_beats_the_box_share_baseline_and_random_heat(explained):
    method, exps = explained
    rng = np.random.default_rng(0)
    wins_base = sum(e.fidelity["heat_in_box"] > e.fidelity["box_area_share"] for e in exps)
    random_in_box = [pointing(rng.random(e.heatmap.shape).astype(np.float32), e.box, e.mask)["heat_in_box"]
                     for e in exps]
    wins_random = sum(e.fidelity["heat_in_box"] > r for e, r in zip(exps, random_in_box, strict=True))
    need = sign_test_needs(len(exps))
    print(f"{method}: {summarise([e.fidelity for e in exps])}; wins vs box share {wins_base}, "
          f"vs random heat {wins_random} of {len(exps)} (chance level {need})")
    assert wins_base >= need and wins_random >= need


def test_deleting_the_hottest_pixels_drops_the_score_more_than_random(explained):
    method, exps = explained
    wins = sum(e.fidelity["deletion_drop"] > e.fidelity["random_drop"] for e in exps)
    assert wins >= sign_test_needs(len(exps)), [(round(e.fidelity["deletion_drop"], 3),
                                                 round(e.fidelity["random_drop"], 3)) for e in exps]


def test_every_explanation_carries_its_fidelity(explained):
    _, exps = explained
    keys = {"heat_in_box", "heat_in_mask", "box_area_share", "box_lift", "deletion_drop", "random_drop"}
    for e in exps:
        assert keys <= set(e.summary()["fidelity"])
        assert 0.0 <= e.fidelity["heat_in_mask"] <= 1.0 and 0.0 <= e.fidelity["heat_in_box"] <= 1.0
