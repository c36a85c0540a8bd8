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
    assert "-c constraints.txt -e '.[dev,server,ray]'" in make
    docker = (ROOT / "infra" / "Dockerfile").read_text()
    assert "-c constraints.txt" in docker and " -e " not in docker  # a plain install: configs ship in the wheel


COEXIST = ("model-registry", "tasks")  # PyPI distributions whose import names the old layout took


def _build_wheel_venv(tmp_path: Path, env: dict[str, str]):
    """Build the wheel from a copy of the sources and install it (no deps) into a fresh venv that borrows this
    environment's packages (appended after the venv's own site-packages; the editable install's finder is a
    .pth of that folder, which a path line does not run). Returns (run, venv python, venv site-packages)."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for d in ("damage", "flows", "tasks", "model_registry", "expectations", "configs"):
        shutil.copytree(ROOT / d, src / d, ignore=ignore)
    for f in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / f, src / f)

    def run(*cmd, **kw):
        return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=600, **kw)

    r = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
            "-w", tmp_path / "dist", src)
    assert r.returncode == 0, r.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("vehicle_damage_factory-*.whl"))
    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", "--without-pip", venv).returncode == 0
    py = venv / "bin" / "python"
    site = Path(run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = run(sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q", wheel)
    assert r.returncode == 0, r.stderr[-3000:]
    return run, venv, site


def test_wheel_holds_one_top_level_package(tmp_path):
    """Every import is under ``damage``: a wheel that installed top-level tasks/flows/... would overwrite (or be
    overwritten by) the PyPI distributions of those names."""
    import zipfile

    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    _build_wheel_venv(tmp_path, env)  # built from a copy: a build in the checkout would leave build/ there
    names = zipfile.ZipFile(next((tmp_path / "dist").glob("vehicle_damage_factory-*.whl"))).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"damage"}, tops
    assert {"damage/configs/default.yaml", "damage/expectations/suites/image.json",
            "damage/tasks/core/config.py"} <= set(names)


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"damage." + p.parent.relative_to(ROOT).as_posix().replace("/", ".")
             for pkg in ("tasks", "flows", "model_registry", "expectations") for p in (ROOT / pkg).rglob("__init__.py")}
    assert found <= listed, f"package folders missing from [tool.setuptools] packages: {sorted(found - listed)}"


def test_wheel_installs_and_runs_without_the_checkout(tmp_path, tiny_dataset):
    """The wheel in a fresh venv, run from elsewhere: ``damage --help`` and ``damage validate``."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    run, venv, site = _build_wheel_venv(tmp_path, env)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env["DAMAGE_STATE_DIR"] = str(tmp_path / "state")
    r = run(venv / "bin" / "python", "-c", "import damage.tasks.core.config as c; print(c.__file__); "
            "print(c.DEFAULT_CONFIG.is_file())", cwd=work)
    where, found = r.stdout.split()
    assert where.startswith(str(site)) and found == "True", r.stdout + r.stderr  # the wheel's code and config
    r = run(venv / "bin" / "damage", "--help", cwd=work)
    assert r.returncode == 0 and "validate" in r.stdout, r.stdout + r.stderr
    r = run(venv / "bin" / "damage", "validate", tiny_dataset, "--set", "validate.workers=1", cwd=work)
    # the tiny synthetic set is clean: exit 0, with the gate's summary and report path
    assert r.returncode == 0 and "images" in r.stdout and "report:" in r.stdout, r.stdout + r.stderr[-3000:]


def _download_coexisting(dest: Path) -> list[Path]:
    """The wheels of ``COEXIST`` from the package index (no deps), or skip when the index cannot be reached."""
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                        "-d", dest, *COEXIST], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        pytest.skip(f"the package index is unreachable, so {COEXIST} cannot be fetched: {r.stderr[-300:]}")
    return sorted(dest.glob("*.whl"))


def _coexisting_venv(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    others = _download_coexisting(tmp_path / "others")
    run, venv, site = _build_wheel_venv(tmp_path, env)
    r = run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps", "--no-index",
            "-q", *others)
    assert r.returncode == 0, r.stderr[-3000:]
    return run, venv, site, env


def test_installs_beside_the_pypi_distributions_named_tasks_and_model_registry(tmp_path):
    """``model-registry`` (Kubeflow's client, imports as model_registry) and ``tasks`` install beside the wheel;
    each import name resolves to its own distribution's files, and ``damage`` still works."""
    run, venv, site, env = _coexisting_venv(tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env["DAMAGE_STATE_DIR"] = str(tmp_path / "state")
    probe = ("import importlib.util as u, json; print(json.dumps({n: u.find_spec(n).origin for n in "
             "('model_registry', 'tasks', 'damage.model_registry', 'damage.tasks')}))")
    r = run(venv / "bin" / "python", "-c", probe, cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    origin = json.loads(r.stdout)
    assert origin["damage.model_registry"].startswith(str(site / "damage" / "model_registry"))
    assert origin["damage.tasks"].startswith(str(site / "damage" / "tasks"))
    assert origin["model_registry"].startswith(str(site / "model_registry")), origin  # Kubeflow's, untouched
    assert not origin["tasks"].startswith(str(site / "damage")), origin
    r = run(venv / "bin" / "damage", "--help", cwd=work)
    assert r.returncode == 0 and "registry" in r.stdout, r.stdout + r.stderr


@pytest.mark.slow
def test_demo_runs_in_a_venv_beside_tasks_and_model_registry(tmp_path):
    """The whole nightly (``damage run --demo``, one epoch) from the wheel, beside the two PyPI distributions."""
    run, venv, site, env = _coexisting_venv(tmp_path)
    env["DAMAGE_STATE_DIR"] = str(tmp_path / "state")
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_HOME", None)
    r = subprocess.run([str(venv / "bin" / "damage"), "run", "--demo", "--set", "train.epochs=1",
                        "--set", "train.time_min=null"], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=1800)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    assert "version" in r.stdout.lower()


@pytest.mark.parametrize("name", ["default.yaml", "demo.yaml"])
def test_configs_are_package_data(name):
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "damage.configs" in data["packages"] and data["package-dir"]["damage.configs"] == "configs"
    assert (ROOT / "configs" / name).is_file() and data["package-data"]["damage.configs"] == ["*.yaml"]
