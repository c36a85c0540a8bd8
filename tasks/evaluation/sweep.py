"""Threshold sweep: choose the operating confidence and NMS IoU from one inference pass.

The network runs once per image (``damage.tasks.evaluation.evaluate.collect``). For each NMS IoU of the grid the
raw output is re-used: NMS at the 0.001 confidence floor gives the mAP at that IoU; NMS as the
deployed predictor does it (one class per box) above the lowest grid confidence gives the
operating-point figures, and each grid confidence filters those detections. Per grid point:
box and mask precision, recall and F1 (micro-averaged, IoU >= 0.5, see ``damage.tasks.evaluation.evaluate.prf_at``),
box and mask mAP50 / mAP50-95 at that NMS IoU (always at the 0.001 floor), Ultralytics fitness,
detections per image, and the mean absolute error of the per-vehicle damage percentage
(``damage.tasks.serving.damage_percent``: labelled vs matched predicted vehicle) against the labels.

The operating point is chosen by an objective from ``OBJECTIVES`` (a table, not branches).

Example:
    >>> res = sweep_thresholds("best.pt", "data.yaml", imgsz=160, out_dir=Path("/tmp/sweep"))
    >>> res.thresholds
    {'conf': 0.35, 'iou': 0.5, 'objective': 'mask_f1', 'value': 0.71}
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from damage.tasks.core.atomic import atomic_write
from damage.tasks.core.display import fmt_metric, round_metric
from damage.tasks.core.errors import DamageError
from damage.tasks.core.jsonsafe import json_safe
from damage.tasks.evaluation.evaluate import Collected, collect
from damage.tasks.evaluation.metrics import CONF_FLOOR, damage_mae, damage_summary, map_metrics, prf_at

if TYPE_CHECKING:
    from damage.tasks.core.config import RayConfig, SweepConfig
    from damage.tasks.serving.damage_percent import DamageMAE

log = logging.getLogger(__name__)

DEFAULT_CONF_GRID = (0.30, 0.35, 0.40, 0.45, 0.50)
DEFAULT_IOU_GRID = (0.45, 0.50, 0.55, 0.60)
ROW_KEYS = (
    "conf", "iou",
    "box/precision", "box/recall", "box/f1", "mask/precision", "mask/recall", "mask/f1",
    "box/mAP50", "box/mAP50-95", "mask/mAP50", "mask/mAP50-95", "fitness",
    "dets_per_image", "damage_mae", "damage_vehicles",
)


@dataclass(frozen=True)
class Objective:
    """How one objective ranks grid rows.

    Attributes:
        key: the row value optimised.
        maximize: True to maximise ``key``, False to minimise it.
        tie_breaks: row keys compared next (all maximised), in order.
        min_precision: rows must have ``mask/precision >= min_precision`` to be eligible.
        help: one line for ``--help`` and docs.
    """

    key: str
    maximize: bool
    tie_breaks: tuple[str, ...]
    min_precision: bool = False
    help: str = ""


# Ties end on the higher confidence (fewer false positives), then the lower NMS IoU.
OBJECTIVES: dict[str, Objective] = {
    "mask_f1": Objective("mask/f1", True, ("mask/precision", "conf"),
                         help="max mask F1 at IoU 0.5 (ties: higher precision)"),
    "fitness": Objective("fitness", True, ("mask/f1", "conf"),
                         help="max Ultralytics fitness (box + mask mAP, conf floor 0.001; ties: mask F1)"),
    "recall_at_precision": Objective("mask/recall", True, ("mask/precision", "conf"), min_precision=True,
                                     help="max mask recall with mask precision >= min_precision "
                                          "(ties: higher precision)"),
    "damage_mae": Objective("damage_mae", False, ("mask/f1", "conf"),
                            help="min mean absolute error of the per-vehicle damage percentage (ties: mask F1)"),
}


@dataclass
class SweepResult:
    """The grid, the chosen row and the files written.

    Attributes:
        rows: one dict per grid point (keys ``ROW_KEYS``), IoU-major order.
        best: the chosen row, plus ``feasible`` (False when no row met ``min_precision``).
        objective: objective name (key of ``OBJECTIVES``).
        min_precision: precision floor of ``recall_at_precision``.
        csv_path, heatmap_path, pr_plot_path: files in ``out_dir`` (None without ``out_dir``).
        images: images in the split.
        seconds: wall time of the sweep.
        damage: per-vehicle damage-percentage error at the chosen point, with its per-class
            breakdown (``damage_metrics`` flattens it into ``damage_pct_mae``...).
        slices: the predictor's slicing the point is chosen for (``predictor.slices``; recorded in the
            ONNX metadata as ``damage.slices`` and on the model card); None = not recorded. The grid is
            measured on the split's images as the evaluator letterboxes them: ``auto`` slicing leaves
            images up to 1.5x the model's input unsliced, so on a split at the training size the point
            is the one the sliced predictor runs at.
    """

    rows: list[dict[str, float]]
    best: dict[str, Any]
    objective: str
    min_precision: float
    csv_path: Path | None = None
    heatmap_path: Path | None = None
    pr_plot_path: Path | None = None
    images: int = 0
    seconds: float = 0.0
    damage: DamageMAE | None = None
    slices: Any = None

    @property
    def thresholds(self) -> dict[str, Any]:
        """The operating point: ``{"conf", "iou", "objective", "value"}`` (export metadata, tags), plus
        ``slices`` (``predictor.slices``) when the point was chosen for a slicing predictor."""
        value = self.best.get(OBJECTIVES[self.objective].key)
        out = {"conf": float(self.best["conf"]), "iou": float(self.best["iou"]), "objective": self.objective,
               "value": None if value is None or not math.isfinite(value) else float(value)}
        return out if self.slices is None else {**out, "slices": self.slices}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return json_safe({
            "rows": self.rows, "best": self.best, "objective": self.objective, "min_precision": self.min_precision,
            "thresholds": self.thresholds, "images": self.images, "seconds": self.seconds,
            "damage": damage_metrics(self.damage) if self.damage is not None else None,
            "csv_path": str(self.csv_path) if self.csv_path else None,
            "heatmap_path": str(self.heatmap_path) if self.heatmap_path else None,
            "pr_plot_path": str(self.pr_plot_path) if self.pr_plot_path else None,
        })


def damage_metrics(d: DamageMAE) -> dict[str, float]:
    """``damage_pct_mae`` (percentage points, per labelled vehicle), ``damage_pct_mae/<class>``,
    ``damage_pct_vehicles`` (vehicles counted): the MLflow metrics of the chosen operating point."""
    return {"damage_pct_mae": d.mae, **{f"damage_pct_mae/{c}": v for c, v in d.by_class.items()},
            "damage_pct_vehicles": float(d.vehicles)}


def get_objective(name: str) -> Objective:
    """The ``OBJECTIVES`` row for ``name``.

    Raises:
        DamageError: unknown objective (the message lists the valid ones).
    """
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise DamageError(f"unknown sweep objective '{name}' (choose one of: {', '.join(OBJECTIVES)})") from None


def _check_grid(name: str, values: Sequence[float]) -> list[float]:
    vals = [round(float(v), 6) for v in values]
    if not vals:
        raise DamageError(f"sweep: the {name} grid is empty")
    bad = [v for v in vals if not 0 < v < 1]
    if bad:
        raise DamageError(f"sweep: {name} thresholds must be in (0, 1), got {bad}")
    if len(set(vals)) != len(vals):
        raise DamageError(f"sweep: the {name} grid has duplicates: {vals}")
    return sorted(vals)


def grid_rows(col: Collected, conf_grid: Sequence[float], iou_grid: Sequence[float]) -> list[dict[str, float]]:
    """One row per (iou, conf) from a ``collect`` pass run with ``ious=iou_grid, op_confs=conf_grid``."""
    rows = []
    n_truth = sum(len(t.cls) for t in col.truths)
    for iou in iou_grid:
        maps, _ = map_metrics(col.map_scores[iou], col.truths)
        map_part = {k: maps[k] for k in ("box/mAP50", "box/mAP50-95", "mask/mAP50", "mask/mAP50-95", "fitness")}
        for conf in conf_grid:
            mae, n_veh = damage_mae(col.op_scores[iou], conf)
            row = {"conf": conf, "iou": iou, **prf_at(col.op_scores[iou], n_truth, conf), **map_part,
                   "damage_mae": mae, "damage_vehicles": float(n_veh)}
            rows.append({k: float(row[k]) for k in ROW_KEYS})
    return rows


def _rank_value(v: float, maximize: bool) -> float:
    """Sort key where larger is better; NaN ranks last."""
    if v is None or not math.isfinite(v):
        return -math.inf
    return v if maximize else -v


FLAT_TOLERANCE = 1e-3  # objective values this close across the whole grid are a tie ("flat")


def objective_is_flat(rows: Sequence[dict[str, float]], objective: str, tol: float = FLAT_TOLERANCE) -> bool:
    """True when the objective varies by at most ``tol`` over ``rows`` (more than one row).

    Then the objective chose nothing: the point comes from the tie-breaks of ``OBJECTIVES``
    (then higher conf, then lower NMS IoU), and the sweep says so (tag, artifact, heatmap title).

    Example:
        >>> objective_is_flat([{"mask/f1": 0.535}, {"mask/f1": 0.5352}], "mask_f1")
        True
    """
    key = get_objective(objective).key
    vals = [float(r[key]) for r in rows if r.get(key) is not None and math.isfinite(float(r[key]))]
    return len(rows) > 1 and (not vals or max(vals) - min(vals) <= tol)


def choose_operating_point(rows: Sequence[dict[str, float]], objective: str,
                           min_precision: float = 0.8) -> dict[str, Any]:
    """The best row for ``objective`` (see ``OBJECTIVES``), with ``feasible`` added.

    For ``recall_at_precision``, rows with ``mask/precision < min_precision`` are ineligible; if
    none is eligible, the row with the highest mask precision is returned with
    ``feasible=False`` (and a warning), so the pipeline still has an operating point.

    Raises:
        DamageError: unknown objective or no rows.
    """
    obj = get_objective(objective)
    if not rows:
        raise DamageError("sweep: no grid rows to choose from")

    def key(r: dict[str, float]) -> tuple:
        return (_rank_value(r[obj.key], obj.maximize), *(_rank_value(r[k], True) for k in obj.tie_breaks),
                -r["iou"])

    pool = list(rows)
    feasible = True
    if obj.min_precision:
        pool = [r for r in rows if r["mask/precision"] >= min_precision]
        if not pool:
            feasible = False
            best = max(rows, key=lambda r: (_rank_value(r["mask/precision"], True), _rank_value(r["mask/recall"], True),
                                            r["conf"], -r["iou"]))
            log.warning("sweep: no grid point reaches mask precision %.2f; using the most precise one "
                        "(conf=%s, iou=%s, precision=%.3f)", min_precision, best["conf"], best["iou"],
                        best["mask/precision"])
            return {**best, "feasible": False, "flat": False}
    flat = objective_is_flat(pool, objective)
    if flat:  # differences below the tolerance are noise: the documented tie-break decides
        log.warning("sweep: objective %s is flat across the %d grid points (within %g); chosen by the "
                    "tie-break (%s, then higher conf, then lower NMS IoU)", objective, len(pool), FLAT_TOLERANCE,
                    ", ".join(obj.tie_breaks))
        return {**max(pool, key=lambda r: key(r)[1:]), "feasible": feasible, "flat": True}
    return {**max(pool, key=key), "feasible": feasible, "flat": False}


# ----------------------------------------------------------------------------- files


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Write the grid as CSV (atomically)."""
    def w(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0].keys()) if rows else list(ROW_KEYS))
            wr.writeheader()
            wr.writerows(rows)

    return atomic_write(path, w)


