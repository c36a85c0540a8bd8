"""Extra evaluation sets (``evaluate.extra_sets``): the exported model scored the way it is deployed, through
the ONNX predictor and its slicing, on full-resolution photos of another composition than the val split.

Why: the val split of the demo is 65 % close-ups at 160 px, so its figures say little about a claim photo
of a whole car (issue 34: mask mAP50 0.715 on close-ups, 0.485 on whole scenes, scratch 0.115). An extra
set of whole scenes at e.g. 640 px is scored here with sliced inference and, beside it in the same run,
the same model letterboxed without slicing, so the gain of slicing is measured, not assumed.

How a set is scored (``score_set``):

* images and labels come through the evaluator's own reader (``evaluate.load_split``, one full-size mask
  per instance) at the set's ``imgsz``: photos larger than that are resized to fit it first;
* the ``Predictor`` (torch-free, the served code path) predicts each image at the mAP confidence floor
  (``evaluate.conf``, 0.001) with the set's slicing; detections and labels are matched at full
  resolution with the evaluator's ``score_image`` / ``map_metrics`` / ``per_class_table``, so AP means
  the same as in ``evaluate_model``. Unlike ``evaluate_model`` the NMS is the deployed one (best class
  per box), as the predictor runs it;
* the per-vehicle damage-% MAE (``damage_percent.vehicle_errors``) counts the detections above the
  operating confidence the model carries (``damage.conf`` of its metadata).

The confidence of sliced photos (``choose_sliced_conf``, a set with ``tune_split`` / ``tune_images``): the
sweep chooses ``damage.conf`` on the val split, images the size of the model's input, one pass each. A
sliced photo is 25+ passes (a 640-px photo at 160 px: 25 tiles and the whole image), so every
false positive the sweep's confidence lets through is met 25 times over, and the per-vehicle damage % of
whole cars suffers (the demo model: MAE 4.8 pp at the sweep's 0.1, 3.2 pp at 0.3, on the same scored
images). The set's tuning split, disjoint from the scored one, is predicted sliced once at the lowest
confidence of the sweep's grid; the grid confidence with the lowest damage-% MAE there (ties: the lower)
becomes ``damage.sliced_conf`` in the candidate's ONNX metadata, which the predictor uses on every image
it slices. The scored split is then measured at that confidence, so the logged MAE is the deployed one.

Metrics are logged under ``<name>/`` (sliced, e.g. ``whole/mask_ap50/scratch``, ``whole/damage_pct_mae``)
and ``<name>_unsliced/`` (letterboxed), so they never mix with the val split's keys.

Example:
    >>> m = score_set("model.onnx", "whole/data.yaml", "val", 640, "auto")
    >>> m["mask/mAP50"], m["mask_ap50/scratch"], m["damage_pct_mae"]
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from damage.tasks.core.errors import DamageError
from damage.tasks.evaluation.evaluate import load_split
from damage.tasks.evaluation.metrics import (
    CONF_FLOOR,
    ImageDets,
    ImageTruth,
    class_metrics,
    map_metrics,
    per_class_table,
    score_image,
)
from damage.tasks.serving.damage_percent import mae_summary, vehicle_errors

__all__ = ["UNSLICED_SUFFIX", "choose_sliced_conf", "extra_set_data", "extra_sets_metrics", "extra_sets_step",
           "gate_sets", "score_set", "sliced_confs"]

UNSLICED_SUFFIX = "_unsliced"  # metric prefix of the letterboxed comparison: "<name>_unsliced/..."
VEHICLE_CLASS = "vehicle"


def _truth(item: dict, names: dict[int, str]) -> tuple[np.ndarray, ImageTruth, list[str]]:
    """BGR image, full-resolution truth and class names of one item of the evaluator's dataset."""
    img = item["img"].numpy().transpose(1, 2, 0)[..., ::-1]  # Ultralytics' CHW RGB -> HWC BGR
    h, w = img.shape[:2]
    cls = item["cls"].view(-1).long().numpy()
    xywh = item["bboxes"].numpy().reshape(-1, 4) * np.array([w, h, w, h], np.float32)
    boxes = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
    masks = item["masks"].numpy().astype(bool).reshape(len(cls), h, w)
    return np.ascontiguousarray(img), ImageTruth(Path(item["im_file"]).name, boxes, cls, masks), \
        [names.get(int(c), str(c)) for c in cls]


