"""What each compression step does, as a table (``STEP_RUNNERS``) of runners that share one context.

``apply_step`` looks a step up and runs it on the chain head; the chain loop, measurement and the gate are in
``damage.tasks.export.compress``. Every PyTorch variant is exported through the nightly's parity gate
(``export_variant``); INT8 static runs the accuracy-aware loop measured by the chain's evaluator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from damage.tasks.core.errors import DamageError
from damage.tasks.export.variant import PT_STEPS, StepOutput, Variant, pt_stats

if TYPE_CHECKING:
    from damage.tasks.evaluation.evaluate import Evaluator

log = logging.getLogger(__name__)


def export_variant(weights: str | Path, out: str | Path, cfg, imgsz: int,
                   meta: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Export a variant's .pt to ONNX with the pipeline's export settings, then run the parity gate.

    Every exported variant (parent, pruned, fine-tuned, distilled, sparse) goes through the same
    PyTorch-vs-ONNX-Runtime gate as the nightly export (``export.parity_atol`` on
    ``export.parity_images`` generated images): a pruned graph that exports but computes something
    else must not reach the table.

    Returns:
        The ONNX path and the parity result as a dict (``figures``, ``atol``, ``images``, ``passed``).

    Raises:
        GateFailed: the ONNX outputs differ from PyTorch's by more than ``export.parity_atol``.
    """
    from damage.tasks.export.onnx import export_onnx, parity_check

    onnx = export_onnx(weights, out, imgsz, opset=cfg.export.opset, dynamic=cfg.export.dynamic,
                       simplify=cfg.export.simplify, metadata=meta)
    parity = parity_check(weights, onnx, cfg.export.parity_images, imgsz, cfg.export.parity_atol)
    return onnx, parity.to_dict()


def pt_variant(name: str, kind: str, weights: Path, parent: Variant, cfg, imgsz: int, work: Path,
                info: dict[str, Any]) -> Variant:
    onnx, parity = export_variant(weights, work / f"{name}.onnx", cfg, imgsz,
                                  {"variant": name, "variant_kind": kind, "variant_parent": parent.name})
    params, gf = pt_stats(weights, imgsz)
    return Variant(name, kind, str(onnx), parent.name, str(weights), params, gf,
                   info={**info, "parity": parity["figures"]})


@dataclass
class StepContext:
    """What every step runner gets: the chain head and root, the data, the config and where to write."""

    step: str
    head: Variant
    root: Variant
    data_yaml: str | Path
    cfg: Any
    work: Path
    evaluator: Evaluator
    on_epoch: Callable[[str, int, dict], None] | None = None

    @property
    def imgsz(self) -> int:
        return int(self.evaluator.imgsz or self.cfg.imgsz)

    @property
    def train_cfg(self):
        return self.cfg.train.model_copy(update={"imgsz": self.imgsz})

    @property
    def prefix(self) -> str:
        return (self.head.name + "-") if self.head.kind != "parent" else ""

    def epoch_callback(self, tag: str):
        return (lambda e, m: self.on_epoch(tag, e, m)) if self.on_epoch else None


def _distill(x: StepContext) -> StepOutput:
    from damage.tasks.training.distill import distill, train_scratch

    dc = x.cfg.compress.distill
    teacher = Path(dc.teacher or x.root.weights)
    res = distill(teacher, x.data_yaml, x.train_cfg, dc, x.work / "runs", seed=x.cfg.seed,
                  name=f"{x.prefix}distilled", on_epoch=x.epoch_callback("distill"))
    v = pt_variant(f"{x.prefix}distilled", "distilled", res.best, x.head, x.cfg, x.imgsz, x.work,
                   {"teacher": str(teacher), "student": dc.student, "epochs": dc.epochs, "hinton": dc.hinton,
                    "temperature": dc.temperature})
    out = [v]
    if dc.compare_scratch:
        s = train_scratch(x.data_yaml, x.train_cfg, dc, x.work / "runs", seed=x.cfg.seed,
                          name=f"{x.prefix}scratch", on_epoch=x.epoch_callback("scratch"))
        out.insert(0, pt_variant(f"{x.prefix}scratch", "scratch-baseline", s.best, x.head, x.cfg, x.imgsz, x.work,
                                 {"student": dc.student, "epochs": dc.epochs}))
    return StepOutput(out, v)