def _save_fig(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)


def plot_heatmap(rows: Sequence[dict[str, Any]], best: dict[str, Any], objective: str, min_precision: float,
                 path: Path) -> Path:
    """Heatmap of the objective over (NMS IoU x conf); the chosen point is starred."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    obj = get_objective(objective)
    confs = sorted({r["conf"] for r in rows})
    ious = sorted({r["iou"] for r in rows})
    z = np.full((len(ious), len(confs)), np.nan)
    for r in rows:
        z[ious.index(r["iou"]), confs.index(r["conf"])] = r[obj.key]
    fig, ax = plt.subplots(figsize=(1.3 * len(confs) + 2.5, 0.8 * len(ious) + 2))
    im = ax.imshow(z, cmap="viridis" if obj.maximize else "viridis_r", aspect="auto", origin="lower")
    fig.colorbar(im, ax=ax, label=obj.key)
    ax.set_xticks(range(len(confs)), [f"{c:.2f}" for c in confs])
    ax.set_yticks(range(len(ious)), [f"{v:.2f}" for v in ious])
    ax.set_xlabel("confidence threshold")
    ax.set_ylabel("NMS IoU")
    for r in rows:
        i, j = ious.index(r["iou"]), confs.index(r["conf"])
        txt = "nan" if not math.isfinite(r[obj.key]) else f"{r[obj.key]:.3f}"
        if obj.min_precision and r["mask/precision"] < min_precision:
            txt += "\n(P<min)"
        ax.text(j, i, txt, ha="center", va="center", fontsize=8, color="white")
    ax.plot(confs.index(best["conf"]), ious.index(best["iou"]), marker="*", markersize=22, color="red",
            markeredgecolor="white", linestyle="none", label="chosen")
    ax.legend(loc="upper right", fontsize=8)
    flat = "  (FLAT across the grid: chosen by tie-break)" if best.get("flat") else ""
    ax.set_title(f"sweep objective: {objective}{flat}")
    return _save_fig(fig, path)


def plot_pr(rows: Sequence[dict[str, Any]], best: dict[str, Any], path: Path) -> Path:
    """Precision vs recall (box and mask) over the confidence grid, one line per NMS IoU."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    ious = sorted({r["iou"] for r in rows})
    for ax, kind in zip(axes, ("box", "mask"), strict=True):
        for v in ious:
            rs = sorted((r for r in rows if r["iou"] == v), key=lambda r: r["conf"])
            ax.plot([r[f"{kind}/recall"] for r in rs], [r[f"{kind}/precision"] for r in rs], marker="o",
                    label=f"NMS IoU {v:.2f}")
            if v == ious[0]:
                for r in rs:
                    ax.annotate(f"{r['conf']:.2f}", (r[f"{kind}/recall"], r[f"{kind}/precision"]), fontsize=7,
                                textcoords="offset points", xytext=(3, 3))
        ax.plot(best[f"{kind}/recall"], best[f"{kind}/precision"], marker="*", markersize=18, color="red",
                linestyle="none", label=f"chosen (conf {best['conf']:.2f}, IoU {best['iou']:.2f})")
        ax.set_xlabel("recall")
        ax.set_title(f"{kind}: precision-recall over conf (labels)")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("precision")
    axes[1].legend(fontsize=8, loc="lower left")
    return _save_fig(fig, path)


