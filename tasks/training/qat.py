"""Quantization-aware training (QAT): the fallback when post-training INT8 loses too much.

Ultralytics 8.4 trains with fake quantization when ``quantize=8`` is passed to ``train``: it
swaps every ``Conv``/``Linear`` for NVIDIA ModelOpt's quantized twin (INT8 weights per channel,
INT8 inputs per tensor, ranges calibrated on 8 training batches and then held), keeps the head's
output convolutions in float, and trains on. The straight-through estimator lets the weights
move to where INT8 rounding costs least. ModelOpt runs on the CPU (``torch.fake_quantize``).

What this module gives the compression chain is the *QAT-trained weights as a plain
checkpoint*: the ``modelopt`` state (the fake quantizers) is removed, so the ``.pt`` loads
without ModelOpt and exports to a float ONNX that the pipeline's own static INT8
(``damage.tasks.export.quantize``) then quantizes. Why not ModelOpt's own Q/DQ export: it quantizes only
convolution inputs and weights, so every SiLU, Add and Concat between them stays float and ONNX
Runtime cannot fuse a DQ -> Conv without a Q after it into an int8 kernel; measured on the demo
model (160 px, 2 cores, AVX-512 VNNI) that graph ran at 7.2 ms against 3.3 ms for FP32 and 2.2 ms
for the pipeline's INT8 (bench/learning_experiments.md, session 7). Per-channel weight grids
survive the BatchNorm fold (each output channel is scaled by one factor), so the weights keep
the rounding they were trained for.

ModelOpt is optional (``pip install '.[qat]'``: ``nvidia-modelopt`` and ``huggingface_hub``,
which its torch plugins import): without it :func:`qat_finetune` raises a clear error and the
compression chain's automatic fallback says why it was skipped.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from damage.tasks.core.config import TrainConfig
from damage.tasks.core.errors import DamageError

QAT_INSTALL_HINT = "pip install '.[qat]' (nvidia-modelopt and huggingface_hub)"


def qat_missing() -> str | None:
    """Why QAT cannot run here (a missing package), or None when it can."""
    missing = [m for m in ("modelopt", "huggingface_hub") if importlib.util.find_spec(m) is None]
    return f"quantization-aware training needs {', '.join(missing)}: {QAT_INSTALL_HINT}" if missing else None


def plain_checkpoint(qat_pt: Path, out: Path) -> Path:
    """``qat_pt`` without its ModelOpt state: the QAT-trained weights as an ordinary Ultralytics checkpoint.

    Ultralytics saves a QAT model's layers already reverted to plain ones (``strip_qat``) with the
    quantizers beside them under ``modelopt``; dropping that key leaves a checkpoint that loads
    (and exports) without ModelOpt. Written atomically.
    """
    import torch

    from damage.tasks.core.atomic import atomic_write

    ckpt: dict[str, Any] = torch.load(qat_pt, map_location="cpu", weights_only=False)  # our own training output
    if not isinstance(ckpt, dict) or (ckpt.get("ema") or ckpt.get("model")) is None:
        raise DamageError(f"{qat_pt}: not an Ultralytics checkpoint")
    had = ckpt.pop("modelopt", None) is not None
    if not had:
        raise DamageError(f"{qat_pt}: no ModelOpt state: it was not trained with quantization (quantize=8)")
    ckpt.setdefault("train_args", {})["quantize"] = None  # loading must not re-apply fake quantization
    return atomic_write(Path(out), lambda tmp: torch.save(ckpt, tmp))


def qat_finetune(weights: str | Path, data_yaml: str | Path, cfg: TrainConfig, out_dir: str | Path, epochs: int,
                 lr_scale: float, seed: int = 0, name: str = "qat", on_epoch=None) -> tuple[Path, Any]:
    """Fine-tune ``weights`` with INT8 fake quantization for ``epochs``; return the plain QAT-trained .pt.

    Args:
        weights: the float checkpoint to adapt (the chain head).
        data_yaml: training data (also the 8 calibration batches of the ranges).
        cfg: training settings (image size, batch, optimiser, augmentation); ``epochs``, the time
            budget, the guard and per-epoch validation are set here.
        out_dir: Ultralytics project folder; the run lands in ``out_dir/name``.
        epochs: QAT epochs.
        lr_scale: lr0 = ``cfg.lr0 * lr_scale`` (no warmup): the weights only need to settle onto
            the INT8 grid. On the demo model (3 epochs) 0.01 and 0.1 gave INT8 mask mAP50 0.767 and
            0.765, one run each: no clear difference; the smaller step stays nearer the parent.
        seed: training seed.
        name: run folder name.
        on_epoch: per-epoch callback ``(epoch, metrics)``.

    Returns:
        ``(plain_pt, TrainResult)``: the ModelOpt-free checkpoint next to the run's weights.

    Raises:
        DamageError: ModelOpt (or huggingface_hub) is not installed; the checkpoint does not load.
    """
    why = qat_missing()
    if why:
        raise DamageError(why)
    from damage.tasks.training.train import train_model

    w = Path(weights)
    if not w.is_file():
        raise DamageError(f"QAT: checkpoint '{w}' not found")
    qcfg = cfg.model_copy(update={"weights": str(w), "finetune": True, "finetune_lr_scale": 1.0,
                                  "lr0": cfg.lr0 * lr_scale, "warmup_epochs": 0.0, "epochs": int(epochs),
                                  "time_min": None, "finetune_guard": False, "val": False, "resume": None,
                                  "patience": 0})
    res = train_model(data_yaml, qcfg, out_dir, seed=seed, name=name, on_epoch=on_epoch,
                      extra_args={"quantize": 8, "plots": False})
    return plain_checkpoint(res.best, res.best.with_name("qat-plain.pt")), res
