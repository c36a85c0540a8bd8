"""Structured (channel) and unstructured (L1) pruning of YOLO-seg models (YOLOv8, YOLO11, YOLO26).

Structured pruning removes whole channels with torch-pruning, so the dense kernels really
get smaller and faster. What makes the families prunable:

* ``C2f`` (YOLOv8) and ``C3k2`` (YOLO11/26, a C2f with other inner blocks and C2f's forward)
  split one ``cv1`` output with ``chunk``; torch-pruning cannot trace a channel split, so each
  is first swapped for :class:`C2f_v2`, a split-free twin with two convolutions (``cv0``,
  ``cv1``) that produces identical outputs. ``C2PSA`` (YOLO11/26) splits the same way and gets
  :class:`C2PSA_v2`.
* Attention blocks (inside C2PSA and attention C3k2) reshape their channels into heads of a
  fixed size, so every group that touches one is left unpruned (``ignored_layers``).
* The head's final convolutions (box distribution, class logits, mask coefficients and the
  prototype output; YOLO26's one-to-one branch and the semantic-segmentation output its
  ``Proto26`` trains with) define the output format and are never pruned (``ignored_layers``).
* The trace must see every branch training uses, not just the inference path: YOLO26's
  one-to-one head and ``Proto26.semseg`` do not reach the eval-mode outputs, so the trace
  collects every tensor of the head's output (both branches) and runs ``Proto26`` as in
  training; otherwise those layers keep their full input width and fine-tuning fails.

The pruned module is saved as an ordinary Ultralytics checkpoint (``{"model": module}``),
so ``YOLO(path)``, the validator and the exporter load it unchanged; :class:`C2f_v2`
lives here, so unpickling needs ``damage.tasks.training.prune`` importable (it is, inside this package).

Fine-tuning goes through :func:`damage.tasks.training.train.train_model` with
:class:`PrunedSegmentationTrainer`, whose ``get_model`` returns the loaded pruned module
instead of rebuilding the full-width model from its YAML.

Unstructured pruning zeroes individual weights (L1, global or per layer). Dense CPU kernels
do the same multiply-adds on zeros, so it brings no speed-up; it is offered for size after
compression and as a baseline, and its masks are made permanent before saving/export.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from damage.tasks.core.errors import DamageError, load_file

# Pruning methods: rows with the arguments each accepts (an unknown argument is an error).
PRUNE_METHODS: dict[str, dict[str, Any]] = {
    "structured": {
        "args": {"ratio", "importance", "imgsz", "round_to"},
        "speedup": True,
        "doc": "channel pruning (torch-pruning, group L2 magnitude); smaller dense kernels",
    },
    "unstructured": {
        "args": {"sparsity", "scope"},
        "speedup": False,
        "doc": "L1 weight zeroing (global or per layer); no speed-up on dense kernels",
    },
}


def check_method_args(method: str, **kwargs: Any) -> None:
    """Raise if ``method`` is unknown or gets an argument its row does not list.

    Raises:
        DamageError: unknown method or unsupported argument.
    """
    if method not in PRUNE_METHODS:
        raise DamageError(f"unknown pruning method '{method}' (choose from {', '.join(PRUNE_METHODS)})")
    bad = set(k for k, v in kwargs.items() if v is not None) - PRUNE_METHODS[method]["args"]
    if bad:
        raise DamageError(f"pruning method '{method}' does not accept {sorted(bad)}; "
                          f"it accepts {sorted(PRUNE_METHODS[method]['args'])}")


# --------------------------------------------------------------------------- C2f -> C2f_v2
class C2f_v2(nn.Module):  # noqa: N801 (name used by the torch-pruning YOLOv8 recipe)
    """Split-free C2f: ``cv0`` and ``cv1`` replace the one ``cv1`` whose output C2f chunks.

    Output is identical to the C2f it was built from (:func:`c2f_to_v2`); torch-pruning can
    trace it because no tensor is split along channels.
    """

    def __init__(self, cv0: nn.Module, cv1: nn.Module, cv2: nn.Module, m: nn.ModuleList):
        super().__init__()
        self.cv0, self.cv1, self.cv2, self.m = cv0, cv1, cv2, m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv0(x), self.cv1(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def _half_conv(conv_block: nn.Module, sl: slice) -> nn.Module:
    """Copy of an Ultralytics ``Conv`` (conv+bn+act) keeping output channels ``sl``."""
    from ultralytics.nn.modules.conv import Conv

    src_conv, src_bn = conv_block.conv, conv_block.bn
    out = sl.stop - sl.start
    new = Conv(src_conv.in_channels, out, src_conv.kernel_size[0], src_conv.stride[0])
    new.conv = nn.Conv2d(src_conv.in_channels, out, src_conv.kernel_size, src_conv.stride, src_conv.padding,
                         dilation=src_conv.dilation, groups=src_conv.groups, bias=src_conv.bias is not None)
    new.conv.weight.data.copy_(src_conv.weight.data[sl])
    if src_conv.bias is not None:
        new.conv.bias.data.copy_(src_conv.bias.data[sl])
    # Keep eps/momentum: YOLO uses eps=1e-3, momentum=0.03, not the torch defaults.
    new.bn = nn.BatchNorm2d(out, eps=src_bn.eps, momentum=src_bn.momentum)
    for name in ("weight", "bias"):
        getattr(new.bn, name).data.copy_(getattr(src_bn, name).data[sl])
    new.bn.running_mean.data.copy_(src_bn.running_mean[sl])
    new.bn.running_var.data.copy_(src_bn.running_var[sl])
    new.bn.num_batches_tracked.data.copy_(src_bn.num_batches_tracked)
    new.act = copy.deepcopy(conv_block.act)
    new.train(conv_block.training)  # a fresh BN is in training mode: match the source
    return new.to(device=src_conv.weight.device, dtype=src_conv.weight.dtype)


def c2f_to_v2(block: nn.Module) -> C2f_v2:
    """Build the :class:`C2f_v2` twin of a C2f block (weights copied, identical outputs)."""
    c = block.c
    new = C2f_v2(_half_conv(block.cv1, slice(0, c)), _half_conv(block.cv1, slice(c, 2 * c)), block.cv2, block.m)
    return _keep_layer_attrs(block, new)


class C2PSA_v2(nn.Module):  # noqa: N801 (named like C2f_v2)
    """Split-free C2PSA: ``cv0`` is the pass-through half, ``cv1`` feeds the attention blocks ``m``."""

    def __init__(self, cv0: nn.Module, cv1: nn.Module, cv2: nn.Module, m: nn.Module):
        super().__init__()
        self.cv0, self.cv1, self.cv2, self.m = cv0, cv1, cv2, m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv2(torch.cat((self.cv0(x), self.m(self.cv1(x))), 1))


def _keep_layer_attrs(old: nn.Module, new: nn.Module) -> nn.Module:
    # Ultralytics' graph runner reads these layer attributes (from-index, layer index, type, params).
    for attr in ("f", "i", "type", "np"):
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    return new


def c2psa_to_v2(block: nn.Module) -> C2PSA_v2:
    """Build the :class:`C2PSA_v2` twin of a C2PSA block (weights copied, identical outputs)."""
    c = block.c
    new = C2PSA_v2(_half_conv(block.cv1, slice(0, c)), _half_conv(block.cv1, slice(c, 2 * c)), block.cv2, block.m)
    return _keep_layer_attrs(block, new)


def _twin_table() -> dict[type, Any]:
    """Split blocks -> twin builders. Only these exact classes: C2f subclasses with their own
    forward (C2fAttn, C2fCIB, C2fPSA...) are not in the families and are left alone."""
    from ultralytics.nn.modules.block import C2PSA, C2f, C3k2

    return {C2f: c2f_to_v2, C3k2: c2f_to_v2, C2PSA: c2psa_to_v2}


def replace_c2f(module: nn.Module) -> int:
    """Swap every C2f / C3k2 / C2PSA under ``module`` for its split-free twin in place; returns how many."""
    table = _twin_table()
    n = 0
    for name, child in list(module.named_children()):
        build = table.get(type(child))
        if build is not None:
            setattr(module, name, build(child))
            n += 1
        else:
            n += replace_c2f(child)
    return n


# --------------------------------------------------------------------------- measurements
def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model: nn.Module) -> tuple[int, int]:
    """(non-zero, total) weights of the convolution layers."""
    nz = tot = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nz += int(torch.count_nonzero(m.weight).item())
            tot += m.weight.numel()
    return nz, tot


def gflops(model: nn.Module, imgsz: int) -> float:
    """GFLOPs at ``imgsz`` (Ultralytics' THOP profile; 0.0 if unavailable)."""
    from ultralytics.utils.torch_utils import get_flops

    return float(get_flops(copy.deepcopy(model).float(), imgsz))


# --------------------------------------------------------------------------- checkpoints
def load_model(weights: str | Path) -> nn.Module:
    """Load a YOLO .pt as an FP32 module in eval mode (pruned checkpoints included).

    Raises:
        DamageError: missing file or not an Ultralytics checkpoint.
    """
    from damage.tasks.training.checkpoint import load_ultralytics_checkpoint

    model, _ = load_file(Path(weights), load_ultralytics_checkpoint, "weights file")
    return model.float().eval()


def save_checkpoint(model: nn.Module, out: str | Path, source: str | Path | None = None,
                    meta: dict[str, Any] | None = None) -> Path:
    """Save ``model`` as a normal Ultralytics checkpoint (atomic write).

    ``train_args`` are carried over from ``source`` (so the task, imgsz and data survive),
    and ``meta`` is stored under ``"damage"`` (what was done to the model, with what knobs).
    """
    from ultralytics import __version__

    train_args: dict[str, Any] = {}
    if source is not None and Path(source).is_file():
        from damage.tasks.training.checkpoint import load_checkpoint_dict

        ck = load_checkpoint_dict(source)
        train_args = dict(ck.get("train_args") or {})
    m = copy.deepcopy(model).float().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    if hasattr(m, "criterion"):
        m.criterion = None
    ckpt = {
        "epoch": -1,
        "best_fitness": None,
        "model": m.half(),
        "ema": None,
        "updates": None,
        "optimizer": None,
        "train_args": train_args,
        "date": datetime.now(UTC).isoformat(),
        "version": __version__,
        "damage": dict(meta or {}),
    }
    from damage.tasks.core.atomic import atomic_write

    return atomic_write(out, lambda tmp: torch.save(ckpt, tmp), suffix=".pt.tmp")


# --------------------------------------------------------------------------- structured
def head_protected_layers(model: nn.Module) -> list[nn.Module]:
    """The head's output-defining layers, which must keep their channel counts.

    Final 1x1 convs of the box (cv2), class (cv3) and mask-coefficient (cv4) branches, the
    DFL conv, the prototype output conv of a Segment head (its width is ``nm``), the
    semantic-segmentation output of YOLO26's ``Proto26`` (width ``nc``), and every attention
    block (its channels are reshaped into heads of a fixed size).
    """
    from ultralytics.nn.modules.block import Attention
    from ultralytics.nn.modules.head import Detect

    keep: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, Detect):
            for name in ("cv2", "cv3", "cv4", "one2one_cv2", "one2one_cv3", "one2one_cv4"):
                branches = getattr(m, name, None)
                if branches is not None:
                    keep.extend(b[-1] for b in branches)
            if hasattr(m, "dfl"):
                keep.append(m.dfl)
            proto = getattr(m, "proto", None)
            if proto is not None:
                keep.append(proto.cv3)
                if getattr(proto, "semseg", None) is not None:
                    keep.append(proto.semseg[-1])
        elif isinstance(m, Attention):
            keep.append(m)
    return keep


