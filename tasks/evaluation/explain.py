"""Per-instance explanations of a YOLO-seg model: Grad-CAM, HiResCAM and EigenCAM heatmaps
(``damage.tasks.evaluation.cam_methods``), each with its fidelity (``damage.tasks.evaluation.fidelity``: heat in the
box and mask, and the score drop when its hottest pixels are greyed out).

Grad-CAM (Selvaraju et al. 2017) for one detected instance: the gradient of that instance's
class logit, taken at the anchor NMS kept, with respect to a feature layer; channel weights are
the spatially averaged gradients, the map is the ReLU of the weighted sum of activations. The
default layer is the neck output that feeds the head at the instance's stride (``model.15``,
``model.18``, ``model.21`` for YOLOv8-seg strides 8, 16, 32, read from the head's ``f``), so
each instance is explained at the scale it was detected at. EigenCAM (Muhammad & Yeasin 2020)
is gradient-free: the first principal component of the layer's activations. It depends on the
layer only, so instances explained at the same layer share one EigenCAM map.

Everything is done with forward hooks on the Ultralytics model; no extra dependency.

Example:
    >>> exps = explain_image("best.pt", Path("car.png"), method="gradcam")
    >>> exps[0].name, exps[0].heatmap.shape, exps[0].layer
    ('dent', (480, 640), 'model.15')
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

import cv2
import numpy as np

from damage.tasks.core.atomic import atomic_write_json
from damage.tasks.core.errors import DamageError, DatasetError
from damage.tasks.evaluation.cam_methods import GRADIENT_MAPS, METHODS, eigencam_map
from damage.tasks.evaluation.fidelity import box_mass_share, deletion, pointing
from damage.tasks.evaluation.overlays import make_grid, render_overlay, render_summary, write_png

if TYPE_CHECKING:  # torch is imported lazily: importing this module stays cheap
    import torch

    from damage.tasks.core.config import ExplainConfig


@dataclass
class InstanceExplanation:
    """One detected instance and its heatmap, in original-image pixel coordinates.

    Attributes:
        cls: class index.
        name: class name.
        score: detection confidence (sigmoid of the class logit).
        box: ``[x1, y1, x2, y2]`` float32.
        mask: bool ``H x W`` instance mask.
        heatmap: float32 ``H x W`` in ``[0, 1]`` (all zeros when nothing in the layer supports the class).
        layer: module name the heatmap was computed at (``model.15``).
        method: ``gradcam`` or ``eigencam``.
        anchor: index of the anchor (column of the raw head output) that NMS kept.
        stride: stride of the head level of that anchor (8, 16 or 32 for YOLOv8).
    """

    cls: int
    name: str
    score: float
    box: np.ndarray
    mask: np.ndarray
    heatmap: np.ndarray
    layer: str
    method: str
    anchor: int
    stride: int
    fidelity: dict[str, float] | None = None  # damage.tasks.evaluation.fidelity: pointing game + deletion check

    @property
    def label(self) -> str:
        return f"{self.name} {self.score:.2f}"

    def summary(self) -> dict[str, Any]:
        """JSON-friendly description (no arrays except the box)."""
        share, area = box_mass_share(self.heatmap, self.box)
        return {
            "class": self.name,
            "class_id": self.cls,
            "score": round(self.score, 4),
            "box": [round(float(v), 1) for v in self.box],
            "layer": self.layer,
            "method": self.method,
            "anchor": self.anchor,
            "stride": self.stride,
            "mask_pixels": int(self.mask.sum()),
            "heat_in_box": round(share, 4),
            "box_area_share": round(area, 4),
            "fidelity": {k: round(v, 4) for k, v in (self.fidelity or {}).items()},
        }


# ----------------------------------------------------------------------------- model loading


def load_model(model: str | Path | Any) -> Any:
    """An Ultralytics SegmentationModel in eval mode, from a ``.pt`` path or a module.

    Accepts a checkpoint path, an ``ultralytics.YOLO`` object or its ``.model``.

    Raises:
        DamageError: file missing, not a ``.pt``, unreadable, or not a segmentation model.
    """
    import torch

    if isinstance(model, (str, Path)):
        p = Path(model).expanduser()
        if not p.is_file():
            raise DamageError(f"{p}: model file not found")
        if p.suffix != ".pt":
            raise DamageError(f"{p}: explanations need a PyTorch .pt checkpoint (gradients), got '{p.suffix}'")
        from damage.tasks.training.checkpoint import load_ultralytics_checkpoint

        try:  # vetted first, then Ultralytics' restricted loader: no code from the file runs
            net, _ = load_ultralytics_checkpoint(p)
        except Exception as e:  # corrupt file, foreign pickle...
            raise DamageError(f"{p}: not a readable Ultralytics checkpoint ({e})") from e
    elif isinstance(model, torch.nn.Module):
        net = model
        inner = getattr(net, "model", None)
        if isinstance(inner, torch.nn.Module) and not isinstance(inner, torch.nn.Sequential):
            net = inner  # ultralytics.YOLO wrapper -> its SegmentationModel
    else:
        raise DamageError(f"model must be a .pt path or a torch module, got {type(model).__name__}")
    _segment_head(net, getattr(net, "pt_path", "model"))
    return net


def _segment_head(net: Any, where: str) -> Any:
    from ultralytics.nn.modules.head import Segment

    seq = getattr(net, "model", None)
    head = seq[-1] if seq is not None and len(seq) else None
    if not isinstance(head, Segment):
        raise DamageError(f"{where}: not an instance-segmentation model (last layer is "
                          f"{type(head).__name__}, expected Segment)")
    if getattr(head, "end2end", False):
        from damage.tasks.core.families import family_name

        raise DamageError(f"{where}: this {family_name(net)} model has its end-to-end (NMS-free) head selected; "
                          f"explain (Grad-CAM/EigenCAM) reads the one-to-many head: select it "
                          f"(model.end2end = False) or pass the training checkpoint")
    return head


def head_layers(net: Any) -> list[str]:
    """Module names of the layers feeding the Segment head, one per stride, smallest stride first."""
    head = _segment_head(net, "model")
    return [f"model.{j if j >= 0 else head.i + j}" for j in head.f]


def resolve_layer(net: Any, layer: str) -> str:
    """Accept ``"21"``, ``"model.21"`` or any dotted submodule name; return the full module name.

    Raises:
        DamageError: no such module (the message lists the head-feeding layers as examples).
    """
    names = dict(net.named_modules())
    cand = layer.strip()
    for name in (cand, f"model.{cand}"):
        if name in names and name:
            return name
    raise DamageError(f"layer '{layer}' not found in the model; try one of {', '.join(head_layers(net))} "
                      f"or an index 0-{len(net.model) - 1}")


# ----------------------------------------------------------------------------- image I/O


def read_image(image: Path | np.ndarray) -> np.ndarray:
    """BGR uint8 ``H x W x 3`` from a path or an array (grey and BGRA are converted).

    Raises:
        DamageError: unreadable file or an array of the wrong shape.
    """
    if isinstance(image, (str, Path)):
        p = Path(image)
        if not p.is_file():
            raise DamageError(f"{p}: image not found")
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is None:
            raise DamageError(f"{p}: not a readable image")
        return img
    img = np.asarray(image)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    if img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) < 1:
        raise DamageError(f"image array must be HxWx3 BGR, got shape {img.shape}")
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    return img


def _letterbox(img: np.ndarray, imgsz: int, stride: int) -> np.ndarray:
    from ultralytics.data.augment import LetterBox

    return LetterBox(new_shape=(imgsz, imgsz), auto=False, stride=stride)(image=img)


def _to_tensor(lb: np.ndarray, dtype) -> torch.Tensor:
    import torch

    x = np.ascontiguousarray(lb[..., ::-1].transpose(2, 0, 1))  # BGR HWC -> RGB CHW, as Ultralytics
    return torch.from_numpy(x).to(dtype).div(255.0)[None]


def _model_imgsz(net: Any, imgsz: int | None, stride: int) -> int:
    if imgsz is None:
        args = getattr(net, "args", None) or {}
        imgsz = args.get("imgsz", 640) if isinstance(args, dict) else getattr(args, "imgsz", 640)
        if isinstance(imgsz, (list, tuple)):
            imgsz = max(imgsz)
    return max(stride, int(math.ceil(int(imgsz) / stride) * stride))  # multiple of the largest stride


# ----------------------------------------------------------------------------- CAM maths


def _to_image(cam: torch.Tensor, input_hw: tuple[int, int], orig_hw: tuple[int, int]) -> np.ndarray:
    """Upsample a ``h x w`` map to the letterboxed input, cut the padding, resize to the original, scale to [0, 1]."""
    import torch.nn.functional as F
    from ultralytics.utils import ops

    m = F.interpolate(cam[None, None].float(), size=input_hw, mode="bilinear", align_corners=False)
    m = ops.scale_masks(m, orig_hw)[0, 0].clamp_min(0)
    top = float(m.max())
    out = (m / top).numpy() if top > 0 else np.zeros(orig_hw, np.float32)
    return np.ascontiguousarray(out, dtype=np.float32)


# ----------------------------------------------------------------------------- explainer


class _Hooks:
    """Forward hooks that keep the outputs of named modules for one forward pass."""

    def __init__(self, net: Any, names: Sequence[str]):
        self.outputs: dict[str, Any] = {}
        modules = dict(net.named_modules())
        self._handles = [modules[n].register_forward_hook(self._keep(n)) for n in names]

    def _keep(self, name: str):
        def hook(_module, _inputs, output):
            self.outputs[name] = output

        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _feature(outputs: dict[str, Any], name: str) -> torch.Tensor:
    import torch

    out = outputs.get(name)
    if not isinstance(out, torch.Tensor) or out.ndim != 4:
        kind = type(out).__name__ if not isinstance(out, torch.Tensor) else f"tensor of shape {tuple(out.shape)}"
        raise DamageError(f"layer '{name}' outputs a {kind}, not a B x C x H x W feature map")
    return out


def explain_image(
    model: str | Path | Any,
    image: Path | np.ndarray,
    method: str = "gradcam",
    layer: str | None = None,
    conf: float = 0.25,
    iou: float = 0.7,
    imgsz: int | None = None,
    max_instances: int = 20,
    fidelity: bool = True,
) -> list[InstanceExplanation]:
    """Detect instances in one image and explain each with a heatmap.

    Args:
        model: ``.pt`` checkpoint path, ``ultralytics.YOLO`` or its SegmentationModel.
        image: image path or BGR uint8 array.
        method: ``gradcam`` (per instance) or ``eigencam`` (per layer, gradient-free).
        layer: module to explain at (``"model.21"`` or ``"21"``); None = the neck layer feeding the
            head at each instance's stride.
        conf: confidence threshold of the detections to explain.
        iou: NMS IoU threshold.
        imgsz: letterbox size; None = the size the model was trained at.
        max_instances: explain at most this many instances (highest scores first).
        fidelity: measure each map (``damage.tasks.evaluation.fidelity``: pointing game, and the deletion
            check, which costs two forward passes per instance).

    Returns:
        One InstanceExplanation per kept detection, highest score first.

    Raises:
        DamageError: bad method, layer, model or image.
    """
    import torch
    from ultralytics.utils import ops
    from ultralytics.utils.nms import non_max_suppression

    if method not in METHODS:
        raise DamageError(f"unknown explain method '{method}': expected one of {', '.join(METHODS)}")
    if not 0 <= conf <= 1 or not 0 < iou <= 1:
        raise DamageError(f"conf must be in [0, 1] and iou in (0, 1], got conf={conf}, iou={iou}")
    net = load_model(model)
    head = _segment_head(net, "model")
    img = read_image(image)
    orig_hw = img.shape[:2]
    strides = [int(s) for s in head.stride.tolist()]
    size = _model_imgsz(net, imgsz, max(strides))
    param = next(net.parameters())
    x = _to_tensor(_letterbox(img, size, max(strides)), param.dtype).to(param.device)
    # Gradients flow to the activations through the input; the checkpoint's weights may be frozen.
    x.requires_grad_(True)

    per_level = head_layers(net)
    chosen = [resolve_layer(net, layer)] if layer else per_level
    hooks = _Hooks(net, sorted(set(chosen)))
    was_training = net.training
    net.eval()
    try:
        with torch.enable_grad():
            out = net(x)
            (decoded, proto), raw = out
            if "one2many" in raw:
                raw = raw["one2many"]
            dets, keep = non_max_suppression(decoded.detach(), conf, iou, nc=len(net.names),
                                             max_det=max_instances, return_idxs=True)
            det, anchors = dets[0], keep[0].long().view(-1)
            feats = {n: _feature(hooks.outputs, n) for n in set(chosen)}  # a bad --layer fails on any image
            if not len(det):
                return []
            counts = [f.shape[2] * f.shape[3] for f in raw["feats"]]
            bounds = np.cumsum(counts)
            masks = ops.process_mask(proto[0].detach(), det[:, 6:], det[:, :4].clone(), x.shape[2:], upsample=True)
            masks = ops.scale_masks(masks[None].float(), orig_hw)[0] > 0.5
            boxes = ops.scale_boxes(x.shape[2:], det[:, :4].clone(), orig_hw)
            eigen: dict[str, np.ndarray] = {}
            results = []
            for k in range(len(det)):
                a = int(anchors[k])
                level = int(np.searchsorted(bounds, a, side="right"))
                name = chosen[0] if layer else per_level[level]
                cls = int(det[k, 5])
                if method in GRADIENT_MAPS:
                    logit = raw["scores"][0, cls, a]
                    (grad,) = torch.autograd.grad(logit, feats[name], retain_graph=True)
                    cam = GRADIENT_MAPS[method](feats[name][0].detach(), grad[0])
                    heat = _to_image(cam, tuple(x.shape[2:]), orig_hw)
                else:
                    if name not in eigen:
                        eigen[name] = _to_image(eigencam_map(feats[name][0].detach()), tuple(x.shape[2:]), orig_hw)
                    heat = eigen[name].copy()
                box, mask = boxes[k].numpy().astype(np.float32), masks[k].numpy().astype(bool)
                fid = None
                if fidelity:  # the same anchor and class re-scored on the image with pixels greyed out
                    def score_fn(im, cls=cls, a=a):
                        return _anchor_score(net, im, size, max(strides), cls, a)

                    fid = {**pointing(heat, box, mask), **deletion(score_fn, img, heat, box, float(det[k, 4]))}
                results.append(InstanceExplanation(
                    cls=cls, name=str(net.names.get(cls, cls)) if isinstance(net.names, dict) else str(net.names[cls]),
                    score=float(det[k, 4]), box=box, mask=mask, heatmap=heat, layer=name, method=method,
                    anchor=a, stride=strides[level], fidelity=fid))
            return results
    finally:
        hooks.close()
        net.train(was_training)


def _anchor_score(net: Any, img: np.ndarray, size: int, stride: int, cls: int, anchor: int) -> float:
    """Class ``cls`` probability of one anchor of the raw head output on ``img`` (letterboxed the same way)."""
    import torch

    param = next(net.parameters())
    with torch.no_grad():
        (_, _), raw = net(_to_tensor(_letterbox(img, size, stride), param.dtype).to(param.device))
    raw = raw.get("one2many", raw)
    return float(raw["scores"][0, cls, anchor].sigmoid())


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


class ExplainOptions(TypedDict, total=False):
    """``explain_image``'s keyword arguments, as ``explain_to_dir`` passes them on."""

    method: str
    layer: str | None
    conf: float
    iou: float
    imgsz: int | None
    max_instances: int


