"""One scoring path for every server: MLflow's own ``/invocations`` logic on the version's pyfunc.

``damage serve`` (``mlflow models serve``) and the Ray Serve server (``damage.tasks.serving.ray_serve``)
answer a request with the same code: ``mlflow.pyfunc.scoring_server.invocations`` (content types,
the ``dataframe_split`` / ``dataframe_records`` / ``instances`` / ``inputs`` formats, the
signature's schema) around the registered pyfunc (``damage.tasks.serving.pyfunc_model.DamageSegModel``: row
limits, base64 and path rows, the header check of every image before it is decoded). So a
decompression bomb, a wrong schema or garbage is refused with the same status and body by both;
there is no second copy of a rule to drift.

What the Ray server adds sits around that call, never inside it:

* the loaded version's predictor is wrapped (``ObservedPredictor``) so the decoded images and
  their ``Prediction`` objects of one request are captured for monitoring and the shadow, without
  decoding twice; the predictor gets explicit threads (a replica must not take every core);
* every answer names the version that gave it (``X-Model-Version`` header and ``model_version``
  in the JSON body of a 200);
* ``canary_share``: the deterministic share of a request id that routes it to a canary.

Example:
    >>> slot = load_slot("3", Path("/cache/damage-seg/3"), threads=1)
    >>> res = score(slot, body, "application/json")
    >>> res.status, res.headers["X-Model-Version"]
    (200, '3')
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

VERSION_HEADER = "X-Model-Version"
REQUEST_ID_HEADER = "X-Request-Id"
_CAPTURE = threading.local()  # the (image, Prediction) rows of the request running in this thread


class ObservedPredictor:
    """A ``Predictor`` that records each decoded image and its prediction for the current request.

    Everything else is delegated, so the pyfunc uses it like the plain predictor (its thresholds,
    ``max_pixels`` for the header check, ...).
    """

    def __init__(self, predictor: Any):
        self.inner = predictor

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def predict(self, images: Any, *args: Any, **kwargs: Any) -> list:
        out = self.inner.predict(images, *args, **kwargs)
        rows = getattr(_CAPTURE, "rows", None)
        if rows is not None and isinstance(images, np.ndarray):
            rows.append((images, out[0]))
        return out


@dataclass
class Slot:
    """One loaded model version: the pyfunc (MLflow's scoring code calls it) and its predictor."""

    version: str
    model: Any  # mlflow.pyfunc.PyFuncModel
    schema: Any  # its input schema (what MLflow's server validates requests against)
    predictor: Any  # the version's damage.tasks.serving.predictor.Predictor (unwrapped)
    uri: str = ""
    loaded_at: float = field(default_factory=time.time)


def load_slot(version: str, local_dir: str | Path, threads: int = 1, uri: str = "") -> Slot:
    """Load a downloaded pyfunc version for serving (raises whatever loading raises).

    Args:
        version: the registry version (named in every answer).
        local_dir: the downloaded model folder (``MLmodel``, ``artifacts/``, ``code/``).
        threads: ONNX Runtime intra-op threads of this replica's predictor.
        uri: the URI it was resolved from (shown in ``/version``).
    """
    import mlflow.pyfunc

    from damage.tasks.serving.predictor import Predictor

    model = mlflow.pyfunc.load_model(str(local_dir))
    inner = model.unwrap_python_model()
    # the pyfunc opened its predictor with every core; reopen the same file with this replica's share
    predictor = Predictor(inner.predictor.path, threads=threads)
    inner.predictor = ObservedPredictor(predictor)
    return Slot(str(version), model, model.metadata.get_input_schema(), predictor, uri)


@dataclass
class Scored:
    """The answer to one request, and what monitoring needs of it."""

    status: int
    body: str
    mimetype: str
    headers: dict[str, str]
    rows: list[tuple[np.ndarray, Any]]  # (decoded image, Prediction) of each row that was scored
    latency_s: float
    error_kind: str | None = None  # bad_request | unsupported_media | server | row_error | None
    row_errors: int = 0


def _error_kind(status: int) -> str | None:
    if status == 415:
        return "unsupported_media"
    if 400 <= status < 500:
        return "bad_request"
    return "server" if status >= 500 else None


def score(slot: Slot, data: bytes, content_type: str | None, request_id: str = "") -> Scored:
    """Answer one ``POST /invocations`` with ``slot``, exactly as ``mlflow models serve`` would.

    The answer of a 200 gets ``"model_version"`` beside ``"predictions"`` (clients reading
    ``predictions`` are unaffected); every answer gets the ``X-Model-Version`` header.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc.scoring_server import invocations

    t0 = time.perf_counter()
    _CAPTURE.rows = rows = []
    try:
        r = invocations(data, content_type, slot.model, slot.schema)
        status, body, mime = r.status, r.response, r.mimetype
    except MlflowException as e:  # what mlflow's server turns into a JSON error (_async_catch_mlflow_exception)
        status, body, mime = e.get_http_status_code(), e.serialize_as_json(), "application/json"
    except Exception:  # mlflow's server answers these with a bare 500 as well
        status, body, mime = 500, "Internal Server Error", "text/plain"
    finally:
        _CAPTURE.rows = None
    row_errors = 0
    if status == 200 and body.startswith("{"):
        row_errors = body.count('"error": ')
        body = '{"model_version": ' + json.dumps(slot.version) + ", " + body[1:]
    headers = {VERSION_HEADER: slot.version}
    if request_id:
        headers[REQUEST_ID_HEADER] = request_id
    kind = _error_kind(status) or ("row_error" if row_errors else None)
    return Scored(status, body, mime, headers, rows, time.perf_counter() - t0, kind, row_errors)


def canary_share(request_id: str) -> float:
    """A request id's place in [0, 1): the canary answers when it is below the canary's weight.

    A hash, not a random draw: a client retrying with the same ``X-Request-Id`` reaches the same
    version, and a test can replay a split.

    >>> canary_share("abc") == canary_share("abc")
    True
    """
    return int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big") / 2.0 ** 64


def image_measures(image: np.ndarray) -> dict[str, float]:
    """The data gate's per-image profile columns of one decoded (BGR or grey) image."""
    import cv2

    from damage.tasks.validation.measures import grey_measures

    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 and image.shape[2] == 3 else image
    if grey.ndim == 3:
        grey = grey[..., 0]
    _, blur, brightness, contrast = grey_measures(np.ascontiguousarray(grey))
    return {"width": float(image.shape[1]), "height": float(image.shape[0]), "brightness": brightness,
            "blur": blur, "contrast": contrast}


def request_summary(res: Scored, version: str) -> dict[str, Any]:
    """What one answered request contributes to a monitoring window (small: no pixels)."""
    images, classes, scores, damage = [], {}, [], []
    for image, pred in res.rows:
        images.append(image_measures(image))
        for inst in pred.instances:
            classes[inst.name] = classes.get(inst.name, 0) + 1
            scores.append(round(float(inst.score), 4))
        damage += [round(float(v["damage_percent"]), 3) for v in pred.damage.vehicles]
    return {"version": version, "status": res.status, "error_kind": res.error_kind, "row_errors": res.row_errors,
            "latency_s": res.latency_s, "images": images, "classes": classes, "scores": scores,
            "damage_percent": damage}