# ----------------------------------------------------------------------------- sweep


def sweep_thresholds(model: str | Path, data_yaml: str | Path, split: str = "val", imgsz: int | None = None,
                     conf_grid: Sequence[float] = DEFAULT_CONF_GRID, iou_grid: Sequence[float] = DEFAULT_IOU_GRID,
                     objective: str = "mask_f1", min_precision: float = 0.8, out_dir: Path | None = None,
                     max_det: int = 300, batch: int = 1, ray: RayConfig | None = None) -> SweepResult:
    """Sweep confidence x NMS IoU with one inference pass and choose the operating point.

    mAP in every row is computed at the 0.001 confidence floor (at that row's NMS IoU), never at
    the row's confidence; precision, recall, F1, detections per image and damage-percentage MAE
    are measured at the row's confidence.

    Args:
        model: ``.pt`` or ``.onnx``.
        data_yaml: YOLO-seg data.yaml.
        split: split to sweep on.
        imgsz: letterbox size; None = the model's own.
        conf_grid: confidence thresholds, each in (0, 1).
        iou_grid: NMS IoU thresholds, each in (0, 1).
        objective: a key of ``OBJECTIVES``.
        min_precision: precision floor of ``recall_at_precision``.
        out_dir: where ``sweep.csv``, ``sweep_heatmap.png`` and ``sweep_pr.png`` go; None = no files.
        max_det: max detections per image.
        batch: images per forward pass.
        ray: score the images on Ray workers (``collect``); None = in this process. Same rows.

    Raises:
        DamageError: unknown objective, bad grid, bad model or data.
    """
    get_objective(objective)  # fail before the inference pass
    confs, ious = _check_grid("conf", conf_grid), _check_grid("iou", iou_grid)
    col = collect(model, data_yaml, split, imgsz, ious=ious, op_confs=confs, max_det=max_det, batch=batch,
                  conf_floor=CONF_FLOOR, progress="sweep", ray=ray)
    rows = grid_rows(col, confs, ious)
    best = choose_operating_point(rows, objective, min_precision)
    res = SweepResult(rows, best, objective, min_precision, images=len(col.truths), seconds=col.seconds,
                      damage=damage_summary(col.op_scores[best["iou"]], best["conf"]))
    if out_dir is not None:
        out = Path(out_dir)
        res.csv_path = write_csv(rows, out / "sweep.csv")
        res.heatmap_path = plot_heatmap(rows, best, objective, min_precision, out / "sweep_heatmap.png")
        res.pr_plot_path = plot_pr(rows, best, out / "sweep_pr.png")
    return res


