"""Quantization of the exported ONNX model: static INT8 (QDQ), dynamic INT8, FP16.

Modes are rows of :data:`QUANT_MODES` with the arguments each accepts; an argument a mode
does not take is a loud error, never a silently dropped flag.

Static INT8 is QDQ, per-channel weights (needs opset >= 13), calibrated on letterboxed
images from the training split, with the detect head's post-processing kept in float:
boxes (pixels, 0..imgsz) and scores (0..1) meet in one Concat, and one uint8 scale shared
by both rounds every score to zero. :func:`head_postprocess_nodes` finds those nodes by
walking back from the graph outputs to the last Conv of each branch (no hard-coded names).

:func:`quantize_accuracy_aware` evaluates the INT8 model and, while mask mAP50 is more than
``tolerance`` below the float model, keeps further nodes in float, ranked by a per-node
sensitivity measure (:func:`node_sensitivity`: the signal-to-quantization-noise ratio of
each node's output inside the QDQ model, from ORT's ``qdq_loss_debug``).

FP16 uses ``onnxruntime.transformers.float16`` (shipped with onnxruntime; no
onnxconverter-common needed) with float32 inputs/outputs kept via Cast nodes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from damage.tasks.core.atomic import atomic_write
from damage.tasks.core.errors import DamageError
from damage.tasks.evaluation.metrics import worst_class_drop
from damage.tasks.export.calibration import (
    CALIBRATION_METHODS,
    CALIBRATOR_OPTIONS,
    ImageReader,
    calibrate,
)
from damage.tasks.export.onnx_graph import (
    REWRITES,
    copy_metadata,
    ensure_node_names,
    graph_input_name,
    head_postprocess_nodes,
    load_onnx,
    model_opset,
    save_onnx_atomic,
)
from damage.tasks.serving.metadata import decode, raw_props

log = logging.getLogger(__name__)

MIN_PER_CHANNEL_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear arrived in opset 13

# Quantization modes: the arguments each accepts (besides onnx_in/onnx_out) and what it needs.
QUANT_MODES: dict[str, dict[str, Any]] = {
    "int8-static": {
        "args": {"calib_images", "imgsz", "per_channel", "exclude_nodes", "calibrate_method",
                 "activation_symmetric"},
        "needs_calibration": True,
        "doc": "QDQ, U8 activations / S8 weights, calibrated on training images; head decode in float",
    },
    "int8-dynamic": {
        "args": {"per_channel", "exclude_nodes"},
        "needs_calibration": False,
        "doc": "weights INT8 offline, activation scales computed at run time (ConvInteger)",
    },
    "fp16": {
        "args": {"exclude_nodes"},
        "needs_calibration": False,
        "doc": "float16 weights and compute, float32 inputs/outputs (Cast nodes)",
    },
}

# Op types int8-static quantizes (inputs and outputs get QuantizeLinear/DequantizeLinear), each with an int8
# kernel or a pass-through in ONNX Runtime's CPU provider once its QDQ pair is fused away: Conv -> QLinearConv,
# SiLU's Sigmoid and Mul -> QLinearSigmoid (a lookup table) and QLinearMul, the C2f shortcut Add -> QLinearAdd,
# Concat -> QLinearConcat, and Split / MaxPool / Resize run on the uint8 tensor as is. With every op of a
# SiLU-Conv-C2f chain listed, no float island (and no QDQ pair around it) is left between two Convs.
# ConvTranspose (the mask prototype upsampling) has no int8 kernel on the CPU provider (a quantized one only
# dequantizes its weights on every run), so it is first rewritten as a 1x1 Conv + DepthToSpace (uint8 bytes
# moved as they are).
INT8_OP_TYPES = ("Conv", "Sigmoid", "Mul", "Add", "Concat", "Split", "MaxPool", "Resize", "DepthToSpace")
# Exact graph rewrites applied before static INT8 quantizes (``REWRITES``): the prototype's ConvTranspose as a
# 1x1 Conv + DepthToSpace (then int8), the DFL Softmax on the innermost axis (stays float: box decode). ORT
# profile of the random yolov8s-seg at 640 px (2 cores, AVX2, ORT 1.32), kernel time 243.9 -> 227.3 ms: the
# Softmax 11.1 -> 0.7 ms (+1.6 ms Transpose), the float ConvTranspose's 16.3 ms -> an int8 1x1 Conv (3.7 ms)
# + a uint8 DepthToSpace (11.3 ms: ORT moves the bytes slowly, CRD and DCR alike). A QDQ Softmax is not
# fused into QLinearSoftmax by ORT 1.32's CPU provider: it stays float between a DQ and a Q.
INT8_REWRITES = ("convtranspose", "dfl_softmax")


def check_mode_args(mode: str, **kwargs: Any) -> None:
    """Raise when ``mode`` is unknown or an argument it does not accept was given.

    Raises:
        DamageError: unknown mode or unsupported argument for the mode.
    """
    if mode not in QUANT_MODES:
        raise DamageError(f"unknown quantization mode '{mode}' (choose from {', '.join(QUANT_MODES)})")
    bad = set(kwargs) - QUANT_MODES[mode]["args"]
    if bad:
        raise DamageError(f"quantization mode '{mode}' does not accept {sorted(bad)} "
                          f"(it accepts {sorted(QUANT_MODES[mode]['args'])})")


def _imgsz_from_meta(model, default: int | None) -> int:
    if default:
        return int(default)
    imgsz = decode(raw_props(model))["imgsz"]
    if imgsz:
        return int(max(imgsz))
    raise DamageError("imgsz not given and not found in the ONNX metadata")


# ----------------------------------------------------------------------------- quantize
def quantize_onnx(onnx_in: str | Path, onnx_out: str | Path, mode: str, calib_images: Sequence[Path] | None = None,
                  imgsz: int | None = None, per_channel: bool | None = None, exclude_nodes: Sequence[str] | None = None,
                  calibrate_method: str | None = None, activation_symmetric: bool | None = None,
                  exclude_head: bool = True, op_types: Sequence[str] | None = INT8_OP_TYPES,
                  rewrites: Sequence[str] | None = INT8_REWRITES) -> Path:
    """Quantize an ONNX model; metadata (class names, imgsz, stride, thresholds) is carried over.

    Args:
        onnx_in: FP32 ONNX (from ``damage.tasks.export.onnx.export_onnx``).
        onnx_out: file to write (atomic).
        mode: ``int8-static`` | ``int8-dynamic`` | ``fp16`` (see :data:`QUANT_MODES`).
        calib_images: images from the training split (``int8-static`` only, required there).
        imgsz: calibration letterbox size (``int8-static``; default: ONNX metadata ``imgsz``).
        per_channel: per-channel weight scales (INT8 modes; default True; needs opset >= 13).
        exclude_nodes: extra node names kept in float (all modes).
        calibrate_method: ``minmax`` (default), ``entropy`` or ``percentile`` (``int8-static``).
        activation_symmetric: symmetric activation ranges (zero point 128; ``int8-static``; default False:
            SiLU outputs are mostly positive, an asymmetric range spends the 256 levels on them).
        exclude_head: keep the head's post-processing nodes in float (INT8 static; never turn this
            off except to demonstrate why it exists).
        op_types: op types ``int8-static`` quantizes (default :data:`INT8_OP_TYPES`; None = every op
            type ONNX Runtime knows, the behaviour before the list existed, kept for comparisons).
        rewrites: exact graph rewrites applied before ``int8-static`` quantizes (default
            :data:`INT8_REWRITES`; keys of :data:`REWRITES`; None or empty = the graph as exported).

    Returns:
        ``onnx_out``.

    Raises:
        DamageError: unknown mode, an argument the mode does not take, per-channel on opset < 13,
            missing calibration images, or an ORT failure (message names the file).

    Example:
        >>> quantize_onnx("m.onnx", "m.int8.onnx", "int8-static", calib_images=imgs, imgsz=160)
    """
    given = {"calib_images": calib_images, "imgsz": imgsz, "per_channel": per_channel,
             "exclude_nodes": exclude_nodes, "calibrate_method": calibrate_method,
             "activation_symmetric": activation_symmetric}
    check_mode_args(mode, **{k: v for k, v in given.items() if v is not None})
    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    src = load_onnx(onnx_in)
    per_channel = True if per_channel is None else per_channel
    if mode.startswith("int8") and per_channel and model_opset(src) < MIN_PER_CHANNEL_OPSET:
        raise DamageError(f"{onnx_in}: per-channel INT8 needs opset >= {MIN_PER_CHANNEL_OPSET}, the model has opset "
                          f"{model_opset(src)} (re-export with export.opset=13 or pass per_channel=False)")
    fn = {"int8-static": _static, "int8-dynamic": _dynamic, "fp16": _fp16}[mode]
    work = Path(tempfile.mkdtemp(prefix=".quant-", dir=onnx_out.parent if onnx_out.parent.exists() else None))
    try:
        ensure_node_names(src)
        named = work / "named.onnx"
        import onnx

        onnx.save(src, str(named))
        exclude = list(exclude_nodes or [])
        model, info = fn(named, work, src, exclude=exclude, calib_images=calib_images, imgsz=imgsz,
                         per_channel=per_channel, calibrate_method=calibrate_method or "minmax",
                         activation_symmetric=bool(activation_symmetric), exclude_head=exclude_head,
                         op_types=op_types, rewrites=tuple(rewrites or ()))
        copy_metadata(src, model, {"damage.quantization": {"mode": mode, **info}})
        return save_onnx_atomic(model, onnx_out)
    except DamageError:
        raise
    except Exception as e:
        raise DamageError(f"{onnx_in}: {mode} quantization failed: {e}") from e
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _preprocessed(named: Path, work: Path) -> Path:
    """ORT's recommended pre-processing (shape inference + graph optimisation) when it works."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = work / "pre.onnx"
    try:
        quant_pre_process(str(named), str(out), skip_symbolic_shape=True)
        return out
    except Exception as e:  # pre-processing is an optimisation, not a requirement
        log.warning("quant_pre_process failed (%s); quantizing the model as exported", e)
        return named


