"""NNCF post-training INT8 quantization of an FP32 ONNX model (optional: ``pip install 'damage[nncf]'``).

NNCF (OpenVINO's compression framework) quantizes the ONNX graph itself and writes QDQ ONNX, so
the result runs on either predictor runtime and goes through the same evaluator and gate as
``damage.tasks.export.quantize``'s variants. Its defaults differ from ours where it matters on CPUs:
the ``performance`` preset (symmetric weights and activations), fast bias correction, and its own
pattern-based choice of which activations to quantize. The head's box/score decode stays float
for the same reason as in ``damage.tasks.export.quantize.head_postprocess_nodes`` (one uint8 scale for
pixel boxes and 0..1 scores zeroes the scores).

Example:
    >>> quantize_nncf("best.onnx", "best.int8-nncf.onnx", calib_images=imgs, imgsz=160)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from damage.tasks.core.atomic import atomic_write
from damage.tasks.core.errors import DamageError

log = logging.getLogger(__name__)

NNCF_PRESETS = ("performance", "mixed")


def nncf_available() -> bool:
    """True when the optional ``nncf`` package imports (OpenVINO's telemetry blocked first)."""
    from damage.tasks.core.quiet import quiet_openvino

    quiet_openvino()
    try:
        import nncf  # noqa: F401
    except ImportError:
        return False
    return True


def quantize_nncf(onnx_in: str | Path, onnx_out: str | Path, calib_images: Sequence[Path], imgsz: int,
                  preset: str = "performance", subset_size: int | None = None,
                  exclude_nodes: Sequence[str] | None = None) -> Path:
    """INT8 (QDQ) copy of ``onnx_in`` by NNCF post-training quantization; metadata carried over.

    Args:
        onnx_in: FP32 ONNX (``damage.tasks.export.onnx.export_onnx``).
        onnx_out: file to write (atomic).
        calib_images: calibration images (the train split; ``calibration.calibration_images``).
        imgsz: letterbox size of the calibration inputs (the model's size).
        preset: ``performance`` (symmetric) or ``mixed`` (asymmetric activations).
        subset_size: calibration images used (default: all given).
        exclude_nodes: node names kept in float besides the head decode.

    Returns:
        ``onnx_out``.

    Raises:
        DamageError: NNCF is not installed, an unknown preset, no calibration images, or NNCF failed
            (the message names the file).
    """
    if not nncf_available():
        raise DamageError(f"{onnx_in}: NNCF quantization needs the optional package: pip install 'damage[nncf]'")
    if preset not in NNCF_PRESETS:
        raise DamageError(f"{onnx_in}: unknown NNCF preset {preset!r} (expected one of {', '.join(NNCF_PRESETS)})")
    if not calib_images:
        raise DamageError(f"{onnx_in}: NNCF quantization needs calibration images")
    import nncf
    import onnx

    from damage.tasks.export.calibration import preprocess_image
    from damage.tasks.export.onnx_graph import (
        copy_metadata,
        ensure_node_names,
        graph_input_name,
        head_postprocess_nodes,
    )

    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    model = onnx.load(str(onnx_in))
    ensure_node_names(model)
    keep_float = sorted(set(head_postprocess_nodes(model)) | set(exclude_nodes or []))
    name = graph_input_name(model)
    images = list(calib_images)
    data = nncf.Dataset(images, lambda p: {name: preprocess_image(p, imgsz)})
    try:
        q = nncf.quantize(model, data, preset=getattr(nncf.QuantizationPreset, preset.upper()),
                          target_device=nncf.TargetDevice.CPU, subset_size=subset_size or len(images),
                          ignored_scope=nncf.IgnoredScope(names=keep_float, validate=False))
    except Exception as e:
        raise DamageError(f"{onnx_in}: NNCF quantization failed: {e}") from e
    info: dict[str, Any] = {"mode": "int8-nncf", "preset": preset, "calib_images": min(len(images),
                                                                                      subset_size or len(images)),
                            "float_nodes": len(keep_float), "nncf": nncf.__version__}
    copy_metadata(model, q, {"damage.quantization": info})
    return atomic_write(onnx_out, lambda tmp: onnx.save(q, tmp))