def publish_table_artifact(res: SweepResult) -> str | None:
    """Prefect table artifact with the grid (only inside a flow or task run); returns its id."""
    from damage.tasks.core.prefect_ui import in_run_context

    if not in_run_context():
        return None
    from prefect.artifacts import create_table_artifact

    keys = ("conf", "iou", "mask/f1", "mask/precision", "mask/recall", "box/f1", "mask/mAP50-95",
            "box/mAP50-95", "dets_per_image", "damage_mae")
    table = [{**{k: json_safe(round_metric(r[k], k)) for k in keys},
              "chosen": r["conf"] == res.best["conf"] and r["iou"] == res.best["iou"]} for r in res.rows]
    t = res.thresholds
    desc = (f"Threshold sweep ({len(res.rows)} points, objective {res.objective}): chosen conf={t['conf']}, "
            f"iou={t['iou']} ({t['objective']} = {fmt_metric(t['value'])}). mAP at conf floor 0.001.")
    if res.best.get("flat"):
        desc += (f" WARNING: the objective is flat across the grid (within {FLAT_TOLERANCE}); the point was "
                 f"chosen by the tie-break: {OBJECTIVES[res.objective].help}, then higher conf, lower IoU.")
    return str(create_table_artifact(table=table, key="threshold-sweep", description=desc))