def explain_to_dir(
    model: str | Path | Any,
    images: Sequence[Path | str],
    out_dir: str | Path,
    min_side: int = 320,
    **options: Unpack[ExplainOptions],
) -> list[Path]:
    """Explain each image (``explain_image`` with ``options``) and write its overlays under ``out_dir/<image stem>/``.

    Per image: ``NN_<class>.png`` per instance (NN = rank by score), ``grid.png`` (the image with
    all outlines, then every instance overlay) and ``explanations.json`` (class, score, box, layer,
    heat share inside the box). Stems are kept so that two nights' outputs line up image by image.
    Every file is written atomically.

    Returns:
        Paths of every file written, image by image.
    """
    net = load_model(model)
    out_dir = Path(out_dir)
    written: list[Path] = []
    used: set[str] = set()
    from damage.tasks.core.progress import track

    with track("explain", "explain: images", len(images)) as bar:
        for image in images:
            written += _explain_one(net, Path(image), out_dir, used, min_side, options)
            bar.advance()
    return written


def _explain_one(net, p: Path, out_dir: Path, used: set[str], min_side: int, options: ExplainOptions) -> list[Path]:
    """Overlays, grid and explanations.json of one image (``explain_to_dir``'s loop body)."""
    written: list[Path] = []
    stem = _safe(p.stem)
    while stem in used:  # same stem from two folders: keep both
        stem += "_"
    used.add(stem)
    img = read_image(p)
    exps = explain_image(net, img, **options)
    d = out_dir / stem
    tiles = [render_summary(img, exps, min_side)]
    for k, e in enumerate(exps):
        tile = render_overlay(img, e, min_side=min_side)
        tiles.append(tile)
        written.append(write_png(d / f"{k:02d}_{_safe(e.name)}.png", tile))
    written.append(write_png(d / "grid.png", make_grid(tiles)))
    for stale in set(d.glob("[0-9][0-9]_*.png")) - set(written):  # an earlier run's extra instances
        stale.unlink()
    used_args = inspect.signature(explain_image).bind(net, img, **options)
    used_args.apply_defaults()  # the thresholds in effect, defaults included
    info = {"image": str(p), **{k: used_args.arguments[k] for k in ("method", "conf", "iou")},
            "instances": [e.summary() for e in exps]}
    js = d / "explanations.json"
    atomic_write_json(js, info)
    written.append(js)
    return written


