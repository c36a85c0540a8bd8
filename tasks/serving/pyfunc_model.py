"""The served MLflow pyfunc model: request rows in, the torch-free predictor's documents out.

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

This module and everything it imports ship inside every registered model as the package
``damage_serving`` (``damage.tasks.serving.pyfunc.shipped_files``: the import closure of this file). So
it, and each module it reaches, imports the project only relatively (``from .predictor import ...``,
``from ..core.errors import ...``): the same files run as ``damage.tasks`` here and as ``damage_serving``
in the model's code folder, copied unchanged. An absolute ``damage`` import in the closure fails the save.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import mlflow.pyfunc

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
        from .predictor import Predictor

        self.onnx_name = Path(context.artifacts["onnx"]).name
        self.predictor = Predictor(context.artifacts["onnx"])

    def _decode(self, row: dict[str, Any]):
        from ..core.errors import DamageError
        from .predictor import decode_image

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
    def _threshold(params: dict, key: str, default: float | None) -> float | None:
        from ..core.errors import DamageError

        v = params.get(key)
        if v is None or float(v) < 0:
            return default
        if not 0 <= float(v) <= 1:
            raise DamageError(f"param '{key}' must be in [0, 1] (negative = the model's), got {v}")
        return float(v)

    def predict(self, context, model_input, params=None) -> list[dict[str, Any]]:
        """One JSON-ready dict per input row (see the module docstring)."""
        from ..core.errors import DamageError

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
        # no conf param: the predictor's own per image (sliced photos have theirs, damage.sliced_conf)
        conf, iou = self._threshold(params, "conf", None), self._threshold(params, "iou", p.iou)
        out = []
        for row in rows:
            name = row["path"] if isinstance(row.get("path"), str) else "<base64>"
            try:
                name, im = self._decode(row)
                res = p.predict(im, conf=conf, iou=iou)[0]
                used = conf if conf is not None else p.conf_for(*im.shape[:2])
                out.append(res.to_dict(name, self.onnx_name, used, iou))
            except DamageError as e:
                out.append({"image": str(name), "error": str(e)})
        return out
