"""Saving the MLflow pyfunc: the ONNX file as an artifact, the torch-free predictor as code.

The served model itself is ``damage.tasks.serving.pyfunc_model`` (the request format is in its
docstring). It ships with every saved model as the package ``damage_serving``: the import closure of
``pyfunc_model.py`` inside ``tasks`` (``shipped_files``), copied unchanged into the model's code
folder. The modules of that closure import each other relatively, so nothing is renamed and nothing is
listed by hand; an absolute ``damage`` import there is refused when saving (the served model must run
without this project installed).
"""

from __future__ import annotations

import ast
import base64
import shutil
import tempfile
from pathlib import Path

import mlflow.pyfunc

from damage.tasks.core.errors import DamageError
from damage.tasks.serving.pyfunc_model import INPUT_COLUMNS

# The shipped package's name, not ``tasks``: loading the model prepends its code folder to ``sys.path``
# for good (and multiprocessing's spawn hands that path to children), so a shipped ``tasks`` would shadow
# the caller's own package (``No module named 'damage.tasks.core.secrets'``).
SHIPPED_PACKAGE = "damage_serving"
_TASKS = Path(__file__).resolve().parents[1]
SERVED_MODULE = "serving/pyfunc_model.py"  # relative to _TASKS: the closure starts here
MODEL_CODE = Path(__file__).with_name("pyfunc_code.py")  # models-from-code: no pickled Python object


def input_example():
    """One row with a tiny encoded PNG: ``mlflow models serve`` and the UI show it as the request."""
    import cv2
    import numpy as np
    import pandas as pd

    ok, png = cv2.imencode(".png", np.full((32, 32, 3), 127, np.uint8))
    return pd.DataFrame({"image": [base64.b64encode(png.tobytes()).decode()]})


def _module_file(root: Path, parts: list[str]) -> Path | None:
    """``root/a/b.py`` or ``root/a/b/__init__.py`` for module parts ``[a, b]``, else None."""
    f = root.joinpath(*parts).with_suffix(".py") if parts else None
    if f is not None and f.is_file():
        return f
    init = root.joinpath(*parts, "__init__.py")
    return init if init.is_file() else None


def shipped_files(root: Path | None = None, entry: str = SERVED_MODULE) -> list[str]:
    """The files (relative to ``root``, default ``tasks/``) the served model needs: ``entry`` and every
    module it imports relatively, transitively (function-level imports too), with each package's
    ``__init__.py`` on the way.

    Raises:
        DamageError: a file of the closure imports ``damage`` (or ``tasks``) absolutely, or a relative
            import leaves ``root`` or names no file: the shipped package would not run on its own.
    """
    root = Path(root or _TASKS)
    todo, seen = [entry], set()
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        src = root / rel
        pkg = list(Path(rel).parent.parts)
        for i in range(len(pkg) + 1):  # the package __init__ files from the root down
            init = "/".join([*pkg[:i], "__init__.py"])
            if (root / init).is_file() and init not in seen:
                todo.append(init)
        for node in ast.walk(ast.parse(src.read_text(encoding="utf-8"), str(src))):
            if isinstance(node, ast.Import):
                tops = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                tops = {(node.module or "").split(".")[0]}
            elif isinstance(node, ast.ImportFrom):
                if node.level - 1 > len(pkg):
                    raise DamageError(f"{src}:{node.lineno}: relative import leaves the shipped package")
                base = pkg[:len(pkg) - node.level + 1] + (node.module.split(".") if node.module else [])
                targets = [_module_file(root, base)] if node.module else []
                # `from . import x` / `from .m import x`: x may itself be a module
                targets += [_module_file(root, base + [a.name]) for a in node.names]
                found = [t for t in targets if t is not None]
                if not found:
                    raise DamageError(f"{src}:{node.lineno}: relative import of a module not in {root}")
                todo += [t.relative_to(root).as_posix() for t in found]
                continue
            else:
                continue
            if tops & {"damage", "tasks"}:
                raise DamageError(f"{src}:{node.lineno}: imports the project absolutely; the served model's "
                                  f"modules import each other relatively (from .x / ..core.x import y), so they "
                                  f"run as the shipped '{SHIPPED_PACKAGE}' package too")
    return sorted(seen)


def _stage_code(dst: Path) -> Path:
    """Copy ``shipped_files()`` unchanged into ``dst/damage_serving``."""
    pkg = dst / SHIPPED_PACKAGE
    for name in shipped_files():
        out = pkg / name
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_TASKS / name, out)
    return pkg


def signature():
    """The model's signature: ``image`` or ``path`` in, ``conf``/``iou`` params, and per row the document of
    ``Prediction.to_dict`` out (``instances``/``vehicles`` are lists of objects; ``error`` on a bad row)."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

    out = [ColSpec("string", "image"), ColSpec("long", "width", required=False),
           ColSpec("long", "height", required=False), ColSpec("string", "model", required=False),
           ColSpec("double", "conf", required=False), ColSpec("double", "iou", required=False),
           ColSpec(AnyType(), "instances", required=False), ColSpec(AnyType(), "vehicles", required=False),
           ColSpec("double", "damage_percent", required=False), ColSpec("string", "note", required=False),
           ColSpec("string", "error", required=False)]
    return ModelSignature(inputs=Schema([ColSpec("string", c, required=False) for c in INPUT_COLUMNS]),
                          outputs=Schema(out),
                          params=ParamSchema([ParamSpec("conf", "double", -1.0), ParamSpec("iou", "double", -1.0)]))


def save_pyfunc(onnx_path: Path, path: Path) -> Path:
    """Write the pyfunc model directory (MLmodel, the ONNX artifact, the predictor code) to ``path``."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise DamageError(f"{onnx_path}: ONNX model not found")
    sig = signature()
    with tempfile.TemporaryDirectory() as tmp:
        code = _stage_code(Path(tmp))
        mlflow.pyfunc.save_model(
            path=str(path),
            python_model=str(MODEL_CODE),
            artifacts={"onnx": str(onnx_path)},
            code_paths=[str(code)],
            signature=sig,
            input_example=input_example(),
            pip_requirements=["numpy", "opencv-python", "onnxruntime", "pandas", "pillow",
                              f"mlflow=={mlflow.__version__}"],
        )
    return Path(path)


def log_pyfunc(client_or_run_id, onnx_path: Path, artifact_path: str = "pyfunc", run_id: str | None = None) -> str:
    """Log the pyfunc model into an existing run without making it the active run.

    Args:
        client_or_run_id: a run id (uses ``damage.tasks.core.tracking.client()``), or an ``MlflowClient``
            together with ``run_id``.
        onnx_path: the exported model.
        artifact_path: folder of the model inside the run's artifacts.
        run_id: the run, when the first argument is a client.

    Returns:
        The model URI ``runs:/<run_id>/<artifact_path>`` (for ``mlflow.register_model`` or
        ``mlflow models serve -m``).

    Example:
        >>> uri = log_pyfunc(run_id, Path("best.onnx"))
        >>> mlflow.register_model(uri, "damage-seg")
    """
    from damage.tasks.core import tracking
    if isinstance(client_or_run_id, str):
        c, rid = tracking.client(), client_or_run_id
    else:
        c, rid = client_or_run_id, run_id
        if not rid:
            raise ValueError("log_pyfunc: pass run_id together with a client")
    with tempfile.TemporaryDirectory() as tmp:
        local = save_pyfunc(Path(onnx_path), Path(tmp) / artifact_path)
        c.log_artifacts(rid, str(local), artifact_path)
    return f"runs:/{rid}/{artifact_path}"
