"""Packaging: the pinned versions, the installs that use them, and a wheel that works without the checkout."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements() -> list[Requirement]:
    return [Requirement(r) for r in PROJECT["dependencies"]
            + [r for extra in PROJECT["optional-dependencies"].values() for r in extra]]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_constraints_pin_every_direct_dependency_inside_its_range():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, ver = line.partition("==")
            pins[_norm(name)] = ver.strip()
    for req in _requirements():
        assert _norm(req.name) in pins, f"constraints.txt does not pin {req.name}"
        assert req.specifier.contains(pins[_norm(req.name)], prereleases=True), \
            f"constraints.txt pins {req.name}=={pins[_norm(req.name)]} outside pyproject's {req.specifier}"
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    assert set(pins) == {_norm(r.name) for r in _requirements()}, "constraints.txt pins a non-direct dependency"


def test_runtime_imports_are_runtime_dependencies_and_server_packages_an_extra():
    runtime = {_norm(Requirement(r).name) for r in PROJECT["dependencies"]}
    assert {"pycocotools", "matplotlib", "pillow"} <= runtime
    assert "psycopg2-binary" not in runtime and not any("[auth]" in r for r in PROJECT["dependencies"])
    server = {Requirement(r).name: Requirement(r) for r in PROJECT["optional-dependencies"]["server"]}
    assert "psycopg2-binary" in server and "auth" in server["mlflow"].extras
    for name in ("pandas", "typer", "onnxslim", "rich"):  # majors that broke or may
        req = next(r for r in _requirements() if _norm(r.name) == name)
        assert any(s.operator == "<" for s in req.specifier), f"{name} has no upper bound"


def test_every_install_uses_the_constraints():
    make = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt -e '.[dev,server]'" in make
    docker = (ROOT / "infra" / "Dockerfile").read_text()
    assert "-c constraints.txt" in docker and " -e " not in docker  # a plain install: configs ship in the wheel


def test_wheel_installs_and_runs_without_the_checkout(tmp_path, tiny_dataset):
    """Build the wheel from a copy of the sources, install it (no deps) into a fresh venv that borrows
    this environment's packages, and run ``damage --help`` and ``damage validate`` from elsewhere."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for d in ("flows", "tasks", "model_registry", "expectations", "configs"):
        shutil.copytree(ROOT / d, src / d, ignore=ignore)
    for f in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / f, src / f)
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}

    def run(*cmd, **kw):
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=600, **kw)
        return r

    r = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
            "-w", tmp_path / "dist", src)
    assert r.returncode == 0, r.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("damage-*.whl"))
    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", "--without-pip", venv).returncode == 0
    py = venv / "bin" / "python"
    site = Path(run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    # borrow torch & co. from this environment (appended after the venv's own site-packages; the
    # editable install's finder is a .pth of that folder, which a path line does not run)
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = run(sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q", wheel)
    assert r.returncode == 0, r.stderr[-3000:]

    work = tmp_path / "elsewhere"
    work.mkdir()
    env["DAMAGE_STATE_DIR"] = str(tmp_path / "state")
    r = run(py, "-c", "import damage.tasks.core.config as c; print(c.__file__); print(c.DEFAULT_CONFIG.is_file())", cwd=work)
    where, found = r.stdout.split()
    assert where.startswith(str(site)) and found == "True", r.stdout + r.stderr  # the wheel's code and config
    r = run(venv / "bin" / "damage", "--help", cwd=work)
    assert r.returncode == 0 and "validate" in r.stdout, r.stdout + r.stderr
    r = run(venv / "bin" / "damage", "validate", tiny_dataset, "--set", "validate.workers=1", cwd=work)
    # the synthetic set passes the gate (tests/data/test_validate_cli.py): 0, not "0 or 1"
    assert r.returncode == 0 and "images" in r.stdout and "report:" in r.stdout, r.stdout + r.stderr[-3000:]


@pytest.mark.parametrize("name", ["default.yaml", "demo.yaml"])
def test_configs_are_package_data(name):
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "configs" in data["packages"]["find"]["include"] and (ROOT / "configs" / name).is_file()
    assert data["package-data"]["configs"] == ["*.yaml"]