def _static(named: Path, work: Path, src, *, exclude, calib_images, imgsz, per_channel, calibrate_method,
            activation_symmetric, exclude_head, op_types, rewrites):
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.operators.direct_q8 import QDQDirect8BitOp
    from onnxruntime.quantization.registry import QDQRegistry

    # DepthToSpace (the rewritten ConvTranspose) moves bytes: one scale for its input and output, like
    # Reshape and Transpose, so ONNX Runtime drops the Q/DQ pair around it and it runs on uint8
    QDQRegistry.setdefault("DepthToSpace", QDQDirect8BitOp)
    if not calib_images:
        raise DamageError(f"{named.name}: int8-static needs calibration images (calib_images)")
    methods = dict(zip(CALIBRATION_METHODS, (CalibrationMethod.MinMax, CalibrationMethod.Entropy,
                                              CalibrationMethod.Percentile), strict=True))
    if calibrate_method not in methods:
        raise DamageError(f"unknown calibrate_method '{calibrate_method}' (choose from {', '.join(methods)})")
    pre = _preprocessed(named, work)
    pre_model = onnx.load(str(pre))
    ensure_node_names(pre_model)
    rewritten = {r: REWRITES[r](pre_model) for r in rewrites}
    onnx.save(pre_model, str(pre))
    head = head_postprocess_nodes(pre_model) if exclude_head else []
    present = {n.name for n in pre_model.graph.node}
    missing = sorted(set(exclude) - present)
    if missing:
        log.warning("nodes to keep in float not in the graph (ignored): %s", missing[:10])
    excluded = sorted(set(head) | (set(exclude) & present))
    size = _imgsz_from_meta(src, imgsz)
    reader = ImageReader(calib_images, size, graph_input_name(pre_model))
    out = work / "int8.onnx"
    cache = calibrate(pre, reader, methods[calibrate_method], CALIBRATOR_OPTIONS[calibrate_method], op_types, work)
    extra = {"CalibTensorRangeSymmetric": False, "ActivationSymmetric": activation_symmetric,
             # MaxPool, Resize and Split take the uint8 tensor even where their input's producer was
             # excluded (ORT's default skips them then, leaving a float island behind an excluded node)
             "ForceQuantizeNoInputCheck": True}
    quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=list(op_types) if op_types is not None else None,
                    nodes_to_exclude=excluded, calibrate_method=methods[calibrate_method], extra_options=extra,
                    calibration_cache_path=cache)
    qmodel = onnx.load(str(out))
    unpaired = keep_outputs_float(qmodel, excluded)
    info = {"per_channel": per_channel, "calib_images": len(calib_images), "imgsz": size,
            "calibrate_method": calibrate_method, "activation_symmetric": activation_symmetric,
            "op_types": sorted(op_types) if op_types is not None else "onnxruntime-default",
            "excluded_nodes": len(excluded), "head_nodes": len(head),
            "extra_float_nodes": sorted(set(exclude) & present), "qdq_pairs_removed": unpaired,
            "rewrites": {r: n for r, n in rewritten.items() if n}}
    return qmodel, info