def _tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) model output: both head branches reach the trace."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


class _TraceSemseg:
    """Within the block, ``Proto26`` returns its training-time semantic output too (eval BN kept)."""

    def __init__(self, model: nn.Module):
        proto = getattr(model.model[-1], "proto", None)
        self.proto = proto if getattr(proto, "semseg", None) is not None else None

    def __enter__(self):
        if self.proto is not None:
            proto, forward = self.proto, type(self.proto).forward

            def traced(x, return_semantic=True):
                proto.training = True  # this module's flag only: its BatchNorms stay in eval mode
                try:
                    return forward(proto, x, return_semantic=True)
                finally:
                    proto.training = False

            proto.forward = traced
        return self

    def __exit__(self, *exc):
        if self.proto is not None:
            self.proto.__dict__.pop("forward", None)


@dataclass
class PruneReport:
    """Before/after figures of a pruning step."""

    method: str
    params_before: int
    params_after: int
    gflops_before: float
    gflops_after: float
    settings: dict[str, Any] = field(default_factory=dict)
    sparsity: float | None = None

    def as_dict(self) -> dict[str, Any]:
        d = {
            "method": self.method,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "gflops_before": self.gflops_before,
            "gflops_after": self.gflops_after,
            **{f"setting.{k}": v for k, v in self.settings.items()},
        }
        if self.sparsity is not None:
            d["sparsity"] = self.sparsity
        return d


