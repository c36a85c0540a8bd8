"""Distributed batch inference on Ray Data: ``damage predict --ray``.

The image list (paths, or ``s3://`` keys listed on the driver) becomes a Ray Dataset; ``map_batches`` runs it
through a pool of actors, each holding one ONNX predictor built once with an explicit thread count. Each
actor reads its images itself (a worker on a cluster reads S3 directly; nothing is copied to the driver
first), and returns per image exactly what the single-process path writes: ``one_image.predict_source`` is
the one function both call. The model travels through Ray's object store and is checked against its SHA-256
on every worker, so a cluster node needs no shared filesystem.

A worker that dies mid-batch is restarted and the batch retried (``max_restarts``/``max_task_retries``):
results are only returned for whole batches, so an image is never lost or counted twice; an image that
fails by itself (unreadable, too large) is an error row, not a retry.

Example:
    >>> rows = predict_on_ray(Path("best.onnx"), ["s3://claims/a.jpg"], PredictorSettings(), RayConfig(),
    ...                       model_label="best.onnx", overlay=False)
    >>> sorted(rows)[0]
    's3://claims/a.jpg'
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from damage.tasks.core.errors import DamageError
from damage.tasks.scale.ray_runtime import S3_ENV, apply_worker_threads, forwarded_env, require_ray
from damage.tasks.scale.shards import MAX_RETRIES, ShippedFile, plan_workers

if TYPE_CHECKING:
    from damage.tasks.core.config import RayConfig


@dataclass(frozen=True)
class PredictorSettings:
    """What ``Predictor`` is built with on each worker (the CLI's options after config defaults)."""

    conf: float | None = None
    iou: float | None = None
    backend: str = "onnxruntime"
    slices: Any = None  # the predictor's ``slices=`` (None = the model's metadata)
    config_slices: Any = None  # applied when the model records no slicing choice and none was asked
    kwargs: dict[str, Any] = field(default_factory=dict)  # spinning, cache_optimized, openvino_precision


@dataclass(frozen=True)
class BatchResult:
    """One image's outcome: the JSON document (``error`` in it when it failed) and the PNG overlay."""

    source: str
    doc: dict[str, Any]
    png: bytes | None

    @property
    def failed(self) -> bool:
        return "error" in self.doc


def build_predictor(model: Path, settings: PredictorSettings, threads: int) -> Any:
    """The predictor of one worker (or of the single-process path): ``settings`` with ``threads`` threads."""
    from damage.tasks.serving.predictor import Predictor
    from damage.tasks.serving.slicing import parse_slices

    pred = Predictor(model, conf=settings.conf, iou=settings.iou, backend=settings.backend, threads=threads,
                     slices=settings.slices, **settings.kwargs)
    if settings.slices is None and settings.config_slices is not None and "damage.slices" not in pred.metadata:
        pred.slices = parse_slices(settings.config_slices)
    return pred


class PredictActor:
    """One Ray Data worker: the model written to a local temp file (hash-checked), one predictor, reused."""

    def __init__(self, model: ShippedFile, settings: PredictorSettings, threads: int, model_label: str,
                 overlay: bool, make_predictor: Callable[..., Any] | None = None) -> None:
        apply_worker_threads(threads)  # before ONNX Runtime/OpenCV start their pools
        self._dir = tempfile.TemporaryDirectory(prefix="damage-predict-")
        path = model.materialize(Path(self._dir.name))
        self.pred = (make_predictor or build_predictor)(path, settings, threads)
        self.model_label, self.overlay, self._s3 = model_label, overlay, None

    def _client(self) -> Any:
        if self._s3 is None:
            from damage.tasks.data.storage import s3_client

            self._s3 = s3_client()
        return self._s3

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from damage.tasks.serving.one_image import error_doc, is_s3, predict_source

        out: dict[str, list] = {"source": [], "doc": [], "png": []}
        for source in batch["source"]:
            source = str(source)
            try:
                doc, png = predict_source(self.pred, source, self.model_label, self.overlay,
                                          client=self._client() if is_s3(source) else None)
            except DamageError as e:  # this image alone: an error row, the batch goes on
                doc, png = error_doc(source, self.model_label, str(e)), None
            out["source"].append(source)
            out["doc"].append(json.dumps(doc))
            out["png"].append(png or b"")
        return out


def predict_on_ray(model: Path, sources: Sequence[str], settings: PredictorSettings, cfg: RayConfig,
                   model_label: str, overlay: bool, forward_credentials: bool = False,
                   make_predictor: Callable[..., Any] | None = None) -> Iterator[BatchResult]:
    """Every source through a pool of Ray actors; yields one ``BatchResult`` per source as batches finish
    (in no set order). Ray must be connected (``ray_runtime.connect``).

    Args:
        model: the ``.onnx`` (read once here, shipped to the workers through the object store).
        sources: image paths (reachable by every worker) or ``s3://`` URIs.
        settings: the predictor's settings.
        cfg: the ``ray:`` section (``workers``, ``worker_threads``, ``batch_size``).
        model_label: the documents' ``model``.
        overlay: also return PNG overlays.
        forward_credentials: hand this process's keys to the workers (``ray_runtime.forwarded_env``).
        make_predictor: builds a worker's predictor (tests inject faults here); default ``build_predictor``.

    Raises:
        DamageError: a batch still failing after ``MAX_RETRIES`` worker restarts, or a source returned
            other than once.
    """
    ray = require_ray()
    if not sources:
        return
    shipped = ShippedFile(model)
    workers = plan_workers(cfg, len(sources))
    ds = ray.data.from_items([{"source": str(s)} for s in sources],
                             override_num_blocks=min(len(sources), max(workers * 4, 1)))
    ds = ds.map_batches(
        PredictActor, batch_size=cfg.batch_size, batch_format="numpy", concurrency=workers,
        num_cpus=cfg.worker_threads, max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES,
        runtime_env={"env_vars": forwarded_env(S3_ENV, forward_credentials)},
        fn_constructor_kwargs={"model": shipped, "settings": settings,
                               "threads": cfg.worker_threads, "model_label": model_label, "overlay": overlay,
                               "make_predictor": make_predictor})
    want, seen = {str(s) for s in sources}, set()
    try:
        for row in ds.iter_rows():
            source = str(row["source"])
            if source in seen or source not in want:
                raise DamageError(f"Ray batch inference returned '{source}' "
                                  f"{'twice' if source in seen else 'though it was not asked for'}")
            seen.add(source)
            png = bytes(row["png"])
            yield BatchResult(source, json.loads(row["doc"]), png or None)
    except DamageError:
        raise
    except Exception as e:  # ray.exceptions.RayTaskError/ActorDiedError after the retries are spent
        raise DamageError(f"Ray batch inference failed after {MAX_RETRIES} retries of a worker: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if seen != want:
        raise DamageError(f"Ray batch inference lost {len(want - seen)} image(s), e.g. {sorted(want - seen)[0]}")
