"""Per-epoch per-class mask AP50 from the training callback (issue 12, item 6)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from damage.tasks.training.train import class_ap50


def test_class_ap50_reads_the_validators_per_class_figures():
    seg = SimpleNamespace(ap_class_index=np.array([0, 2]), all_ap=np.array([[0.9] + [0.5] * 9, [0.25] + [0.1] * 9]))
    seg.ap50 = seg.all_ap[:, 0]
    v = SimpleNamespace(metrics=SimpleNamespace(seg=seg, names={0: "vehicle", 1: "dent", 2: "scratch"}))
    assert class_ap50(v) == {"mask_ap50/vehicle": 0.9, "mask_ap50/scratch": 0.25}  # dent: no labels, no AP
    assert class_ap50(SimpleNamespace(metrics=None)) == {}


def test_per_epoch_class_ap50_only_for_validated_epochs(tiny_dataset, tmp_path):
    """Two epochs with per-epoch validation off: epoch 0 has no validation figures (nothing was
    measured), the last epoch (Ultralytics always validates it) has mAP and per-class mask AP50
    for every class labelled in val."""
    import yaml

    from damage.tasks.core.config import TrainConfig
    from damage.tasks.training.train import train_model

    seen: dict[int, dict[str, float]] = {}
    cfg = TrainConfig(plots=False, model="n", epochs=2, imgsz=64, batch=8, patience=0, warmup_epochs=0)
    train_model(tiny_dataset, cfg, tmp_path, seed=0, on_epoch=lambda e, m: seen.setdefault(e, m),
                extra_args={"val": False, "plots": False})
    assert sorted(seen) == [0, 1]
    assert not any(k.startswith(("mask_ap50/", "mask/", "box/")) for k in seen[0]), seen[0]
    assert "train/seg_loss" in seen[0]
    names = yaml.safe_load(tiny_dataset.read_text())["names"]
    names = list(names.values()) if isinstance(names, dict) else names
    labelled = set()
    val_labels = tiny_dataset.parent / "labels" / "val"
    for f in val_labels.glob("*.txt"):
        labelled |= {names[int(line.split()[0])] for line in f.read_text().splitlines() if line.strip()}
    got = {k.split("/", 1)[1] for k in seen[1] if k.startswith("mask_ap50/")}
    assert labelled and got == labelled
    assert "mask/mAP50" in seen[1] and all(0 <= seen[1][f"mask_ap50/{c}"] <= 1 for c in got)