def score_set(onnx: str | Path, data_yaml: str | Path, split: str, imgsz: int, slices: Any,
              conf_floor: float = CONF_FLOOR, iou: float = 0.7, max_det: int = 100,
              op_conf: float | None = None, threads: int | None = None) -> dict[str, float]:
    """Box and mask mAP, per-class AP and per-vehicle damage-% MAE of ``onnx`` on one split, via the predictor.

    Args:
        onnx: exported model.
        data_yaml: YOLO-seg data.yaml of the set.
        split: split to score.
        imgsz: resolution the photos are scored at (images larger than it are resized to fit).
        slices: the predictor's slicing for this pass (``off``, ``auto``, ``{size, overlap}``).
        conf_floor: confidence floor of the AP detections.
        iou: NMS IoU.
        max_det: detections per image at most (each is a full-resolution mask while matched).
        op_conf: operating confidence of the damage-% MAE; None = the model's (metadata).
        threads: inference threads (None: the predictor's default).

    Returns:
        ``mask/mAP50``, ``box/mAP50``..., ``mask_ap50/<class>``..., ``damage_pct_mae``,
        ``damage_pct_mae/<class>``, ``damage_pct_vehicles``, ``images``, ``ms_per_image``, ``tiles_per_image``.

    Raises:
        DamageError, DatasetError: bad model, data or arguments.
    """
    import time

    from damage.tasks.serving.predictor import Predictor

    pred = Predictor(onnx, conf=conf_floor, iou=iou, max_det=max_det, threads=threads, slices=slices)
    op = float(op_conf if op_conf is not None else pred.metadata.get("damage.conf") or 0.25)
    ds, _ = load_split(data_yaml, split, int(imgsz), pred.stride)
    names = dict(enumerate(pred.names))
    if len(ds.data["names"]) != len(names):
        raise DamageError(f"{onnx}: model has {len(names)} classes, {data_yaml} has {len(ds.data['names'])}")
    scores, truths, errors = [], [], []
    seconds = tiles = 0.0
    for i in range(len(ds)):
        im, truth, truth_names = _truth(ds[i], names)
        t0 = time.perf_counter()
        [res] = pred.predict(im)
        seconds += time.perf_counter() - t0
        tiles += pred.timings.get("tiles", 0.0)
        inst = res.instances
        h, w = im.shape[:2]
        masks = np.stack([np.asarray(x.mask) for x in inst]) if inst else np.zeros((0, h, w), bool)
        dets = ImageDets(np.array([x.box for x in inst], np.float32).reshape(-1, 4),
                         np.array([x.score for x in inst]), np.array([x.cls for x in inst], int), masks)
        scores.append(score_image(dets, truth))
        truths.append(ImageTruth(truth.name, truth.boxes, truth.cls, truth.masks[:0]))  # masks are not kept
        keep = [k for k, x in enumerate(inst) if x.score > op]
        errors += vehicle_errors(list(truth.masks), truth_names, [masks[k] for k in keep],
                                 [inst[k].name for k in keep], vehicle_class=VEHICLE_CLASS)
    metrics, summaries = map_metrics(scores, truths)
    metrics.update(class_metrics(per_class_table(summaries, truths, names)))
    d = mae_summary(errors)
    metrics.update({"damage_pct_mae": d.mae, **{f"damage_pct_mae/{c}": v for c, v in d.by_class.items()},
                    "damage_pct_vehicles": float(d.vehicles), "damage_pct_conf": op, "images": float(len(ds)),
                    "ms_per_image": 1e3 * seconds / max(len(ds), 1), "tiles_per_image": tiles / max(len(ds), 1)})
    return metrics