def prune_structured_model(model: nn.Module, ratio: float, imgsz: int = 640, importance: str = "l2",
                           round_to: int | None = 8) -> nn.Module:
    """Channel-prune a YOLO(-seg) module of any family in place and return it.

    Args:
        model: Ultralytics DetectionModel/SegmentationModel (FP32) of YOLOv8, YOLO11 or YOLO26.
        ratio: fraction of channels removed from every prunable group (0 < ratio < 1).
        imgsz: example input size for tracing.
        importance: "l1" or "l2" group magnitude.
        round_to: keep channel counts multiples of this (fast kernels); None = exact.

    Raises:
        DamageError: ratio out of range, unknown importance, or a model whose blocks cannot be
            pruned (the message names the family).
    """
    import torch_pruning as tp

    from damage.tasks.core.families import family_name

    if not 0 < ratio < 1:
        raise DamageError(f"prune ratio must be in (0, 1), got {ratio}")
    p = {"l1": 1, "l2": 2}.get(importance)
    if p is None:
        raise DamageError(f"unknown importance '{importance}' (choose l1 or l2)")
    replace_c2f(model)
    model.float().eval()
    for q in model.parameters():  # torch-pruning traces grad_fn; frozen params (DFL) would be invisible
        q.requires_grad_(True)
    example = torch.zeros(1, 3, imgsz, imgsz)

    family = family_name(model)
    try:
        with _TraceSemseg(model):
            pruner = tp.pruner.MetaPruner(
                model,
                example,
                importance=tp.importance.GroupMagnitudeImportance(p=p),
                pruning_ratio=ratio,
                ignored_layers=head_protected_layers(model),
                round_to=round_to,
                output_transform=_tensors,
            )
            pruner.step()
        for q in model.parameters():
            q.requires_grad_(False)
        # The head caches anchors by input shape; force a recompute on the next call.
        model.model[-1].shape = None
        model.eval()
        with torch.no_grad():  # a pruned graph that no longer runs is a pruning failure, not a later one
            model(example)
    except DamageError:
        raise
    except Exception as e:
        raise DamageError(f"structured pruning failed for this {family} model (prune step): {e}") from e
    return model


