"""The data gate counts each annotation once: the totals and per-class counts in report.json and
profile.json (the drift baseline of the next night) equal the label files' line counts."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from damage.tasks.core.config import ValidateConfig
from damage.tasks.data.synth import generate_dataset
from damage.tasks.validation.validate import validate_dataset


def _label_line_counts(root: Path) -> tuple[int, Counter]:
    """Lines in every label file under ``root``, and per class id (first field)."""
    per_class: Counter = Counter()
    total = 0
    for txt in sorted(root.glob("labels/*/*.txt")):
        for line in txt.read_text().splitlines():
            if line.strip():
                total += 1
                per_class[int(line.split()[0])] += 1
    return total, per_class


@pytest.mark.parametrize("workers", [1, 2])
def test_gate_counts_equal_label_line_counts(tmp_path, workers):
    data_yaml = generate_dataset(tmp_path / "ds", images=12, seed=3, imgsz=64, val_fraction=0.25)
    names = yaml.safe_load(data_yaml.read_text())["names"]
    names = [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)
    total, per_class = _label_line_counts(data_yaml.parent)
    assert total > len(names)  # the set has annotations to count

    # chunk_size 2 with 2 workers: the scan goes through the process pool (>= 2 chunks per worker)
    out = tmp_path / "gate"
    res = validate_dataset(data_yaml, ValidateConfig(workers=workers, chunk_size=2, imbalance_ratio=1000),
                           report_path=out / "report.json")
    report = json.loads((out / "report.json").read_text())
    profile = json.loads((out / "profile.json").read_text())

    assert report["summary"]["annotations"] == total
    assert report["summary"]["images"] == 12
    assert profile["annotations"] == total
    assert profile["class_counts"] == {n: per_class.get(i, 0) for i, n in enumerate(names)}
    assert res.report == report
