"""Distributed batch inference on Ray Data: ``damage predict --ray``.

The image list (paths, or ``s3://`` keys listed on the driver) is handed, by index, to the project's Ray Data
actor pool (``shards.iter_indices``): each actor holds one ONNX predictor built once with an explicit thread
count (``PredictShard``) and reads its images itself (a worker on a cluster reads S3 directly; nothing is
copied to the driver first), and returns per image exactly what the single-process path writes: ``one_image.predict_source`` is
the one function both call. The model travels through Ray's object store and is checked against its SHA-256
on every worker, so a cluster node needs no shared filesystem.

A worker that dies mid-batch is restarted and the batch retried (``shards.MAX_RETRIES``): results are only
returned for whole batches, so an image is never lost or counted twice; an image that
fails by itself (unreadable, too large) is an error row, not a retry.

Example:
    >>> rows = predict_on_ray(Path("best.onnx"), ["s3://claims/a.jpg"], PredictorSettings(), RayConfig(),
    ...                       model_label="best.onnx", overlay=False)
    >>> sorted(rows)[0]
    's3://claims/a.jpg'
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from damage.tasks.core.errors import DamageError
from damage.tasks.scale.shards import iter_indices

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


class PredictShard:
    """One Ray worker's predictions: one predictor of the (hash-checked, local) model, reused for every image
    of the batches it is handed (``shards.iter_indices`` builds it once per worker)."""

    def __init__(self, model: Path, sources: Sequence[str], settings: PredictorSettings, threads: int,
                 model_label: str, overlay: bool, make_predictor: Callable[..., Any] | None = None) -> None:
        self.pred = (make_predictor or build_predictor)(model, settings, threads)
        self.sources, self.model_label, self.overlay, self._s3 = list(sources), model_label, overlay, None

    def _client(self) -> Any:
        if self._s3 is None:
            from damage.tasks.data.storage import s3_client

            self._s3 = s3_client()
        return self._s3

    def __call__(self, indices: Sequence[int]) -> list[BatchResult]:
        from damage.tasks.serving.one_image import error_doc, is_s3, predict_source

        out = []
        for i in indices:
            source = self.sources[i]
            try:
                doc, png = predict_source(self.pred, source, self.model_label, self.overlay,
                                          client=self._client() if is_s3(source) else None)
            except DamageError as e:  # this image alone: an error row, the batch goes on
                doc, png = error_doc(source, self.model_label, str(e)), None
            out.append(BatchResult(source, doc, png))
        return out


def predict_on_ray(model: Path, sources: Sequence[str], settings: PredictorSettings, cfg: RayConfig,
                   model_label: str, overlay: bool,
                   make_predictor: Callable[..., Any] | None = None) -> Iterator[BatchResult]:
    """Every source through a pool of Ray actors (``shards.iter_indices``); yields one ``BatchResult`` per
    source as batches finish (in no set order). Ray must be connected (``ray_runtime.connect``).

    Args:
        model: the ``.onnx`` (shipped to the workers through the object store, hash-checked there).
        sources: image paths (reachable by every worker) or ``s3://`` URIs.
        settings: the predictor's settings.
        cfg: the ``ray:`` section (``workers``, ``worker_threads``, ``batch_size``).
        model_label: the documents' ``model``.
        overlay: also return PNG overlays.
        make_predictor: builds a worker's predictor (tests inject faults here); default ``build_predictor``.

    Raises:
        DamageError: a batch still failing after the worker restarts, or a source returned other than once.
    """
    kwargs = {"model": model, "sources": [str(s) for s in sources], "settings": settings,
              "threads": cfg.worker_threads, "model_label": model_label, "overlay": overlay,
              "make_predictor": make_predictor}
    for _, result in iter_indices(len(sources), PredictShard, kwargs, cfg, ship=("model",)):
        yield result
