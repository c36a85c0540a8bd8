"""CLI input errors of ``damage evaluate`` / ``damage sweep``: one line, exit code 2, no traceback."""

from __future__ import annotations

from typer.testing import CliRunner

from damage.flows.cli import app


def test_sweep_unknown_objective(tmp_path):
    r = CliRunner().invoke(app, ["sweep", str(tmp_path / "m.pt"), "--data", str(tmp_path), "--objective", "f2",
                                 "--no-mlflow"])
    assert r.exit_code == 2
    assert "unknown sweep objective 'f2'" in r.output and "Traceback" not in r.output


def test_sweep_bad_grid_value(tmp_path):
    r = CliRunner().invoke(app, ["sweep", str(tmp_path / "m.pt"), "--data", str(tmp_path), "--min-precision", "2",
                                 "--no-mlflow"])
    assert r.exit_code == 2 and "min_precision" in r.output


def test_evaluate_missing_dataset(tmp_path):
    r = CliRunner().invoke(app, ["evaluate", str(tmp_path / "m.pt"), "--data", str(tmp_path / "nowhere"),
                                 "--no-mlflow"])
    assert r.exit_code == 2 and "nowhere" in r.output
