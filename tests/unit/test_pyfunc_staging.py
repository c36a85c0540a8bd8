"""The predictor code shipped inside the pyfunc model is a complete package named ``damage_serving``:
the import closure of the served model (``shipped_files``), copied unchanged. MLflow puts the model's
code folder first on ``sys.path`` when it loads the model, so a shipped ``tasks`` would shadow the
caller's own package."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest


def _imported_tops(tree: ast.AST) -> set[str]:
    tops = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    return tops


def test_staged_code_is_a_complete_package_that_shadows_nothing(tmp_path):
    from damage.tasks.serving.pyfunc import _TASKS, SHIPPED_PACKAGE, _stage_code, shipped_files

    files = shipped_files()
    # the closure of the served model: the predictor and what it reaches, and nothing of training or tracking
    assert {"__init__.py", "serving/__init__.py", "serving/pyfunc_model.py", "serving/predictor.py",
            "serving/slicing.py", "core/errors.py", "core/images.py"} <= set(files)
    assert not {"serving/pyfunc.py", "core/tracking.py", "core/config.py"} & set(files)
    pkg = _stage_code(tmp_path)
    assert pkg == tmp_path / SHIPPED_PACKAGE and [p.name for p in tmp_path.iterdir()] == [SHIPPED_PACKAGE]
    assert sorted(str(p.relative_to(pkg)) for p in pkg.rglob("*.py")) == files
    for f in files:  # copied byte for byte: nothing renamed
        assert (pkg / f).read_bytes() == (_TASKS / f).read_bytes(), f
        assert not {"damage", "tasks"} & _imported_tops(ast.parse((pkg / f).read_text())), f
    # the shipped package imports and builds its model class with `damage` unimportable
    probe = ("import sys; sys.modules['damage'] = None; "
             f"sys.path.insert(0, {str(tmp_path)!r}); "
             "from damage_serving.serving.pyfunc_model import DamageSegModel; "
             "from damage_serving.serving.predictor import Predictor, decode_image; "
             "import damage_serving.core.images, damage_serving.serving.damage_percent; "
             "print(DamageSegModel.__module__)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "damage_serving.serving.pyfunc_model"


def _tree(root, files: dict[str, str]):
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_closure_follows_relative_imports_lazy_ones_too(tmp_path):
    from damage.tasks.serving.pyfunc import shipped_files

    root = _tree(tmp_path, {"__init__.py": "", "serving/__init__.py": "", "core/__init__.py": "",
                            "serving/m.py": "from .a import f\ndef g():\n    from ..core import e\n",
                            "serving/a.py": "import os\nfrom . import b\n", "serving/b.py": "x = 1\n",
                            "core/e.py": "import numpy\n", "core/unused.py": "from damage.tasks import x\n"})
    assert shipped_files(root, "serving/m.py") == ["__init__.py", "core/__init__.py", "core/e.py",
                                                   "serving/__init__.py", "serving/a.py", "serving/b.py",
                                                   "serving/m.py"]


@pytest.mark.parametrize("line", ["import os, damage", "from damage.tasks.core.errors import DamageError",
                                  "import tasks.core", "from ..nowhere import x", "from ...up import x"])
def test_closure_refuses_what_would_not_run_as_the_shipped_package(tmp_path, line):
    from damage.tasks.core.errors import DamageError
    from damage.tasks.serving.pyfunc import shipped_files

    root = _tree(tmp_path, {"__init__.py": "", "serving/__init__.py": "",
                            "serving/m.py": "from .a import f\n", "serving/a.py": f"def f():\n    {line}\n"})
    with pytest.raises(DamageError, match=r"serving/a\.py:2: "):
        shipped_files(root, "serving/m.py")
