"""MLflow pyfunc wrapper: the ONNX file as an artifact, the torch-free predictor as code.

``mlflow models serve -m models:/damage-seg@production --env-manager local`` then answers
``POST /invocations`` with a DataFrame of images, one column of:

* ``image``: the encoded image file (JPEG/PNG...) as base64, or
* ``path``: a file under ``$DAMAGE_SERVING_PATH_ROOT`` on the server. Off unless that variable
  names a folder: then only files inside it are read, and a missing, unreadable or outside
  path all get the same error text (the response must not map the server's disk).

Limits (hostile requests): at most ``$DAMAGE_SERVING_MAX_ROWS`` rows per request (default
16), each image's pixel count checked from its header before decoding (the predictor's
``max_pixels``: ``damage.max_pixels`` of the ONNX metadata), at most ``max_det`` instances per
image, masks kept cropped to their box.

optionally with ``"params": {"conf": C, "iou": I}`` (negative or absent = the thresholds in the
ONNX metadata), and returns one JSON document per row, the schema of ``damage predict``
(``Prediction.to_dict`` in ``tasks/serving/predictor.py``); a row that cannot be decoded gets
``{"image": ..., "error": "..."}`` instead.

Example request::

    {"dataframe_split": {"columns": ["image"], "data": [["iVBORw0KGgo..."]]}}
"""

from __future__ import annotations

import ast
import base64
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc

# The predictor and what it imports: shipped with the model so serving needs only these files.
# They ship as the package ``damage_serving``, not ``tasks``: loading the model prepends its code folder
# to ``sys.path`` for good (and multiprocessing's spawn hands that path to children), so a shipped
# ``tasks`` would shadow the caller's own package (``No module named 'damage.tasks.core.secrets'``).
SHIPPED_PACKAGE = "damage_serving"
CODE_FILES = ("__init__.py", "core/__init__.py", "core/atomic.py", "core/errors.py", "core/images.py", "core/quiet.py",
              "serving/__init__.py", "serving/backends.py", "serving/damage_percent.py", "serving/mask_decode.py",
              "serving/metadata.py", "serving/predictor.py", "serving/pyfunc.py", "serving/slicing.py")
_TASKS = Path(__file__).resolve().parents[1]
MODEL_CODE = Path(__file__).with_name("pyfunc_code.py")  # models-from-code: no pickled Python object


def input_example():
    """One row with a tiny encoded PNG: ``mlflow models serve`` and the UI show it as the request."""
    import cv2
    import numpy as np
    import pandas as pd

    ok, png = cv2.imencode(".png", np.full((32, 32, 3), 127, np.uint8))
    return pd.DataFrame({"image": [base64.b64encode(png.tobytes()).decode()]})


PATH_ROOT_ENV = "DAMAGE_SERVING_PATH_ROOT"
MAX_ROWS_ENV = "DAMAGE_SERVING_MAX_ROWS"
DEFAULT_MAX_ROWS = 16
# One text for every refused path (off, missing, outside, unreadable): the response must not map the disk.
PATH_ERROR = (f"row path: not readable here (the 'path' column is off unless ${PATH_ROOT_ENV} names a folder "
              f"on the server, and then reads only image files under it)")
INPUT_COLUMNS = ("image", "path")


def _max_rows() -> int:
    try:
        return max(1, int(os.environ.get(MAX_ROWS_ENV, DEFAULT_MAX_ROWS)))
    except ValueError:
        return DEFAULT_MAX_ROWS


def _allowed_path(path: str) -> Path | None:
    """``path`` resolved inside ``$DAMAGE_SERVING_PATH_ROOT`` and a regular file, else None."""
    root = os.environ.get(PATH_ROOT_ENV)
    if not root:
        return None
    try:
        base = Path(root).resolve(strict=True)
        p = (base / path).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        return None
    return p if p.is_relative_to(base) and p.is_file() and os.access(p, os.R_OK) else None


