"""ONNX export with self-describing metadata, and the PyTorch-vs-ONNX-Runtime parity gate.

``export_onnx`` runs Ultralytics' exporter on a private copy of the weights (so nothing is
written next to the source checkpoint), adds the pipeline's metadata and moves the file into
place atomically. ``parity_check`` runs the PyTorch model and ONNX Runtime on the same
letterboxed inputs and compares the raw outputs; ``export_step`` does both inside a nested
MLflow run "export" and fails the step when the figures exceed the tolerance.

Metadata keys written (``onnx.ModelProto.metadata_props``, all strings):

* Ultralytics' own: ``names`` (dict repr), ``imgsz`` ([h, w]), ``stride``, ``task``, ``batch``,
  ``args``, ``version``, ... (read by ``YOLO(model.onnx)``);
* the pipeline's, JSON-encoded under ``damage.``: ``damage.names`` (list), ``damage.imgsz``,
  ``damage.stride``, ``damage.task``, ``damage.conf``, ``damage.iou``, ``damage.objective``
  (operating point chosen by the sweep), ``damage.dataset_fingerprint``,
  ``damage.source_run_id``, ``damage.family`` (``yolov8``, ``yolo11``, ``yolo26``), plus every other key
  of ``metadata``. The prefix keeps them from
  clashing with Ultralytics' keys (which it sets as attributes on its backend).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from damage.tasks.core.atomic import atomic_write
from damage.tasks.core.config import ExportConfig, PredictorConfig
from damage.tasks.core.errors import DamageError, GateFailed, load_file
from damage.tasks.serving.metadata import decode, encode, pipeline_keys, raw_props, set_props


@dataclass
class ParityResult:
    """PyTorch vs ONNX Runtime on the same inputs.

    Attributes:
        figures: ``det_max_abs``/``det_mean_abs`` (detections tensor with box coordinates divided by
            the image size, so boxes, scores and mask coefficients share one scale),
            ``box_max_abs_px`` (boxes in pixels), ``score_max_abs``, ``proto_max_abs``/``proto_mean_abs``.
        atol: the tolerance applied to ``det_max_abs`` and ``proto_max_abs``.
        images: number of images compared.
        passed: both maxima within ``atol``.
    """

    figures: dict[str, float]
    atol: float
    images: int
    imgsz: int
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ExportResult:
    """What ``export_step`` produced."""

    onnx_path: Path
    parity: ParityResult
    run_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def _load_yolo(weights: Path):
    from ultralytics import YOLO

    from damage.tasks.training.checkpoint import ultralytics_safe_load, vet_checkpoint

    with ultralytics_safe_load():
        model = load_file(Path(weights), lambda p: YOLO(str(vet_checkpoint(p))), "weights")
    if model.task != "segment":
        raise DamageError(f"{weights}: task is '{model.task}', expected a segmentation model")
    return model


def check_end2end(model, weights: Path, end2end: bool) -> None:
    """Refuse an end-to-end export of a family without an NMS-free head (export step).

    Raises:
        DamageError: ``end2end`` is requested and the model's head has no one-to-one branch.
    """
    from damage.tasks.core.families import family_name

    head = model.model[-1] if hasattr(model, "model") else None
    if end2end and getattr(head, "one2one_cv2", None) is None:
        raise DamageError(f"{weights}: export.end2end=true, but this {family_name(model)} model has no NMS-free "
                          f"(one-to-one) head (export step); only YOLO26 has one: set export.end2end=false")


def export_onnx(weights: Path, out: Path, imgsz: int, opset: int = 13, dynamic: bool = True,
                simplify: bool = True, metadata: dict[str, Any] | None = None, end2end: bool = False) -> Path:
    """Export a YOLO-seg checkpoint (any family) to ONNX (FP32) with the pipeline's metadata, atomically.

    Args:
        weights: Ultralytics ``.pt`` checkpoint.
        out: the ``.onnx`` file to write (replaced atomically if it exists).
        imgsz: square input size the model is exported (and described) at.
        opset: ONNX opset (>= 12).
        dynamic: dynamic batch and image size.
        simplify: simplify the graph with onnxslim.
        metadata: extra keys (thresholds ``conf``/``iou``/``objective``, ``dataset_fingerprint``,
            ``source_run_id``...), written JSON-encoded as ``damage.<key>``.
        end2end: export the NMS-free one-to-one head (YOLO26): the graph ends in a TopK and
            returns (batch, k, 6 + nm) rows; k is ``min(300, anchors at imgsz)``, fixed in the graph.
            False: the one-to-many head, (batch, 4 + nc + nm, anchors), decoded with NMS.

    Returns:
        ``out``.

    Raises:
        DamageError: missing/unloadable weights, not a segmentation model, ``end2end`` for a
            family without an NMS-free head, or the export failed.

    Example:
        >>> export_onnx(Path("best.pt"), Path("model.onnx"), 160, metadata={"conf": 0.4, "iou": 0.5})
    """
    import onnx

    weights, out = Path(weights), Path(out)
    if opset < 12:
        raise DamageError(f"{out}: opset {opset} not supported (>= 12)")
    model = _load_yolo(weights)
    check_end2end(model.model, weights, end2end)
    from damage.tasks.core.families import family_name

    family = family_name(model.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        # Export a private copy: Ultralytics writes "<weights>.onnx" beside its input.
        src = work / "model.pt"
        shutil.copyfile(weights, src)
        del model
        from ultralytics import YOLO

        from damage.tasks.training.checkpoint import ultralytics_safe_load, vet_checkpoint

        try:
            # nms=False selects the one-to-one head; None (Ultralytics' default) the one-to-many head
            with ultralytics_safe_load():  # the private copy of the file _load_yolo vetted
                produced = YOLO(str(vet_checkpoint(src))).export(format="onnx", imgsz=imgsz, opset=opset, dynamic=dynamic,
                                                 simplify=simplify, device="cpu", half=False, batch=1,
                                                 verbose=False, nms=False if end2end else None)
        except Exception as e:
            raise DamageError(f"{weights}: ONNX export failed (opset {opset}): {e}") from e
        proto = onnx.load(str(produced))
        # the file says which family it is (registry tag, predictor decode, benchmarks)
        set_props(proto, _pipeline_metadata(proto, {"family": family, **(metadata or {})}))
        atomic_write(out, lambda tmp: onnx.save(proto, tmp))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def update_onnx_metadata(onnx_path: Path, metadata: dict[str, Any]) -> Path:
    """Add or replace ``damage.<key>`` metadata (JSON values) of an ONNX file, atomically."""
    import onnx

    proto = onnx.load(str(onnx_path))
    set_props(proto, encode(metadata))
    return atomic_write(Path(onnx_path), lambda tmp: onnx.save(proto, tmp))


def _pipeline_metadata(proto, metadata: dict[str, Any]) -> dict[str, str]:
    """``damage.*`` keys: the model's own description (from Ultralytics' keys) plus the caller's ``metadata``."""
    ul = decode(raw_props(proto))
    meta: dict[str, Any] = {"names": ul["names"] or [], "imgsz": ul["imgsz"], "stride": ul.get("stride"),
                            "task": ul.get("task")}
    return encode({**meta, **metadata})


