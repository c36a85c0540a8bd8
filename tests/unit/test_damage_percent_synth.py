"""Damage percentage from ground-truth label polygons vs the generator's exact regions."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from damage.tasks.data import synth
from damage.tasks.serving.damage_percent import damage_report


def _label_mask(poly: np.ndarray, size: int) -> np.ndarray:
    """What a YOLO-seg label gives: the polygon filled (independent of the generator's mask)."""
    m = np.zeros((size, size), np.uint8)
    cv2.fillPoly(m, [poly.reshape(-1, 1, 2).astype(np.int32)], 1)
    return m.astype(bool)


def _exact(sample) -> tuple[dict[int, float], float | None]:
    """Per-vehicle and image percentages straight from the generator's painted regions and parents."""
    insts = sample.instances
    veh = [i for i, s in enumerate(insts) if s.name == "vehicle"]
    per = {}
    for v in veh:
        dm = np.zeros_like(insts[v].mask)
        for s in insts:
            if s.parent == v:
                dm |= s.mask
        per[v] = 100.0 * (dm & insts[v].mask).sum() / insts[v].mask.sum()
    if not veh:
        return per, None
    allv = np.logical_or.reduce([insts[v].mask for v in veh])
    alld = np.zeros_like(allv)
    for s in insts:
        if s.parent is not None:
            alld |= s.mask
    return per, 100.0 * (alld & allv).sum() / allv.sum()


def test_gt_masks_match_generator_regions():
    size = 160
    checked = with_damage = 0
    for seed in range(40):
        sample = synth.render_sample(np.random.default_rng([123, seed]), size)
        insts = sample.instances
        # parents index the generator's records; skip the rare sample where they don't line up
        if any(s.parent is not None and (s.parent >= len(insts) or insts[s.parent].name != "vehicle")
               for s in insts):
            continue
        masks = [_label_mask(s.polygon, size) for s in insts]
        rep = damage_report(masks, [s.name for s in insts])
        per, image_pct = _exact(sample)
        if image_pct is None:
            assert rep.damage_percent is None and rep.note
            continue
        checked += 1
        with_damage += image_pct > 0
        assert rep.damage_percent == pytest.approx(image_pct, abs=0.5), f"sample {seed}"
        got = {v["id"]: v["damage_percent"] for v in rep.vehicles}
        assert got.keys() == per.keys()
        for vid, pct in per.items():
            assert got[vid] == pytest.approx(pct, abs=0.5), f"sample {seed} vehicle {vid}"
        for i, s in enumerate(insts):
            if s.parent is not None:
                assert rep.assignment[i] == s.parent, f"sample {seed} instance {i}"
    assert checked >= 20 and with_damage >= 10