class DamageSegModel(mlflow.pyfunc.PythonModel):
    """Pyfunc model around ``damage.tasks.serving.predictor.Predictor`` (thresholds from the ONNX metadata)."""

    def load_context(self, context) -> None:
        from damage.tasks.serving.predictor import Predictor

        self.onnx_name = Path(context.artifacts["onnx"]).name
        self.predictor = Predictor(context.artifacts["onnx"])

    def _decode(self, row: dict[str, Any]):
        from damage.tasks.core.errors import DamageError
        from damage.tasks.serving.predictor import decode_image

        b64 = row.get("image")
        if isinstance(b64, str) and b64:
            try:
                data = base64.b64decode(b64, validate=False)
            except (ValueError, TypeError) as e:
                raise DamageError(f"row image: not base64: {e}") from e
            return "<base64>", decode_image(data, self.predictor.max_pixels, "row image")
        path = row.get("path")
        if isinstance(path, str) and path:
            p = _allowed_path(path)
            if p is None:
                raise DamageError(PATH_ERROR)
            try:
                data = p.read_bytes()
            except OSError:
                raise DamageError(PATH_ERROR) from None
            return path, decode_image(data, self.predictor.max_pixels, f"row path '{path}'")
        raise DamageError("row has neither an 'image' (base64) nor a 'path' value")

    @staticmethod
    def _threshold(params: dict, key: str, default: float) -> float:
        from damage.tasks.core.errors import DamageError

        v = params.get(key)
        if v is None or float(v) < 0:
            return default
        if not 0 <= float(v) <= 1:
            raise DamageError(f"param '{key}' must be in [0, 1] (negative = the model's), got {v}")
        return float(v)

    def predict(self, context, model_input, params=None) -> list[dict[str, Any]]:
        """One JSON-ready dict per input row (see the module docstring)."""
        from damage.tasks.core.errors import DamageError

        columns = getattr(model_input, "columns", None)
        if columns is not None and not set(INPUT_COLUMNS) & set(columns):
            # MLflow drops columns the signature does not name, so a misspelt column arrives as none at all:
            # answer 400 naming the expected ones instead of 200 with an empty list
            from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

            raise MlflowException("the request has no 'image' column (base64 of an encoded image) and no 'path' "
                                  "column; send e.g. {\"dataframe_split\": {\"columns\": [\"image\"], "
                                  "\"data\": [[\"<base64>\"]]}}", error_code=INVALID_PARAMETER_VALUE)
        rows = model_input.to_dict(orient="records") if hasattr(model_input, "to_dict") else list(model_input)
        if len(rows) > _max_rows():
            raise DamageError(f"request has {len(rows)} rows; at most {_max_rows()} per request "
                              f"(${MAX_ROWS_ENV})")
        p = self.predictor
        params = params or {}
        conf, iou = self._threshold(params, "conf", p.conf), self._threshold(params, "iou", p.iou)
        out = []
        for row in rows:
            name = row["path"] if isinstance(row.get("path"), str) else "<base64>"
            try:
                name, im = self._decode(row)
                res = p.predict(im, conf=conf, iou=iou)[0]
                out.append(res.to_dict(name, self.onnx_name, conf, iou))
            except DamageError as e:
                out.append({"image": str(name), "error": str(e)})
        return out


_TASKS_IMPORT = re.compile(r"^(\s*)(from|import)(\s+)damage\.tasks(?=[.\s])", re.MULTILINE)


def _shipped_imports(tree: ast.AST) -> set[str]:
    """Top-level package names imported (absolute imports) in a parsed module."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _stage_code(dst: Path) -> Path:
    """Copy ``CODE_FILES`` into ``dst/damage_serving``, their ``tasks`` imports renamed to match."""
    from damage.tasks.core.errors import DamageError

    pkg = dst / SHIPPED_PACKAGE
    for name in CODE_FILES:
        src, out = _TASKS / name, pkg / name
        text = _TASKS_IMPORT.sub(rf"\1\2\3{SHIPPED_PACKAGE}", src.read_text(encoding="utf-8"))
        if "damage" in _shipped_imports(ast.parse(text, str(src))):
            raise DamageError(f"{src}: imports 'damage' in a form the pyfunc staging cannot rename "
                              f"(use 'from damage.tasks.x import y')")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
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
        from damage.tasks.core.errors import DamageError

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