def read_onnx_metadata(onnx_path: Path) -> dict[str, Any]:
    """The ``damage.*`` metadata of an exported file, decoded (prefix removed)."""
    import onnx

    return pipeline_keys(decode(raw_props(onnx.load(str(onnx_path), load_external_data=False))))


# ----------------------------------------------------------------------------- parity


def sample_images(n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` deterministic BGR test images of varied sizes and aspect ratios (smooth noise + shapes)."""
    import cv2

    rng = np.random.default_rng(seed)
    sizes = [(96, 160), (160, 96), (128, 128), (75, 201), (240, 180)]
    out = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        small = rng.uniform(0, 255, (6, 6, 3)).astype(np.float32)
        im = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
        for _ in range(4):
            c = tuple(int(v) for v in rng.integers(0, 256, 3))
            x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
            cv2.rectangle(im, (x, y), (x + int(rng.integers(8, w // 2 + 9)), y + int(rng.integers(8, h // 2 + 9))), c, -1)
        out.append(np.clip(im, 0, 255).astype(np.uint8))
    return out


def parity_figures(weights: Path, onnx: Path, images: list[Path] | int, imgsz: int, atol: float) -> ParityResult:
    """Like ``parity_check`` but returns a failing result instead of raising."""
    return _parity(weights, onnx, images, imgsz, atol)


def parity_check(weights: Path, onnx: Path, images: list[Path] | int, imgsz: int, atol: float) -> ParityResult:
    """Compare PyTorch and ONNX Runtime raw outputs on the same letterboxed inputs.

    Args:
        weights: the ``.pt`` the ONNX was exported from.
        onnx: the exported file.
        images: image files, or a number of generated test images (``sample_images``).
        imgsz: square input size fed to both.
        atol: maximum allowed absolute difference (detections with boxes / imgsz, and prototypes).

    Returns:
        The figures (also when they pass).

    Raises:
        GateFailed: a maximum exceeds ``atol`` or output shapes differ (message names the figures).
        DamageError: an image cannot be read or a model cannot be loaded.
    """
    res = _parity(weights, onnx, images, imgsz, atol)
    _raise_if_failed(res, onnx)
    return res


def _raise_if_failed(res: ParityResult, onnx: Path) -> None:
    if res.passed:
        return
    f = res.figures
    raise GateFailed(
        f"{onnx}: parity gate failed (atol {res.atol:g}): detections max abs {f['det_max_abs']:.3g} "
        f"(boxes {f['box_max_abs_px']:.3g} px, scores {f['score_max_abs']:.3g}), "
        f"prototypes max abs {f['proto_max_abs']:.3g} over {res.images} image(s)")


def _parity(weights: Path, onnx: Path, images: list[Path] | int, imgsz: int, atol: float) -> ParityResult:
    import torch

    from damage.tasks.serving.predictor import Predictor, letterbox, read_image

    ims = sample_images(images) if isinstance(images, int) else [read_image(p) for p in images]
    if not ims:
        raise DamageError(f"{onnx}: parity check needs at least one image")
    batch = np.stack([
        np.ascontiguousarray(letterbox(im, (imgsz, imgsz))[0][..., ::-1].transpose(2, 0, 1)) for im in ims
    ]).astype(np.float32) / np.float32(255)

    pred = Predictor(onnx, threads=os.cpu_count(), backend="onnxruntime", cache_optimized=False)
    o_det, o_proto = pred.infer(batch)

    model = _load_yolo(weights).model.float().eval()
    if pred.end2end:  # compare the head the file was exported with, with the same top-k size
        check_end2end(model, weights, True)
        model.end2end = True
        model.model[-1].max_det = o_det.shape[1]
    model = model.fuse() if hasattr(model, "fuse") else model  # the exporter fuses Conv+BN too
    with torch.no_grad():
        y = model(torch.from_numpy(batch))
    (t_det, t_proto) = (y[0][0], y[0][1]) if isinstance(y[0], (tuple, list)) else (y[0], y[1])
    t_det, t_proto = t_det.numpy(), t_proto.numpy()

    if o_det.shape != t_det.shape or o_proto.shape != t_proto.shape:
        raise GateFailed(f"{onnx}: output shapes differ: ONNX {o_det.shape}/{o_proto.shape} vs "
                         f"PyTorch {t_det.shape}/{t_proto.shape}")
    dp = np.abs(o_proto - t_proto)
    if pred.end2end:
        figures = _end2end_figures(t_det, o_det, imgsz, atol)
    else:
        nc = len(pred.names) if pred.names else t_det.shape[1] - 4 - t_proto.shape[1]
        figures = _raw_figures(t_det, o_det, imgsz, nc)
    figures.update({"proto_max_abs": float(dp.max()), "proto_mean_abs": float(dp.mean())})
    passed = figures["det_max_abs"] <= atol and figures["proto_max_abs"] <= atol
    return ParityResult(figures=figures, atol=atol, images=len(ims), imgsz=imgsz, passed=passed)


def _raw_figures(t_det: np.ndarray, o_det: np.ndarray, imgsz: int, nc: int) -> dict[str, float]:
    """Element-wise differences of (N, 4 + nc + nm, anchors) outputs, boxes divided by ``imgsz``."""
    scale = np.ones((t_det.shape[1], 1), np.float32)
    scale[:4] = 1.0 / imgsz
    d = np.abs(o_det - t_det)
    dn = d * scale
    return {
        "det_max_abs": float(dn.max()),
        "det_mean_abs": float(dn.mean()),
        "box_max_abs_px": float(d[:, :4].max()),
        "score_max_abs": float(d[:, 4:4 + nc].max()),
        "coef_max_abs": float(d[:, 4 + nc:].max()) if d.shape[1] > 4 + nc else 0.0,
    }


def _end2end_figures(t_det: np.ndarray, o_det: np.ndarray, imgsz: int, atol: float) -> dict[str, float]:
    """Differences of end-to-end (N, k, 6 + nm) rows, each PyTorch row against its closest ONNX row.

    The rows come out of a TopK, so two nearly equal scores may leave it in either order: each
    PyTorch row is matched to the ONNX row of the same class nearest to it (boxes divided by
    ``imgsz``). Rows whose score is within ``atol`` of the image's k-th score are left out: at
    the TopK's cut-off a tiny difference legitimately swaps which (anchor, class) pair gets in.
    """
    maxes: dict[str, float] = {"det_max_abs": 0.0, "box_max_abs_px": 0.0, "score_max_abs": 0.0, "coef_max_abs": 0.0}
    total, count = 0.0, 0
    scale = np.ones(t_det.shape[2], np.float32)
    scale[:4] = 1.0 / imgsz
    for t, o in zip(t_det, o_det, strict=True):
        keep = t[:, 4] > t[:, 4].min() + atol
        t = t[keep]
        if not len(t):
            continue
        diff = np.abs(t[:, None, :] - o[None, :, :])  # (rows, k, 6 + nm)
        dist = (diff * scale).max(2)
        dist[t[:, None, 5] != o[None, :, 5]] = np.inf  # a row only matches a row of its class
        j = dist.argmin(1)
        d = diff[np.arange(len(t)), j]
        if not np.isfinite(dist[np.arange(len(t)), j]).all():
            d = np.full_like(d, np.inf)
        dn = d * scale
        maxes["det_max_abs"] = max(maxes["det_max_abs"], float(dn.max()))
        maxes["box_max_abs_px"] = max(maxes["box_max_abs_px"], float(d[:, :4].max()))
        maxes["score_max_abs"] = max(maxes["score_max_abs"], float(d[:, 4].max()))
        maxes["coef_max_abs"] = max(maxes["coef_max_abs"], float(d[:, 6:].max()) if d.shape[1] > 6 else 0.0)
        total, count = total + float(dn.sum()), count + dn.size
    return {**maxes, "det_mean_abs": total / count if count else 0.0}


# ----------------------------------------------------------------------------- runtime choice


def backend_latency_ms(onnx_path: Path, imgsz: int, runs: int = 10, precision: str = "f32",
                       warmup: int = 2) -> dict[str, float]:
    """Median latency (ms) of one 1x3x``imgsz``x``imgsz`` inference per installed runtime, interleaved.

    The runtimes take turns run by run, so a noisy neighbour slows both alike. Each runs with
    the predictor's settings (``damage.tasks.serving.backends``; no optimised-graph cache is written).
    Without OpenVINO only ``onnxruntime`` is measured and one line is logged.
    """
    from damage.tasks.serving.backends import (
        RUNTIMES,
        open_runtime,
        openvino_available,
        warn_openvino_missing,
    )

    names = [n for n in RUNTIMES if n != "openvino" or openvino_available()]
    if "openvino" not in names:
        warn_openvino_missing()
    rts = {n: open_runtime(n, Path(onnx_path), cache=False, precision=precision) for n in names}
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    for _ in range(warmup):
        for rt in rts.values():
            rt.run(x)
    times: dict[str, list[float]] = {n: [] for n in rts}
    for _ in range(runs):
        for n, rt in rts.items():
            t = time.perf_counter()
            rt.run(x)
            times[n].append(time.perf_counter() - t)
    return {n: float(np.median(ts) * 1e3) for n, ts in times.items()}


def record_backend_latency(onnx_path: Path, imgsz: int, runs: int = 10, precision: str = "f32") -> dict[str, Any]:
    """Measure each installed runtime on this machine and write the choice into the model's metadata.

    Writes ``damage.backend_latency_ms`` ({runtime: ms}), ``damage.preferred_backend`` (the
    fastest) and ``damage.backend_cpu`` (the ISA it was measured on); ``predictor.backend: auto``
    reads ``preferred_backend``. ``runs=0`` measures nothing and writes nothing (auto then means
    onnxruntime).

    Returns:
        ``{"backend_latency_ms": {...}, "preferred_backend": str, "backend_cpu": str}``, or ``{}``
        when ``runs`` is 0.
    """
    from damage.tasks.serving.backends import cpu_isa

    if runs <= 0:
        return {}
    lat = backend_latency_ms(onnx_path, imgsz, runs, precision)
    rec = {"backend_latency_ms": {k: round(v, 3) for k, v in lat.items()},
           "preferred_backend": min(lat, key=lat.__getitem__), "backend_cpu": cpu_isa()}
    update_onnx_metadata(onnx_path, rec)
    return rec


# ----------------------------------------------------------------------------- pipeline step


def export_step(weights: Path, cfg: ExportConfig, imgsz: int, thresholds: dict[str, Any], metadata: dict[str, Any],
                sample_images: list[Path], parent_run_id: str,
                predictor: PredictorConfig | None = None) -> ExportResult:
    """Export + parity gate + runtime choice inside a nested MLflow run "export".

    Logs the export settings as params, the parity figures as metrics (``parity/<figure>``), each
    runtime's latency (``latency/<runtime>_ms``, ``record_backend_latency``) with the faster one
    as tag ``preferred_backend``, the ONNX file as artifact ``onnx/`` and its metadata as
    ``onnx/metadata.json``. The run is marked FAILED (and ``GateFailed`` raised) when the parity
    figures exceed ``cfg.parity_atol``; the figures are logged before that.

    Args:
        weights: trained ``.pt``; the ONNX is written beside it (``best.pt`` -> ``best.onnx``).
        cfg: the ``export:`` config section.
        imgsz: export size (``Config.imgsz``: ``export.imgsz``, else ``train.imgsz``).
        thresholds: the sweep's operating point (``conf``, ``iou``, ``objective``); may be empty.
        metadata: lineage (``dataset_fingerprint``, ``source_run_id``, ``config_hash``, ...).
        sample_images: images for the parity gate; empty = ``cfg.parity_images`` generated images.
        parent_run_id: MLflow run the nested "export" run belongs to.
        predictor: the ``predictor:`` config section (``latency_runs``, ``openvino_precision``);
            None = its defaults.
    """
    from damage.tasks.core import tracking
    pcfg = predictor or PredictorConfig()
    size = imgsz
    weights = Path(weights)
    out = weights.with_suffix(".onnx")
    meta = {**{k: v for k, v in thresholds.items() if v is not None}, **metadata}
    with tracking.step_run(parent_run_id, "export") as (c, run_id):
        tracking.log_params(c, run_id, {"export": cfg.model_dump(), "export.imgsz_used": size,
                                        "weights": str(weights)})
        export_onnx(weights, out, size, cfg.opset, cfg.dynamic, cfg.simplify, meta, end2end=cfg.end2end)
        imgs: list[Path] | int = list(sample_images)[: cfg.parity_images] or cfg.parity_images
        parity = parity_figures(weights, out, imgs, size, cfg.parity_atol)
        # figures first, so a failed gate still shows by how much in MLflow
        tracking.log_metrics(c, run_id, {f"parity/{k}": v for k, v in parity.figures.items()})
        tracking.log_metrics(c, run_id, {"parity/passed": float(parity.passed)})
        if not parity.passed:
            tracking.set_tags(c, run_id, {"parity": "failed"})
            _raise_if_failed(parity, out)
        choice = record_backend_latency(out, size, pcfg.latency_runs, pcfg.openvino_precision)
        if choice:
            tracking.log_metrics(c, run_id, {f"latency/{k}_ms": v for k, v in choice["backend_latency_ms"].items()})
            tracking.set_tags(c, run_id, {"preferred_backend": choice["preferred_backend"],
                                          "backend_cpu": choice["backend_cpu"]})
        tracking.log_metrics(c, run_id, {"onnx_size_mb": out.stat().st_size / 2**20})
        tracking.log_artifact(c, run_id, out, "onnx")
        full_meta = read_onnx_metadata(out)
        tracking.log_params(c, run_id, {"family": full_meta.get("family", "unknown")})
        tracking.log_dict(c, run_id, full_meta, "onnx/metadata.json")
        tracking.set_tags(c, run_id, {"onnx_path": str(out), "parity": "passed"})
    return ExportResult(onnx_path=out, parity=parity, run_id=run_id, metadata=full_meta)
