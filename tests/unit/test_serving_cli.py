"""Issue 28 at the CLI: Ray asked for without the [ray] extra is an error naming the extra; a bad
serving URI or replica range is a one-line error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Runs the CLI with `ray` made unimportable (as on an install without the [ray] extra).
NO_RAY = """
import importlib.util, sys
_find = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "ray" or name.startswith("ray.") else _find(name, *a)
from damage.flows.cli import main
sys.argv = ["damage", *sys.argv[1:]]
main()
"""


def _run(code_or_module: list[str], state: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DAMAGE_STATE_DIR": str(state), "COLUMNS": "400"}
    return subprocess.run([sys.executable, *code_or_module], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_ray_without_extra_names_the_extra(tmp_path):
    p = _run(["-c", NO_RAY, "serve", "--replicas", "2"], tmp_path / "s")
    assert p.returncode == 2, p.stderr[-2000:]
    assert "the [ray] extra" in p.stderr and "damage[ray]" in p.stderr and "Traceback" not in p.stderr


def test_bad_uri_and_replica_range(tmp_path):
    p = _run(["-m", "damage.flows.cli", "serve", "runs:/abc/pyfunc", "--replicas", "1"], tmp_path / "s")
    assert p.returncode == 2 and "models:/<name>@<alias>" in p.stderr, p.stderr[-2000:]
    p = _run(["-m", "damage.flows.cli", "serve", "--min-replicas", "3", "--max-replicas", "2"], tmp_path / "s")
    assert p.returncode == 2 and "serving.max_replicas (2) < serving.min_replicas (3)" in p.stderr, p.stderr[-2000:]