def prune_structured(weights: str | Path, out: str | Path, ratio: float, imgsz: int = 640,
                     importance: str = "l2", round_to: int | None = 8) -> tuple[Path, PruneReport]:
    """Load ``weights``, channel-prune by ``ratio``, save a normal Ultralytics checkpoint.

    Returns:
        (path of the pruned .pt, report with params and GFLOPs before/after).

    Example:
        >>> path, rep = prune_structured("best.pt", "pruned.pt", ratio=0.3, imgsz=160)
        >>> rep.params_after < rep.params_before
        True
    """
    check_method_args("structured", ratio=ratio, importance=importance, imgsz=imgsz, round_to=round_to)
    model = load_model(weights)
    p0, f0 = count_params(model), gflops(model, imgsz)
    model = prune_structured_model(model, ratio, imgsz, importance, round_to)
    p1, f1 = count_params(model), gflops(model, imgsz)
    settings = {"ratio": ratio, "importance": importance, "round_to": round_to}
    rep = PruneReport("structured", p0, p1, f0, f1, settings)
    path = save_checkpoint(model, out, source=weights, meta={"kind": "pruned", "parent": str(weights), **settings,
                                                            "params_before": p0, "params_after": p1})
    return path, rep


# --------------------------------------------------------------------------- unstructured
def prune_unstructured_model(model: nn.Module, sparsity: float, scope: str = "global") -> float:
    """Zero the smallest-|w| conv weights (L1) in place; masks made permanent. Returns achieved sparsity.

    The head's output layers are left dense (as in structured pruning). ``scope="global"``
    ranks all conv weights together; ``"layer"`` prunes each layer by ``sparsity``.

    Raises:
        DamageError: bad sparsity or scope.
    """
    from torch.nn.utils import prune as tprune

    if not 0 < sparsity < 1:
        raise DamageError(f"unstructured sparsity must be in (0, 1), got {sparsity}")
    if scope not in ("global", "layer"):
        raise DamageError(f"unstructured scope must be 'global' or 'layer', got '{scope}'")
    protected = {id(m) for m in head_protected_layers(model)}
    protected |= {id(c) for m in head_protected_layers(model) for c in m.modules()}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and id(m) not in protected]
    params = [(m, "weight") for m in convs]
    if scope == "global":
        tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=sparsity)
    else:
        for m in convs:
            tprune.l1_unstructured(m, "weight", amount=sparsity)
    for m in convs:  # make masks permanent: weight becomes a plain Parameter again (exportable)
        tprune.remove(m, "weight")
    nz = sum(int(torch.count_nonzero(m.weight).item()) for m in convs)
    tot = sum(m.weight.numel() for m in convs)
    return 1.0 - nz / max(tot, 1)