def keep_outputs_float(model, nodes: Iterable[str]) -> int:
    """Remove the QuantizeLinear/DequantizeLinear pairs on the outputs of ``nodes`` (in place).

    ``nodes_to_exclude`` only stops ORT's quantizer from processing a node; its neighbours still
    quantize the tensors they share with it, so an excluded Sigmoid ends up between a
    DequantizeLinear and a QuantizeLinear, which ONNX Runtime fuses back into QLinearSigmoid: the
    exclusion changed nothing. Reading the node's output directly keeps that tensor in float (its
    consumers then run in float too), which is what the sensitivity ranking measured.

    Returns:
        The number of Q/DQ pairs removed.
    """
    wanted = set(nodes)
    outputs = {o.name for o in model.graph.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    drop: list = []
    for n in model.graph.node:
        if n.name not in wanted:
            continue
        for t in n.output:
            for q in [c for c in consumers.get(t, []) if c.op_type == "QuantizeLinear"]:
                dqs = consumers.get(q.output[0], [])
                if not dqs or any(d.op_type != "DequantizeLinear" or d.output[0] in outputs for d in dqs):
                    continue  # not a plain Q -> DQ pair (or it feeds a graph output): leave it
                for d in dqs:
                    for c in consumers.get(d.output[0], []):
                        c.input[:] = [t if i == d.output[0] else i for i in c.input]
                drop += [q, *dqs]
    for d in drop:
        model.graph.node.remove(d)
    return sum(d.op_type == "QuantizeLinear" for d in drop)


def _dynamic(named: Path, work: Path, src, *, exclude, per_channel, **_):
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = work / "dyn.onnx"
    # ConvInteger on the CPU provider takes uint8 weights and activations.
    quantize_dynamic(str(named), str(out), per_channel=per_channel, weight_type=QuantType.QUInt8,
                     nodes_to_exclude=list(exclude))
    return onnx.load(str(out)), {"per_channel": per_channel, "excluded_nodes": len(exclude)}


def _fp16(named: Path, work: Path, src, *, exclude, **_):
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(named))
    # keep_io_types: callers (predictor, evaluator) keep feeding and reading float32.
    half = convert_float_to_float16(model, keep_io_types=True, node_block_list=list(exclude) or None)
    return half, {"excluded_nodes": len(exclude), "keep_io_types": True}


