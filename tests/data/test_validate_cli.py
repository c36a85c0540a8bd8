"""``damage validate``: exit codes, outputs, untouched input; the synthetic dataset passes."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from damage.flows.cli import app
from damage.tasks.core.config import ValidateConfig
from damage.tasks.validation.validate import validate_dataset

TRI = "0.2 0.2 0.8 0.2 0.5 0.8"


def _dataset(root: Path) -> Path:
    for split, n in (("train", 5), ("val", 2)):
        for i in range(n):
            img = np.random.default_rng(i + (100 if split == "val" else 0)).integers(0, 256, (64, 64, 3), np.uint8)
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / "images" / split / f"{i}.jpg"), img)
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split / f"{i}.txt").write_text(f"{i % 2} {TRI}\n")
    (root / "images/train/broken.jpg").write_bytes(b"")
    (root / "labels/train/broken.txt").write_text(f"0 {TRI}\n")
    (root / "data.yaml").write_text(yaml.safe_dump({"train": "images/train", "val": "images/val",
                                                    "names": ["vehicle", "dent"]}))
    return root


def _stamps(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.lstat().st_mtime_ns, p.lstat().st_size) for p in root.rglob("*")}


def test_cli_exit_codes_outputs_and_untouched_input(tmp_path):
    ds = _dataset(tmp_path / "ds")
    before = _stamps(ds)
    runner = CliRunner()
    out = tmp_path / "out"
    res = runner.invoke(app, ["validate", str(ds), "--report", str(out / "report.json"),
                              "--clean", str(out / "clean"), "--html", str(out / "html")])
    assert res.exit_code == 1, res.output
    assert "corrupt_image" in res.output and str(out / "report.json") in res.output
    report = json.loads((out / "report.json").read_text())
    assert [(f["code"], f["severity"], f["file"]) for f in report["findings"]] == [
        ("corrupt_image", "error", "images/train/broken.jpg")]
    assert _stamps(ds) == before
    assert (out / "html/index.html").is_file()
    res2 = runner.invoke(app, ["validate", str(out / "clean" / "data.yaml"), "--report", str(out / "r2.json")])
    assert res2.exit_code == 0, res2.output
    assert json.loads((out / "r2.json").read_text())["summary"]["images"] == 7


@pytest.mark.parametrize("make", [lambda p: p / "missing", lambda p: p, lambda p: p / "file.txt"])
def test_cli_usage_problems_exit_2(tmp_path, make):
    (tmp_path / "file.txt").write_text("x")
    res = CliRunner().invoke(app, ["validate", str(make(tmp_path))])
    assert res.exit_code == 2, res.output


def test_cli_refuses_output_inside_dataset(tmp_path):
    ds = _dataset(tmp_path / "ds")
    res = CliRunner().invoke(app, ["validate", str(ds), "--clean", str(ds / "cleaned")])
    assert res.exit_code == 2 and not (ds / "cleaned").exists()


def test_synthetic_dataset_passes(tiny_dataset):
    res = validate_dataset(Path(tiny_dataset), ValidateConfig())
    errors = [f for f in res.report["findings"] if f["severity"] == "error"]
    assert res.passed and errors == []
    assert res.report["summary"]["images"] == 24 and res.report["summary"]["annotations"] > 0


@pytest.mark.slow  # imports Prefect (seconds)
def test_validate_task_wraps_the_function():
    from prefect import Task

    import damage.tasks.validation.validate as v

    task = v.validate_task  # made on first use, once: the second read is the same object
    assert isinstance(task, Task) and task.name == "validate-data" and task.fn is v.validate_dataset
    assert v.validate_task is task