def prune_unstructured(weights: str | Path, out: str | Path, sparsity: float,
                       scope: str = "global", imgsz: int = 640) -> tuple[Path, PruneReport]:
    """L1 unstructured pruning of ``weights``; saves a checkpoint and reports the achieved sparsity.

    The parameter count and FLOPs do not change (zeros are still stored and multiplied):
    the report says so honestly with ``params_after == params_before``.
    """
    check_method_args("unstructured", sparsity=sparsity, scope=scope)
    model = load_model(weights)
    p0, f0 = count_params(model), gflops(model, imgsz)
    achieved = prune_unstructured_model(model, sparsity, scope)
    nz, tot = count_nonzero(model)
    settings = {"sparsity": sparsity, "scope": scope}
    rep = PruneReport("unstructured", p0, count_params(model), f0, gflops(model, imgsz), settings,
                      sparsity=achieved)
    rep.settings["nonzero_conv_weights"] = nz
    rep.settings["conv_weights"] = tot
    path = save_checkpoint(model, out, source=weights,
                           meta={"kind": "unstructured", "parent": str(weights), **settings, "sparsity": achieved})
    return path, rep


# --------------------------------------------------------------------------- fine-tuning
def _pruned_trainer_cls():
    """SegmentationTrainer whose ``get_model`` keeps the loaded (pruned) module.

    Built lazily so importing this module does not import Ultralytics' trainer stack.
    """
    from ultralytics.models.yolo.segment import SegmentationTrainer

    class PrunedSegmentationTrainer(SegmentationTrainer):
        """Fine-tunes the module it is given instead of rebuilding the full model from YAML."""

        def get_model(self, cfg=None, weights=None, verbose=True):
            if isinstance(weights, nn.Module):
                model = weights
                for q in model.parameters():
                    q.requires_grad_(True)
                return self.set_model_names_for_load(model) if hasattr(self, "set_model_names_for_load") else model
            raise DamageError("PrunedSegmentationTrainer needs a loaded pruned model (a .pt), not a YAML")

    return PrunedSegmentationTrainer


def __getattr__(name: str):  # PrunedSegmentationTrainer resolves lazily (see _pruned_trainer_cls)
    if name == "PrunedSegmentationTrainer":
        return _pruned_trainer_cls()
    raise AttributeError(name)


def finetune_pruned(pruned_weights: str | Path, data_yaml: str | Path, cfg, out_dir: str | Path,
                    seed: int = 0, name: str = "finetune", on_epoch=None):
    """Fine-tune a pruned checkpoint, keeping its pruned architecture.

    Args:
        pruned_weights: .pt written by :func:`prune_structured`.
        data_yaml: dataset.
        cfg: ``TrainConfig``; ``model``/``weights`` are replaced by the pruned checkpoint.
        out_dir, seed, name, on_epoch: as in :func:`damage.tasks.training.train.train_model`.

    Returns:
        ``TrainResult`` (best.pt has the pruned parameter count).
    """
    from damage.tasks.training.train import train_model

    cfg = cfg.model_copy(update={"model": str(Path(pruned_weights).resolve()), "weights": None,
                                 "resume": None, "finetune": False})
    return train_model(data_yaml, cfg, out_dir, seed=seed, name=name, on_epoch=on_epoch,
                       trainer_cls=_pruned_trainer_cls())