# ----------------------------------------------------------------------------- sensitivity
def node_sensitivity(onnx_qdq: str | Path, images: Sequence[Path], imgsz: int) -> list[tuple[str, float]]:
    """Rank the nodes of a QDQ model by how much quantizing their output hurts.

    The measure is the signal-to-quantization-noise ratio (dB) of each activation, before vs
    after its QuantizeLinear/DequantizeLinear pair (ORT ``qdq_loss_debug``), over ``images``;
    lower SQNR = more sensitive. Each activation is attributed to the node that produces it
    (a float node of the quantized graph, so its name is valid for ``nodes_to_exclude``).

    Returns:
        ``[(node_name, sqnr_db), ...]`` most sensitive first.
    """
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_signal_to_quantization_noice_ratio,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    qmodel = load_onnx(Path(onnx_qdq))
    producer = {o: n.name for n in qmodel.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
                for o in n.output}
    with tempfile.TemporaryDirectory() as td:
        aug = Path(td) / "aug.onnx"
        modify_model_output_intermediate_tensors(str(onnx_qdq), str(aug))
        reader = ImageReader(images, imgsz, graph_input_name(qmodel))
        acts = collect_activations(str(aug), reader)
    # local error of each quantized activation: before vs after its own Q/DQ pair
    matching = create_activation_matching(acts)
    ranked = []
    for tensor, match in matching.items():
        node = producer.get(tensor)
        v = compute_signal_to_quantization_noice_ratio(match["pre_qdq"], match["post_qdq"])
        if node and v is not None and np.isfinite(v):
            ranked.append((node, float(v)))
    # one entry per node (a node can have several quantized outputs): keep its worst SQNR
    worst: dict[str, float] = {}
    for n, v in ranked:
        worst[n] = min(v, worst.get(n, np.inf))
    return sorted(worst.items(), key=lambda kv: kv[1])


