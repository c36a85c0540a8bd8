"""The predictor code shipped inside the pyfunc model is a complete package named ``damage_serving``:
MLflow puts the model's code folder first on ``sys.path`` when it loads the model, so a shipped
``tasks`` would shadow the caller's own package."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest


def test_staged_code_is_a_complete_package_that_shadows_nothing(tmp_path):
    from damage.tasks.serving.pyfunc import CODE_FILES, SHIPPED_PACKAGE, _shipped_imports, _stage_code

    pkg = _stage_code(tmp_path)
    assert pkg == tmp_path / SHIPPED_PACKAGE and [p.name for p in tmp_path.iterdir()] == [SHIPPED_PACKAGE]
    assert sorted(str(p.relative_to(pkg)) for p in pkg.rglob("*.py")) == sorted(CODE_FILES)
    for f in pkg.rglob("*.py"):
        assert "damage" not in _shipped_imports(ast.parse(f.read_text())), f
    # the shipped package imports and builds its model class with `damage` unimportable
    probe = ("import sys; sys.modules['damage'] = None; "
             f"sys.path.insert(0, {str(tmp_path)!r}); "
             "from damage_serving.serving.pyfunc import DamageSegModel; "
             "from damage_serving.serving.predictor import Predictor, decode_image; "
             "import damage_serving.core.images, damage_serving.serving.damage_percent; "
             "print(DamageSegModel.__module__)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "damage_serving.serving.pyfunc"


def test_staging_refuses_an_import_form_it_cannot_rename(tmp_path, monkeypatch):
    import damage.tasks.serving.pyfunc as pf
    from damage.tasks.core.errors import DamageError

    src = tmp_path / "src"
    (src / "serving").mkdir(parents=True)
    (src / "serving" / "x.py").write_text("import os, damage\n")
    monkeypatch.setattr(pf, "_TASKS", src)
    monkeypatch.setattr(pf, "CODE_FILES", ("serving/x.py",))
    with pytest.raises(DamageError, match=r"x\.py: imports 'damage'"):
        pf._stage_code(tmp_path / "out")
