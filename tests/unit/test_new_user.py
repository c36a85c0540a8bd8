"""What a new user trips over (issue 32), each asserted by the message or the behaviour they see."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import LINEAGE, sqlite_client

ROOT = Path(__file__).resolve().parents[2]


def _damage(*args: str, state: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "DAMAGE_STATE_DIR": str(state), "COLUMNS": "400"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _register(c, name: str, tmp_path: Path) -> str:
    import model_registry as mr

    run_id = c.create_run(c.create_experiment(f"exp-{name}")).info.run_id
    f = tmp_path / f"{name}.onnx"
    f.write_bytes(b"x")
    return mr.register_candidate(c, name, run_id, f, None, {"mask/mAP50-95": 0.3}, {}, LINEAGE).version


# 1. `damage serve` right after `make demo`: no production yet
def test_serve_without_production_says_approve_or_serve_staging(tmp_path):
    state = tmp_path / "s"
    state.mkdir()
    c = sqlite_client(state)
    version = _register(c, "damage-seg", tmp_path)
    c.set_registered_model_alias("damage-seg", "staging", version)
    p = _damage("serve", "--port", "5999", state=state)
    assert p.returncode == 2 and "Traceback" not in p.stderr + p.stdout
    err = " ".join(p.stderr.split())
    assert "no version of 'damage-seg' holds the alias 'production' yet" in err
    assert f"damage registry approve damage-seg {version} --by YOU" in err
    assert "damage serve models:/damage-seg@staging" in err


def test_alias_hint_without_staging_or_model(tmp_path):
    from model_registry.uri import alias_hint

    c = sqlite_client(tmp_path)
    assert "no registered model 'ghost'" in alias_hint(c, "models:/ghost@production")
    v = _register(c, "lonely", tmp_path)
    hint = alias_hint(c, "models:/lonely@production")
    assert f"registered versions: {v}" in hint and f"damage serve models:/lonely/{v}" in hint
    c.set_registered_model_alias("lonely", "production", v)
    assert alias_hint(c, "models:/lonely@production") is None  # set: nothing to say
    assert alias_hint(c, "models:/lonely/1") is None and alias_hint(c, "runs:/abc/model") is None