@dataclass
class QuantAttempt:
    """One INT8 candidate of the accuracy-aware loop."""

    path: Path
    float_nodes: list[str]
    metrics: dict[str, float]


@dataclass
class AccuracyAwareResult:
    """Outcome of :func:`quantize_accuracy_aware`."""

    path: Path
    metrics: dict[str, float]
    float_metrics: dict[str, float]
    within_tolerance: bool
    attempts: list[QuantAttempt] = field(default_factory=list)
    ranking: list[tuple[str, float]] = field(default_factory=list)
    graph_nodes: int = 0  # nodes of the float graph (the share returned to float is float_nodes / graph_nodes)

    def summary(self) -> dict[str, Any]:
        best = next((a for a in self.attempts if a.path == self.path), None)
        return {
            "path": str(self.path),
            "within_tolerance": self.within_tolerance,
            "float_nodes": len(best.float_nodes) if best else 0,
            "graph_nodes": self.graph_nodes,
            "attempts": [{"float_nodes": len(a.float_nodes), "mask/mAP50": a.metrics.get("mask/mAP50"),
                          "worst_class": _worst_summary(self.float_metrics, a.metrics)} for a in self.attempts],
            "float_mask/mAP50": self.float_metrics.get("mask/mAP50"),
            "mask/mAP50": self.metrics.get("mask/mAP50"),
        }


EvaluateFn = Callable[[Path], dict[str, float]]


def _worst_summary(base: dict[str, float], cand: dict[str, float]) -> dict[str, Any]:
    c, d = worst_class_drop(base, cand)
    return {"class": c, "drop": None if c is None else round(d, 4)}