def _prune(x: StepContext) -> StepOutput:
    from damage.tasks.training import prune as P

    pc = x.cfg.compress.prune
    pruned, rep = P.prune_structured(x.head.weights, x.work / f"{x.prefix}pruned.pt", pc.ratio, imgsz=x.imgsz,
                                     importance=pc.importance)
    v = pt_variant(f"{x.prefix}pruned", "pruned", pruned, x.head, x.cfg, x.imgsz, x.work, rep.as_dict())
    out = [v]
    if pc.finetune_epochs > 0:
        ft_cfg = x.train_cfg.model_copy(update={"epochs": pc.finetune_epochs, "time_min": None})
        res = P.finetune_pruned(pruned, x.data_yaml, ft_cfg, x.work / "runs", seed=x.cfg.seed,
                                name=f"{x.prefix}pruned-ft", on_epoch=x.epoch_callback("finetune"))
        v = pt_variant(f"{x.prefix}pruned-ft", "finetuned", res.best, v, x.cfg, x.imgsz, x.work,
                       {"epochs": pc.finetune_epochs})
        out.append(v)
    return StepOutput(out, v)


def _unstructured(x: StepContext) -> StepOutput:
    from damage.tasks.training import prune as P

    pc = x.cfg.compress.prune
    path, rep = P.prune_unstructured(x.head.weights, x.work / f"{x.prefix}sparse.pt", pc.sparsity, scope=pc.scope,
                                     imgsz=x.imgsz)
    v = pt_variant(f"{x.prefix}sparse", "unstructured", path, x.head, x.cfg, x.imgsz, x.work,
                   {**rep.as_dict(), "note": "zeros are still multiplied: no speed-up on dense kernels"})
    return StepOutput([v], v)


def _qat(x: StepContext) -> StepOutput:
    if not x.head.weights:
        raise DamageError(f"compress step 'int8-qat': chain head '{x.head.name}' has no PyTorch weights")
    return StepOutput(qat_variants(x.head, x.data_yaml, x.cfg, x.work, x.evaluator, x.epoch_callback("qat"),
                                   "configured step"), x.head)


def _quantize(x: StepContext) -> StepOutput:
    cc = x.cfg.compress
    targets = [x.head] + ([x.root] if cc.quantize.also_parent and x.head.name != x.root.name else [])
    out = [quantize_variant(x.step, t, x.data_yaml, x.cfg, x.work, x.evaluator) for t in targets]
    if x.step == "int8-static":  # a row per further calibration setting tried, on the chain head
        out += [quantize_variant(x.step, x.head, x.data_yaml, x.cfg, x.work, x.evaluator, setting=st)
                for st in cc.quantize.also_try]
        why = qat_fallback_reason(out[0], cc.quantize.qat_max_float_share)
        if why and cc.quantize.qat_fallback and "int8-qat" not in cc.steps:
            from damage.tasks.training.qat import qat_missing

            missing = qat_missing() if x.head.weights else f"chain head '{x.head.name}' has no PyTorch weights"
            if missing:
                log.warning("QAT fallback skipped (%s): %s", why, missing)
                out[0].info["qat_fallback"] = f"skipped: {missing}"
            else:
                log.info("static INT8 of %s: %s: falling back to quantization-aware training", x.head.name, why)
                out[0].info["qat_fallback"] = why
                out += qat_variants(x.head, x.data_yaml, x.cfg, x.work, x.evaluator, x.epoch_callback("qat"), why)
    return StepOutput(out, x.head)


