"""Bad input at the CLI: one line naming the problem, non-zero exit, nothing half-written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _damage(*args: str, state: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DAMAGE_STATE_DIR": str(state), "COLUMNS": "400"}
    return subprocess.run([sys.executable, "-m", "damage.flows.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _one_line_error(p: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert lines, p.stdout
    assert lines[-1].startswith("error:"), p.stderr
    assert "Traceback" not in p.stderr
    return lines[-1]


def test_unknown_config_key(tmp_path):
    p = _damage("run", "--set", "train.epohcs=3", state=tmp_path / "s")
    assert p.returncode == 2
    assert "train.epohcs" in _one_line_error(p) and "train.epochs" in p.stderr


def test_missing_dataset_path(tmp_path):
    missing = tmp_path / "no-such-dataset"
    p = _damage("run", "--set", f"data.source={missing}", state=tmp_path / "s")
    assert p.returncode == 2
    assert str(missing) in _one_line_error(p)
    assert not (tmp_path / "s" / "mlflow.db").exists()  # no run was opened


def test_data_yaml_classes_do_not_match_labels(tmp_path):
    from damage.tasks.data.synth import generate_dataset

    data_yaml = generate_dataset(tmp_path / "ds", images=6, seed=1, imgsz=64)
    spec = yaml.safe_load(data_yaml.read_text())
    spec["names"] = {0: "vehicle", 1: "dent"}  # labels use ids up to 6
    data_yaml.write_text(yaml.safe_dump(spec))
    p = _damage("run", "--set", f"data.source={data_yaml}", state=tmp_path / "s")
    assert p.returncode == 2
    line = _one_line_error(p)
    assert "labels/" in line and "class id" in line
    assert not (tmp_path / "s" / "runs").exists() or not any((tmp_path / "s" / "runs").iterdir())