# ----------------------------------------------------------------------------- nightly


def pick_explain_samples(data_yaml: str | Path, n: int, seed: int = 0, split: str = "val") -> list[Path]:
    """A fixed sample of ``n`` images of a split: the same images every night for the same data and seed.

    The split's images are sorted by path and permuted with ``seed``; the first ``n`` are taken,
    so a smaller ``n`` is a prefix of a larger one.

    Raises:
        DatasetError: data.yaml or the split's image folder is missing.
    """
    from damage.tasks.data.dataset import split_images

    data_yaml = Path(data_yaml)
    if not data_yaml.is_file():
        raise DatasetError(f"{data_yaml}: data.yaml not found")
    files = split_images(data_yaml, split)
    if n <= 0 or not files:
        return []
    order = np.random.default_rng(seed).permutation(len(files))
    return [files[i] for i in order[:n]]


def explain_step(
    model: Path,
    images: list[Path],
    cfg: ExplainConfig,
    imgsz: int,
    parent_run_id: str,
    out_dir: Path | None = None,
) -> list[Path]:
    """Nightly step: explain the fixed sample and log the overlays to a nested MLflow run "explain".

    Artifacts go under ``<image stem>/`` in that run, so two nights compare image by image.
    Metrics: instances per image, the mean ratio of heat share inside boxes to box area share
    (``> 1``: heatmaps concentrate on the detections), and ``fidelity/...`` over every instance and
    over the damage instances (``damage.tasks.evaluation.fidelity.summarise``: median heat in box and mask,
    share with 5x their box's share, deletion vs random drop).

    Args:
        model: the night's ``best.pt``.
        images: the images to explain (``pick_explain_samples``).
        cfg: the ``explain:`` config section.
        imgsz: letterbox size (the training size).
        parent_run_id: the pipeline's MLflow run.
        out_dir: where the files go; None = ``<state>/reports/explain/<parent_run_id>``.

    Returns:
        The files written (and logged).
    """
    from damage.tasks.core import tracking
    from damage.tasks.core.runtime import state_paths

    out = Path(out_dir) if out_dir else state_paths().reports / "explain" / parent_run_id
    files = explain_to_dir(model, images, out, method=cfg.method, layer=cfg.layer, conf=cfg.conf, iou=cfg.iou,
                           imgsz=imgsz, max_instances=cfg.max_instances)
    with tracking.step_run(parent_run_id, "explain") as (c, run_id):
        tracking.log_params(c, run_id, {"method": cfg.method, "layer": cfg.layer or "head-inputs",
                                        "conf": cfg.conf, "iou": cfg.iou, "imgsz": imgsz,
                                        "images": [Path(i).name for i in images], "model": str(model)})
        ratios, counts, fid = [], {}, []
        for js in (f for f in files if f.name == "explanations.json"):
            info = json.loads(js.read_text())
            counts[f"instances/{js.parent.name}"] = len(info["instances"])
            fid += [dict(i["fidelity"], damage=i["class"] != "vehicle") for i in info["instances"] if i.get("fidelity")]
            ratios += [i["heat_in_box"] / i["box_area_share"] for i in info["instances"] if i["box_area_share"] > 0]
            tracking.log_artifact(c, run_id, js.parent, js.parent.name)
        metrics = {**counts, "instances_total": sum(counts.values())}
        if ratios:
            metrics["heat_concentration_mean"] = float(np.mean(ratios))
        from damage.tasks.evaluation.fidelity import summarise

        metrics.update({f"fidelity/{k}": v for k, v in summarise(fid).items()})
        metrics.update({f"fidelity_damage/{k}": v for k, v in summarise([r for r in fid if r["damage"]]).items()})
        tracking.log_metrics(c, run_id, metrics)
    return files