def choose_sliced_conf(onnx: str | Path, data_yaml: str | Path, split: str, imgsz: int, slices: Any,
                       grid: Sequence[float], iou: float = 0.7, max_det: int = 100,
                       threads: int | None = None) -> tuple[float, dict[float, float]]:
    """The confidence of ``grid`` with the lowest per-vehicle damage-% MAE on ``split``, predicted with ``slices``.

    One sliced pass per image at the grid's lowest confidence; each grid value keeps the detections above
    it (as ``score_set`` counts the MAE). Ties go to the lower confidence (more recall).

    Returns:
        ``(conf, {conf: mae})``.

    Raises:
        DamageError: an empty grid, a split without vehicles, or a bad model or set.
    """
    from damage.tasks.serving.predictor import Predictor

    grid = sorted({float(c) for c in grid})
    if not grid:
        raise DamageError("choose_sliced_conf: the confidence grid is empty (sweep.conf)")
    pred = Predictor(onnx, conf=grid[0], iou=iou, max_det=max_det, threads=threads, slices=slices)
    ds, _ = load_split(data_yaml, split, int(imgsz), pred.stride)
    names = dict(enumerate(pred.names))
    errors: dict[float, list] = {c: [] for c in grid}
    for i in range(len(ds)):
        im, truth, truth_names = _truth(ds[i], names)
        [res] = pred.predict(im)
        inst = res.instances
        masks = [np.asarray(x.mask) for x in inst]
        for c in grid:
            keep = [k for k, x in enumerate(inst) if x.score > c]
            errors[c] += vehicle_errors(list(truth.masks), truth_names, [masks[k] for k in keep],
                                        [inst[k].name for k in keep], vehicle_class=VEHICLE_CLASS)
    maes = {c: mae_summary(e).mae for c, e in errors.items()}
    if not all(np.isfinite(v) for v in maes.values()):
        raise DamageError(f"{data_yaml}: split '{split}' has no labelled vehicle to choose the sliced confidence on")
    return min(grid, key=lambda c: (maes[c], c)), maes


def extra_set_data(spec: Any, datasets_root: Path) -> Path:
    """The data.yaml of an extra set: its ``source`` folder, or (``source: synth``) a generated set.

    A synthetic set is generated once per settings into ``datasets_root/extra-<name>-<key>`` (the
    generator is deterministic by seed), all but one image in the val split.
    """
    if spec.source != "synth":
        from damage.tasks.data.dataset import find_data_yaml

        return find_data_yaml(Path(spec.source).expanduser())
    from damage.tasks.data.synth import GENERATOR_VERSION, generate_dataset

    settings = {"images": spec.images, "seed": spec.seed, "imgsz": spec.imgsz,
                "closeup_fraction": spec.closeup_fraction, "version": GENERATOR_VERSION,
                **({"tune_images": spec.tune_images} if spec.tune_images else {})}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(datasets_root) / f"extra-{spec.name}-{key}"
    if (out / "data.yaml").is_file():
        return out / "data.yaml"
    # tune_images: the scored images go to val, the tuning ones to train; else all but one in val (the
    # generator wants a train split)
    total = spec.images + spec.tune_images
    val = spec.images / total if spec.tune_images else 1 - 1 / spec.images
    return generate_dataset(out, images=total, seed=spec.seed, imgsz=spec.imgsz, val_fraction=val,
                            closeup_fraction=spec.closeup_fraction)