def quantize_accuracy_aware(onnx_in: str | Path, out: str | Path, data_yaml: str | Path | None,
                            calib_images: Sequence[Path], tolerance: float = 0.02, max_retries: int = 3,
                            nodes_per_retry: int = 8, evaluate_fn: EvaluateFn | None = None,
                            imgsz: int | None = None, per_channel: bool = True, sensitivity_images: int = 4,
                            metric: str = "mask/mAP50", float_metrics: dict[str, float] | None = None,
                            calibrate_method: str = "minmax", activation_symmetric: bool = False,
                            class_tolerance: float | None = None) -> AccuracyAwareResult:
    """Static INT8 that keeps the most sensitive nodes in float until accuracy is within tolerance.

    1. Quantize (head decode in float), evaluate ``metric`` on val. 2. If it is more than
    ``tolerance`` below the float model, rank nodes with :func:`node_sensitivity` and keep
    the next ``nodes_per_retry`` worst in float; retry up to ``max_retries`` times. The best
    attempt (highest ``metric``) ends up at ``out``; ``within_tolerance`` says whether it met
    the gate. With ``class_tolerance``, an attempt also has to keep every class's mask AP50
    within it of the float model's (a variant that keeps the overall figure while losing one
    class is what the registry gate's per-class rule refuses later).

    Args:
        onnx_in: FP32 ONNX.
        out: INT8 ONNX to write.
        data_yaml: dataset (used by the default ``evaluate_fn``).
        calib_images: calibration images (training split).
        tolerance: allowed absolute drop of ``metric``.
        max_retries: retries after the first attempt.
        nodes_per_retry: nodes moved back to float per retry.
        evaluate_fn: ``path -> metrics``, the same evaluator that measured ``float_metrics``
            (``Evaluator.metrics_fn``); default: ``Evaluator`` defaults at ``imgsz``.
        imgsz: calibration/evaluation size (default: ONNX metadata).
        per_channel: per-channel weights.
        calibrate_method: ``minmax`` | ``entropy`` | ``percentile`` (:data:`CALIBRATION_METHODS`).
        activation_symmetric: symmetric activation ranges.
        sensitivity_images: calibration images used for the sensitivity ranking.
        metric: metric the gate reads.
        float_metrics: the float model's metrics if already measured (saves one evaluation).
        class_tolerance: allowed absolute drop of each class's mask AP50 (None: overall only).
    """
    onnx_in, out = Path(onnx_in), Path(out)
    size = _imgsz_from_meta(load_onnx(onnx_in), imgsz)
    if evaluate_fn is None:  # the tolerance is judged as the gate judges: its evaluator, never a default one
        raise DamageError("quantize_accuracy_aware needs evaluate_fn: Evaluator.from_config(cfg).metrics_fn(data_yaml)")

    base = float_metrics or evaluate_fn(onnx_in)
    target = base[metric] - tolerance

    def within(m: dict[str, float]) -> bool:
        return m[metric] >= target and (class_tolerance is None
                                        or worst_class_drop(base, m)[1] <= class_tolerance + 1e-12)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".aaq-", dir=out.parent))
    attempts: list[QuantAttempt] = []
    ranking: list[tuple[str, float]] = []
    try:
        float_nodes: list[str] = []
        for attempt in range(max_retries + 1):
            cand = work / f"attempt{attempt}.onnx"
            quantize_onnx(onnx_in, cand, "int8-static", calib_images=calib_images, imgsz=size,
                          per_channel=per_channel, exclude_nodes=float_nodes or None,
                          calibrate_method=calibrate_method, activation_symmetric=activation_symmetric)
            m = evaluate_fn(cand)
            attempts.append(QuantAttempt(cand, list(float_nodes), m))
            worst, drop = worst_class_drop(base, m)
            log.info("INT8 attempt %d: %s=%.4f (float %.4f, %d extra float nodes; worst class %s %+.4f)", attempt,
                     metric, m[metric], base[metric], len(float_nodes), worst, -drop)
            if within(m) or attempt == max_retries:
                break
            if not ranking:
                ranking = node_sensitivity(cand, list(calib_images)[:sensitivity_images], size)
            remaining = [n for n, _ in ranking if n not in float_nodes]
            if not remaining:
                break
            float_nodes = float_nodes + remaining[:nodes_per_retry]
        # within the tolerances first; then best accuracy; on a tie, the one with fewer float nodes (faster)
        best = max(attempts, key=lambda a: (within(a.metrics), a.metrics[metric], -len(a.float_nodes)))
        atomic_write(out, lambda tmp: os.replace(best.path, tmp))  # work/ is beside out: a rename
        best_path = out
        for a in attempts:
            if a is best:
                a.path = out
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return AccuracyAwareResult(best_path, best.metrics, base, within(best.metrics), attempts, ranking,
                               graph_nodes=len(load_onnx(onnx_in).graph.node))