def _default_out_dir(run_id: str) -> Path:
    from damage.tasks.core.runtime import state_paths

    return state_paths().reports / f"sweep-{run_id[:8]}"


def sweep_step(model: str | Path, data_yaml: str | Path, cfg: SweepConfig, imgsz: int, parent_run_id: str,
               out_dir: Path | None = None, slices: Any = None, ray: RayConfig | None = None) -> SweepResult:
    """``sweep_thresholds`` in a nested MLflow run ``sweep`` under ``parent_run_id`` (for the flows).

    Logs one nested run per grid point (params conf/iou, the row as metrics), the CSV, the
    heatmap and the PR plot as artifacts, the chosen row as ``operating/...`` metrics, sets the
    tags ``operating.conf``, ``operating.iou``, ``operating.objective`` on the sweep run and on
    the parent run, logs ``damage_metrics`` of the chosen point on both, and publishes a Prefect
    table artifact when inside a flow/task run.

    Args:
        out_dir: where the files go; None = ``<state>/reports/sweep-<run id>``.
        slices: ``predictor.slices`` to record with the operating point (``SweepResult.slices``).
        ray: score the images on Ray workers (``collect``); None = in this process.
    """
    from damage.tasks.core import tracking
    with tracking.step_run(parent_run_id, "sweep") as (c, run_id):
        res = sweep_thresholds(model, data_yaml, split=cfg.split, imgsz=imgsz, conf_grid=cfg.conf,
                               iou_grid=cfg.iou, objective=cfg.objective, min_precision=cfg.min_precision,
                               out_dir=out_dir or _default_out_dir(run_id), max_det=cfg.max_det, ray=ray)
        res.slices = slices
        tracking.log_params(c, run_id, {"model": str(model), "data": str(data_yaml), "split": cfg.split,
                                        "imgsz": imgsz, "conf_grid": list(cfg.conf), "iou_grid": list(cfg.iou),
                                        "objective": cfg.objective, "min_precision": cfg.min_precision,
                                        "map_conf_floor": CONF_FLOOR})
        exp_id = c.get_run(run_id).info.experiment_id
        for r in res.rows:
            # short enough for the UI's run-name column ("conf=0.50 i..." was cut)
            child = tracking.start_run(c, exp_id, f"c{r['conf']:.2f} i{r['iou']:.2f}", run_id,
                                       {"damage.step": "sweep-point"})
            tracking.log_params(c, child, {"conf": r["conf"], "iou": r["iou"]})
            tracking.log_metrics(c, child, r)
            tracking.end_run(c, child)
        tracking.log_metrics(c, run_id, {f"operating/{k}": v for k, v in res.best.items() if k != "feasible"})
        if res.damage is not None:  # per-vehicle damage % error at the chosen point, on the sweep and the pipeline run
            tracking.log_metrics(c, run_id, damage_metrics(res.damage))
            tracking.log_metrics(c, parent_run_id, damage_metrics(res.damage))
        for p in (res.csv_path, res.heatmap_path, res.pr_plot_path):
            tracking.log_artifact(c, run_id, p, "sweep")
        tracking.log_dict(c, run_id, res.to_dict(), "sweep/sweep.json")
        t = res.thresholds
        tags = {"operating.conf": t["conf"], "operating.iou": t["iou"], "operating.objective": t["objective"],
                "operating.value": t["value"], "operating.feasible": res.best.get("feasible", True),
                "operating.flat": res.best.get("flat", False)}
        tracking.set_tags(c, run_id, tags)
        tracking.set_tags(c, parent_run_id, tags)
        publish_table_artifact(res)
    return res


def damage_at_operating_point(model: str | Path, data_yaml: str | Path, thresholds: dict[str, Any] | None,
                              imgsz: int, split: str = "val", max_det: int = 300) -> DamageMAE | None:
    """Per-vehicle damage-percentage error of ``model`` (e.g. the registered INT8 ONNX) at the chosen
    operating point alone: one inference pass, a 1x1 grid. None without an operating point (sweep off).

    The sweep measured the trained ``.pt``; the nightly summary and the model card report the
    registered artifact's own error, measured here the same way (same data, same point).
    """
    if not thresholds:
        return None
    res = sweep_thresholds(model, data_yaml, split=split, imgsz=imgsz, conf_grid=[float(thresholds["conf"])],
                           iou_grid=[float(thresholds["iou"])], max_det=max_det)
    return res.damage