# What each step of ``damage.tasks.core.config.COMPRESS_STEPS`` does (a test checks that the two list the same steps).
STEP_RUNNERS: dict[str, Callable[[StepContext], StepOutput]] = {
    "distill": _distill,
    "prune": _prune,
    "unstructured": _unstructured,
    "int8-static": _quantize,
    "int8-dynamic": _quantize,
    "fp16": _quantize,
    "int8-nncf": _quantize,
    "int8-qat": _qat,
}


def apply_step(step: str, head: Variant, root: Variant, data_yaml: str | Path, cfg, work_dir: str | Path,
               evaluator: Evaluator, on_epoch=None) -> StepOutput:
    """Run one chain step on ``head`` (``root`` is the original parent): ``STEP_RUNNERS[step]``.

    Args:
        step: one of ``COMPRESS_STEPS``.
        head: current chain head (must have ``weights`` for PyTorch steps).
        root: the original parent (teacher for ``distill`` unless ``compress.distill.teacher``).
        data_yaml: dataset (training, calibration).
        cfg: full ``Config``.
        work_dir: where the step writes its files.
        evaluator: how every variant is measured; its ``imgsz`` is the training, export and
            calibration size too (``Evaluator.from_config``: the one image-size rule).
        on_epoch: per-epoch callback for training steps ``(step_name, epoch, metrics)``.
    """
    runner = STEP_RUNNERS.get(step)
    if runner is None:
        raise DamageError(f"compress step '{step}' is not one of {', '.join(STEP_RUNNERS)}")
    if step in PT_STEPS and not head.weights:
        raise DamageError(f"compress step '{step}': chain head '{head.name}' has no PyTorch weights")
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    return runner(StepContext(step, head, root, data_yaml, cfg, work, evaluator, on_epoch))


def qat_fallback_reason(v: Variant, max_float_share: float) -> str | None:
    """Why the accuracy-aware static INT8 variant ``v`` calls for QAT, None when it does not.

    It does when it missed the tolerance (overall or per class) or met it only by returning more
    than ``max_float_share`` of the graph's nodes to float (a mostly-float "INT8" model).

    Example:
        >>> v = Variant("int8-static", "int8-static", "m.onnx", info={"within_tolerance": True,
        ...             "float_nodes": 40, "graph_nodes": 300})
        >>> qat_fallback_reason(v, 0.1)
        'returned 40 of 300 nodes (13.3%) to float, more than 10%'
    """
    info = v.info
    if "within_tolerance" not in info:
        return None
    if not info["within_tolerance"]:
        return "outside the accuracy tolerance after the accuracy-aware retries"
    n, total = int(info.get("float_nodes") or 0), int(info.get("graph_nodes") or 0)
    if total and n / total > max_float_share:
        return f"returned {n} of {total} nodes ({100 * n / total:.1f}%) to float, more than {100 * max_float_share:g}%"
    return None


def qat_variants(head: Variant, data_yaml: str | Path, cfg, work: Path, evaluator: Evaluator, on_epoch,
                 reason: str) -> list[Variant]:
    """Quantization-aware training of ``head`` (``damage.tasks.training.qat``), then the pipeline's static INT8.

    Two rows: ``qat-fp32`` (the QAT-trained weights exported to ONNX, through the parity gate) and
    ``int8-qat`` (its accuracy-aware static INT8: the deployable one; registered weights = the
    QAT-trained .pt).
    """
    from damage.tasks.training.qat import qat_finetune

    qc = cfg.compress.quantize
    imgsz = int(evaluator.imgsz or cfg.imgsz)
    prefix = (head.name + "-") if head.kind != "parent" else ""
    tcfg = cfg.train.model_copy(update={"imgsz": imgsz})
    plain, _ = qat_finetune(head.weights, data_yaml, tcfg, work / "runs", qc.qat_epochs, qc.qat_lr_scale,
                            seed=cfg.seed, name=f"{prefix}qat", on_epoch=on_epoch)
    info = {"qat_epochs": qc.qat_epochs, "qat_lr0": cfg.train.lr0 * qc.qat_lr_scale, "reason": reason,
            "backend": "nvidia-modelopt fake quantization (Ultralytics quantize=8)"}
    fp = pt_variant(f"{prefix}qat-fp32", "qat-fp32", plain, head, cfg, imgsz, work, info)
    q = quantize_variant("int8-static", fp, data_yaml, cfg, work, evaluator)
    q.name, q.kind, q.parent = f"{prefix}int8-qat", "int8-qat", head.name
    q.info.update(info)
    return [fp, q]