def extra_sets_metrics(onnx: str | Path, sets: Sequence[Any], datasets_root: Path, conf_floor: float = CONF_FLOOR,
                       iou: float = 0.7, threads: int | None = None,
                       conf_grid: Sequence[float] = ()) -> dict[str, float]:
    """Every extra set scored sliced (``<name>/...``) and, where asked, letterboxed (``<name>_unsliced/...``).

    A set with a tuning split (and a non-empty ``conf_grid``) first chooses the sliced confidence
    (``choose_sliced_conf``): ``<name>/sliced_conf``, ``<name>/tune/damage_pct_mae`` and one
    ``<name>/tune/damage_pct_mae_at_conf_<conf>`` per grid value; its sliced pass counts the MAE at that confidence.
    """
    out: dict[str, float] = {}
    for spec in sets:
        data_yaml = extra_set_data(spec, datasets_root)
        sliced_conf = None
        if spec.tuning_split and conf_grid:
            if spec.tuning_split == spec.split:
                raise DamageError(f"extra set '{spec.name}': tune_split '{spec.tuning_split}' is the scored split; "
                                  f"the confidence must be chosen on other images")
            sliced_conf, maes = choose_sliced_conf(onnx, data_yaml, spec.tuning_split, spec.imgsz, spec.slices,
                                                   conf_grid, iou, spec.max_det, threads)
            out.update({f"{spec.name}/sliced_conf": sliced_conf, f"{spec.name}/tune/damage_pct_mae": maes[sliced_conf],
                        **{f"{spec.name}/tune/damage_pct_mae_at_conf_{c:g}": v for c, v in maes.items()}})
        passes = [(spec.name, spec.slices, sliced_conf)]
        if spec.compare_unsliced:
            passes.append((spec.name + UNSLICED_SUFFIX, "off", None))
        for prefix, slices, op in passes:
            m = score_set(onnx, data_yaml, spec.split, spec.imgsz, slices, conf_floor, iou, spec.max_det,
                          op_conf=op, threads=threads)
            out.update({f"{prefix}/{k}": v for k, v in m.items()})
    return out


def sliced_confs(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Extra set name -> the sliced confidence it chose (``<name>/sliced_conf``); at most one set chooses."""
    return {k.split("/")[0]: float(v) for k, v in metrics.items() if k.endswith("/sliced_conf") and k.count("/") == 1}


def gate_sets(sets: Sequence[Any], floors: dict[str, Any]) -> list[Any]:
    """The extra sets ``registry.extra_min_class_ap50`` floors on, scored sliced only (the gate needs no
    letterboxed comparison). A floored set missing from ``sets`` gets no figures: the gate fails it closed."""
    return [s.model_copy(update={"compare_unsliced": False}) for s in sets if s.name in floors]


def extra_sets_step(candidate: dict[str, Any], sets: Sequence[Any], datasets_root: Path, parent_run_id: str,
                    conf_floor: float = CONF_FLOOR, iou: float = 0.7, threads: int | None = None,
                    conf_grid: Sequence[float] = ()) -> dict[str, Any]:
    """Score the candidate's ONNX on every extra set in a nested MLflow run ``evaluate-extra`` (for the flows).

    Logs the metrics on that run and on the pipeline run; returns the candidate with them added to its
    ``metrics`` (the model card and the registry see them). A set with a tuning split chooses the sliced
    confidence over ``conf_grid`` (the sweep's) and writes it into the candidate's ONNX metadata
    (``damage.sliced_conf``) before it is registered. No sets: the candidate unchanged.
    """
    if not sets:
        return candidate
    from damage.tasks.core import tracking

    with tracking.step_run(parent_run_id, "evaluate-extra") as (c, run_id):
        metrics = extra_sets_metrics(candidate["onnx"], sets, datasets_root, conf_floor, iou, threads, conf_grid)
        chosen = next(iter(sliced_confs(metrics).values()), None)
        if chosen is not None:
            from damage.tasks.export.onnx import update_onnx_metadata

            update_onnx_metadata(Path(candidate["onnx"]), {"sliced_conf": chosen})
        tracking.log_params(c, run_id, {f"{s.name}.slices": json.dumps(s.model_dump()["slices"]) for s in sets})
        tracking.log_metrics(c, run_id, metrics)
        tracking.log_metrics(c, parent_run_id, metrics)
    for s in sets:
        print(f"extra set {s.name}: mask mAP50 {metrics.get(f'{s.name}/mask/mAP50', float('nan')):.3f} sliced"
              + (f", {metrics.get(f'{s.name}{UNSLICED_SUFFIX}/mask/mAP50', float('nan')):.3f} letterboxed"
                 if s.compare_unsliced else "")
              + f"; damage-% MAE {metrics.get(f'{s.name}/damage_pct_mae', float('nan')):.2f} pp")
    return {**candidate, "metrics": {**candidate["metrics"], **metrics}}
