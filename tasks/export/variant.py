"""A compression variant (one row of the comparison table), what a chain step returns, and the step table.

Below both ``compress`` (the chain, measurement, gate, table) and ``chain_steps`` (what each step does).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from damage.tasks.core.config import COMPRESS_STEPS

# The step names come from one table (``damage.tasks.core.config.COMPRESS_STEPS``): PyTorch steps change the
# chain head's weights, quantization steps rewrite its ONNX file and must come after them.
PT_STEPS = tuple(s for s, kind in COMPRESS_STEPS.items() if kind == "pytorch")
QUANT_STEPS = tuple(s for s, kind in COMPRESS_STEPS.items() if kind == "quantization")
FORWARD_MS = "latency/forward_ms"  # ONNX Runtime forward pass alone, batch 1, median (``ort_latency_ms``)
TABLE_COLUMNS = ("name", "kind", "parent", "setting", "mask/mAP50", "mask/mAP50-95", "box/mAP50", "box/mAP50-95",
                 "latency_ms", FORWARD_MS, "size_mb", "params", "gflops", "delta_mask_mAP50", "candidate", "chosen",
                 "onnx")


@dataclass
class Variant:
    """One model in the comparison table."""

    name: str
    kind: str
    onnx: str
    parent: str | None = None
    weights: str | None = None  # the .pt it came from (None for quantized files)
    params: int | None = None
    gflops: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    per_class: list[dict[str, Any]] = field(default_factory=list)  # the evaluator's rows (the model card's table)
    candidate: bool = False
    chosen: bool = False

    def row(self) -> dict[str, Any]:
        own = {"name": self.name, "kind": self.kind, "parent": self.parent or "", "setting": self.info.get("setting", ""),
               "params": self.params, "gflops": self.gflops, "candidate": self.candidate, "chosen": self.chosen,
               "onnx": self.onnx}
        return {k: own[k] if k in own else self.metrics.get(k) for k in TABLE_COLUMNS}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StepOutput:
    """Variants a step made and the new chain head (PyTorch steps move it; quantization does not)."""

    variants: list[Variant]
    head: Variant


def pt_stats(weights: str | Path, imgsz: int) -> tuple[int, float]:
    """(params, GFLOPs at ``imgsz``) of a .pt."""
    from damage.tasks.training.prune import count_params, gflops, load_model

    m = load_model(weights)
    return count_params(m), gflops(m, imgsz)