def quant_setting_label(calibrate_method: str, per_channel: bool, activation_symmetric: bool = False) -> str:
    """``minmax/per-channel`` (``+sym-act`` with symmetric activations): the table's ``setting`` cell."""
    return (f"{calibrate_method}/{'per-channel' if per_channel else 'per-tensor'}"
            + ("+sym-act" if activation_symmetric else ""))


def quantize_variant(mode: str, src: Variant, data_yaml: str | Path, cfg, work: Path, evaluator: Evaluator,
                     setting=None) -> Variant:
    """Quantize ``src.onnx`` with ``mode``; INT8 static runs the accuracy-aware loop, measured by
    ``evaluator`` (the one that measured ``src``, so the float baseline and the attempts compare).

    ``setting`` (a ``QuantSetting`` of ``compress.quantize.also_try``) replaces the configured
    calibration method and weight granularity; its variant's name carries the setting
    (``int8-static[entropy/per-tensor]``), the default one keeps the plain mode name.
    """
    from damage.tasks.export import quantize as Q
    from damage.tasks.export.calibration import calibration_images
    qc = cfg.compress.quantize
    method = setting.calibrate_method if setting is not None else qc.calibrate_method
    per_channel = setting.per_channel if setting is not None else qc.per_channel
    label = quant_setting_label(method, per_channel, qc.activation_symmetric)
    name = f"{src.name}-{mode}" if src.kind != "parent" else mode
    if setting is not None:
        name += f"[{label}]"
    out = work / f"{name.replace('/', '-')}.onnx"
    info: dict[str, Any] = {"mode": mode, "source": src.onnx, "source_weights": src.weights}
    if mode == "int8-static":
        info["setting"] = label
        calib = calibration_images(data_yaml, qc.calib_images, seed=cfg.seed)
        float_metrics = src.metrics or None
        res = Q.quantize_accuracy_aware(src.onnx, out, data_yaml, calib, tolerance=cfg.compress.tolerance,
                                        max_retries=qc.max_retries, nodes_per_retry=qc.nodes_per_retry,
                                        evaluate_fn=evaluator.metrics_fn(data_yaml),
                                        imgsz=evaluator.imgsz, per_channel=per_channel,
                                        sensitivity_images=qc.sensitivity_images, float_metrics=float_metrics,
                                        calibrate_method=method, activation_symmetric=qc.activation_symmetric,
                                        class_tolerance=cfg.compress.class_tolerance)
        info.update(res.summary())
    elif mode == "int8-nncf":
        from damage.tasks.export.nncf_quant import quantize_nncf

        calib = calibration_images(data_yaml, qc.calib_images, seed=cfg.seed)
        quantize_nncf(src.onnx, out, calib, int(evaluator.imgsz or cfg.imgsz), preset=qc.nncf_preset)
        info.update({"preset": qc.nncf_preset, "calib_images": len(calib)})
    else:
        if mode == "int8-dynamic":
            info["setting"] = "per-channel" if qc.per_channel else "per-tensor"
        Q.quantize_onnx(src.onnx, out, mode, per_channel=qc.per_channel if mode == "int8-dynamic" else None)
    return Variant(name, mode, str(out), src.name, None, src.params, src.gflops, info=info)


