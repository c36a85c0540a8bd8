"""The CLI's shared options are declared once (the root callback) and work before or after the command."""

from __future__ import annotations

import ast
from pathlib import Path

import typer
from typer.testing import CliRunner

from damage.flows.cli import app
from damage.flows.common import hoist_shared, setup, shared

ROOT = Path(__file__).resolve().parents[2]


def test_hoist_keeps_values_and_order_and_stops_at_double_dash():
    assert hoist_shared(["run", "--force", "-s", "a=1", "--set=b=2", "--state-dir", "/s", "-c", "x.yaml"]) == [
        "--set", "a=1", "--set", "b=2", "--state-dir", "/s", "--config", "x.yaml", "run", "--force"]
    assert hoist_shared(["predict", "--", "--set"]) == ["predict", "--", "--set"]


def _probe_app(seen: dict) -> typer.Typer:
    """The real root (callback + group) with one command that reports what ``setup`` resolved."""
    from damage.flows.common import DamageGroup, shared_options

    probe = typer.Typer(cls=DamageGroup)
    probe.callback()(shared_options)

    @probe.command("probe")
    def _probe(ctx: typer.Context, flag: bool = False) -> None:
        cfg, paths = setup(ctx, ["seed=7"])
        seen.update(epochs=cfg.train.epochs, seed=cfg.seed, state=str(paths.root), sets=shared(ctx).sets, flag=flag)

    @probe.command("other")
    def _other() -> None:
        pass

    return probe


def test_shared_options_before_or_after_the_command(tmp_path):
    before, after = {}, {}
    args = ["--set", "train.epochs=3", "--state-dir", str(tmp_path / "st")]
    r = CliRunner().invoke(_probe_app(before), [*args, "probe", "--flag"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(_probe_app(after), ["probe", "--flag", *args])
    assert r.exit_code == 0, r.output
    assert before == after and before["epochs"] == 3 and before["seed"] == 7 and before["flag"] is True
    assert before["state"] == str((tmp_path / "st").resolve())


def test_usage_errors_are_one_line_exit_2(tmp_path):
    r = CliRunner().invoke(app, ["quantize", str(tmp_path / "none.onnx")])
    assert r.exit_code == 2 and "none.onnx" in r.output and "does not exist" in r.output
    assert [ln for ln in r.output.splitlines() if ln.strip()] == [r.output.strip()]
    (tmp_path / "m.onnx").write_bytes(b"x")
    r = CliRunner().invoke(app, ["quantize", str(tmp_path / "m.onnx"), "--mode", "int4"])
    assert r.exit_code == 2 and "'int4' is not one of 'int8-static', 'int8-dynamic', 'fp16'" in r.output
    r = CliRunner().invoke(app, ["validate", str(tmp_path), "--config", str(tmp_path / "no.yaml")])
    assert r.exit_code == 2 and "no.yaml" in r.output and "does not exist" in r.output


def test_commands_declare_no_shared_option_and_hand_check_no_path():
    """Only the root callback declares --config/--set/--state-dir; no command re-declares them."""
    offenders = []
    for f in sorted((ROOT / "flows" / "commands").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.FunctionDef):
                for a in node.args.args:
                    ann = ast.unparse(a.annotation) if a.annotation else ""
                    if any(o in ann for o in ("ConfigOpt", "SetOpt", "StateOpt")) or a.arg in {"config", "sets", "state_dir"}:
                        offenders.append(f"{f.name}:{node.name}({a.arg})")
    assert not offenders, offenders


def test_one_top_level_run_tag():
    src = "\n".join(p.read_text() for p in (ROOT / "flows").rglob("*.py"))
    assert "damage.entry" not in src and src.count("tracking.start_run(") == 1  # flows/common.top_level_run
