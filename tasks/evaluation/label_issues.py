"""Label-issue mining: rank the annotations a trained model most disagrees with.

One inference pass over the chosen splits (default train and val), then, per image, every
annotation and every confident prediction is scored against the other side by mask IoU:

==================  ==========================================================================
kind                score (0-1, higher = more likely wrong)
==================  ==========================================================================
``missing_label``   a prediction with conf >= ``min_conf`` that no annotation explains (no
                    same-class annotation overlaps it by ``overlap_iou``, no other-class one
                    covers it by ``match_iou``): ``conf * (1 - best same-class IoU)``
``wrong_class``     another class's prediction covers the annotation (IoU >= ``match_iou``):
                    ``its conf * (1 - conf of the best same-class prediction that covers it)``
``bad_outline``     the best-overlapping same-class prediction (IoU >= ``overlap_iou``):
                    ``conf * (1 - IoU)``
``spurious_label``  no prediction of any class above ``conf_floor`` supports the annotation:
                    ``1 - max conf of the predictions that overlap it``
==================  ==========================================================================

An annotation gets one row, of its highest-scoring kind; a missing label is a row with
annotation index -1. The scores are computed here (no cleanlab): cleanlab's ObjectLab scores
boxes only (overlooked / swapped / badly located boxes) and has no notion of mask IoU, so it
could not tell a bad polygon inside a well-placed box.

**Out of sample.** Scores on images the model trained on are biased towards their labels
(the model has partly memorised them). Every row says whether its image lies in a split the model
trained on (``in_sample``); ``label_issues.splits: [val]`` restricts mining to held-out data, and
:func:`kfold_label_issues` (``label_issues.folds`` >= 2) scores the train split with K fold models,
each trained without the fold it scores (K trainings: the cost is stated in its docstring).

Nothing in the dataset is changed: this ranks, a person decides. (Ultralytics' dataset
loader may write its usual ``labels/*.cache`` beside the labels, as evaluation does.)

Example:
    >>> res = mine_label_issues("data.yaml", LabelIssuesConfig(), model="best.pt", out_dir=Path("issues"))
    >>> res.csv_path, res.flagged
"""

from __future__ import annotations

import csv
import heapq
import io
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from damage.tasks.core.atomic import atomic_write, atomic_write_text
from damage.tasks.core.errors import DamageError
from damage.tasks.evaluation.metrics import mask_iou_np

if TYPE_CHECKING:
    from damage.tasks.core.config import LabelIssuesConfig, TrainConfig

log = logging.getLogger(__name__)

KINDS = ("missing_label", "wrong_class", "bad_outline", "spurious_label")
CSV_COLUMNS = ("rank", "image", "split", "annotation", "kind", "score", "label_class", "pred_class", "conf",
               "iou", "in_sample", "fold", "evidence")
GRID_COLUMNS = 6
TILE = 192


@dataclass
class ImagePreds:
    """Predictions of one image: classes, confidences and masks in the labels' pixel frame."""

    cls: np.ndarray
    conf: np.ndarray
    masks: np.ndarray


Predictor = Callable[[dict], ImagePreds]  # one Ultralytics dataset item -> its predictions


@dataclass
class LabelIssues:
    """What ``mine_label_issues`` ranked and wrote.

    Attributes:
        rows: every scored annotation and unexplained confident prediction, best first
            (``CSV_COLUMNS``).
        flagged: rows per kind with score >= ``flag_score``.
        images: images scored per split.
        csv_path / grid_path: ``label_issues.csv`` and the overlay grid of the top K.
        seconds: wall time.
    """

    rows: list[dict[str, Any]]
    flagged: dict[str, int]
    images: dict[str, int]
    csv_path: Path | None = None
    grid_path: Path | None = None
    seconds: float = 0.0
    in_sample_splits: tuple[str, ...] = ()
    top: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-able figures for the run summary."""
        return {"images": self.images, "rows": len(self.rows), "flagged": self.flagged,
                "in_sample_splits": list(self.in_sample_splits), "csv": str(self.csv_path) if self.csv_path else None,
                "grid": str(self.grid_path) if self.grid_path else None, "seconds": round(self.seconds, 2)}

    def summary_line(self) -> str:
        flagged = ", ".join(f"{k}={self.flagged.get(k, 0)}" for k in KINDS)
        where = f"; csv: {self.csv_path}" if self.csv_path else ""
        return (f"label issues: {sum(self.images.values())} images, {len(self.rows)} rows scored, flagged "
                f"{flagged}" + where)


# ----------------------------------------------------------------------------- scoring (numpy)


def score_image(label_cls: np.ndarray, label_masks: np.ndarray, preds: ImagePreds, names: Sequence[str],
                conf_floor: float = 0.05, min_conf: float = 0.5, overlap_iou: float = 0.1,
                match_iou: float = 0.5) -> list[dict[str, Any]]:
    """Score one image's annotations and predictions (see the module docstring).

    Args:
        label_cls: (n,) annotation classes, in label-file order.
        label_masks: (n, h, w) bool.
        preds: predictions with masks of the same (h, w).
        names: class names by id.

    Returns:
        Rows with ``annotation``, ``kind``, ``score``, ``label_class``, ``pred_class``, ``conf``,
        ``iou``, ``evidence``; the caller adds the image and split.
    """
    keep = np.asarray(preds.conf) >= conf_floor
    p_cls, p_conf = np.asarray(preds.cls, int)[keep], np.asarray(preds.conf, float)[keep]
    p_masks = np.asarray(preds.masks)[keep]
    label_cls = np.asarray(label_cls, int)
    n, k = len(label_cls), len(p_cls)
    if n and k:
        if p_masks.shape[1:] != label_masks.shape[1:]:
            raise DamageError(f"mask sizes differ: predictions {p_masks.shape[1:]}, labels {label_masks.shape[1:]}")
        iou = mask_iou_np(label_masks, p_masks)
    else:
        iou = np.zeros((n, k))
    same = label_cls[:, None] == p_cls[None, :]
    rows: list[dict[str, Any]] = []

    def name(c: int) -> str:
        return names[c] if 0 <= c < len(names) else str(c)

    for i in range(n):
        lc = name(label_cls[i])
        ov = iou[i] >= overlap_iou
        support = float(p_conf[ov].max()) if ov.any() else 0.0
        cand = {"spurious_label": (1.0 - support, -1,
                                   f"no prediction supports it (best overlapping conf {support:.2f}, "
                                   f"floor {conf_floor})")}
        so = ov & same[i]
        if so.any():
            j = int(np.argmax(np.where(so, iou[i], -1.0)))
            cand["bad_outline"] = (p_conf[j] * (1 - iou[i, j]), j,
                                   f"'{lc}' predicted at conf {p_conf[j]:.2f} with mask IoU {iou[i, j]:.2f}")
        cover = iou[i] >= match_iou
        other = cover & ~same[i]
        if other.any():
            j = int(np.argmax(np.where(other, p_conf, -1.0)))
            same_conf = float(p_conf[cover & same[i]].max()) if (cover & same[i]).any() else 0.0
            cand["wrong_class"] = (p_conf[j] * (1 - same_conf), j,
                                   f"predicted '{name(p_cls[j])}' at conf {p_conf[j]:.2f} (mask IoU "
                                   f"{iou[i, j]:.2f}); best '{lc}' prediction covering it: conf {same_conf:.2f}")
        kind = max(cand, key=lambda kd: (cand[kd][0], -KINDS.index(kd)))
        score, j, evidence = cand[kind]
        rows.append({"annotation": i, "kind": kind, "score": float(score), "label_class": lc,
                     "pred_class": name(p_cls[j]) if j >= 0 else "", "conf": float(p_conf[j]) if j >= 0 else support,
                     "iou": float(iou[i, j]) if j >= 0 else (float(iou[i].max()) if k else 0.0),
                     "evidence": evidence, "_pred": j})
    for j in range(k):
        if p_conf[j] < min_conf:
            continue
        explained = (iou[:, j] >= overlap_iou) & same[:, j] | (iou[:, j] >= match_iou) & ~same[:, j]
        if explained.any():
            continue
        best_same = float(iou[same[:, j], j].max()) if same[:, j].any() else 0.0
        best_any = float(iou[:, j].max()) if n else 0.0
        rows.append({"annotation": -1, "kind": "missing_label", "score": float(p_conf[j] * (1 - best_same)),
                     "label_class": "", "pred_class": name(p_cls[j]), "conf": float(p_conf[j]), "iou": best_any,
                     "evidence": f"'{name(p_cls[j])}' predicted at conf {p_conf[j]:.2f}, no annotation explains it "
                                 f"(best mask IoU with any annotation {best_any:.2f})",
                     "_pred": j})
    return rows


def rank_key(row: dict[str, Any]) -> tuple:
    """Best first: score, then kind order, image, annotation (deterministic ties)."""
    return (-row["score"], KINDS.index(row["kind"]), row["image"], row["annotation"])


# ----------------------------------------------------------------------------- the model side


def model_predictor(model: str | Path, data_yaml: str | Path, imgsz: int | None, conf_floor: float,
                    iou: float, max_det: int) -> tuple[Predictor, int, int, list[str]]:
    """A predictor running ``model`` (``.pt``/``.onnx``) once per image: Ultralytics NMS (one
    class per box), masks upsampled to the letterboxed image, as the labels are.

    Returns:
        (predictor, imgsz, stride, class names).
    """
    import torch
    from ultralytics.utils import nms, ops

    from damage.tasks.evaluation.evaluate import open_model, split_outputs

    m = open_model(model, data_yaml, imgsz)
    with torch.inference_mode():
        m.backend(torch.zeros(1, 3, m.imgsz, m.imgsz))  # warm-up, as evaluation does

    def predict(item: dict) -> ImagePreds:
        with torch.inference_mode():
            im = item["img"][None].float() / 255
            preds, protos = split_outputs(m.backend(im))
            det = nms.non_max_suppression(preds.float(), conf_floor, iou, nc=len(m.names), multi_label=False,
                                          max_det=max_det)[0]
            masks = ops.process_mask(protos.float()[0], det[:, 6:], det[:, :4], shape=tuple(im.shape[2:]),
                                     upsample=True)
        return ImagePreds(det[:, 5].long().numpy(), det[:, 4].numpy(), masks.bool().numpy())

    return predict, m.imgsz, m.stride, [m.names[i] for i in sorted(m.names)]


# ----------------------------------------------------------------------------- mining


class _TopK:
    """The K best rows with what the overlay needs (image, the two masks), bounded memory."""

    def __init__(self, k: int):
        self.k, self.heap, self.n = k, [], 0

    def offer(self, row: dict[str, Any], payload: Callable[[], tuple]) -> None:
        if self.k <= 0:
            return
        key = rank_key(row)
        neg = tuple(-x if isinstance(x, (int, float)) else _Rev(x) for x in key)  # heap keeps the worst on top
        self.n += 1
        if len(self.heap) < self.k:
            heapq.heappush(self.heap, (neg, self.n, row, payload()))
        elif neg > self.heap[0][0]:
            heapq.heapreplace(self.heap, (neg, self.n, row, payload()))

    def best(self) -> list[tuple[dict, tuple]]:
        return [(r, p) for _, _, r, p in sorted(self.heap, key=lambda t: rank_key(t[2]))]


class _Rev(str):
    """A string that sorts in reverse (for the min-heap of the best rows)."""

    def __lt__(self, other: str) -> bool:
        return str.__gt__(self, other)

    def __gt__(self, other: str) -> bool:
        return str.__lt__(self, other)


def _rel(path: str, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return str(path)


def mine_label_issues(data_yaml: str | Path, cfg: LabelIssuesConfig, model: str | Path | None = None,
                      predict: Predictor | None = None, names: Sequence[str] | None = None,
                      imgsz: int | None = None, out_dir: Path | None = None,
                      trained_splits: Sequence[str] = ("train",)) -> LabelIssues:
    """Score every annotation of ``cfg.splits`` against one pass of the model and rank them.

    Args:
        data_yaml: YOLO-seg data.yaml (read only).
        cfg: the ``label_issues:`` config section.
        model: ``.pt``/``.onnx``; or pass ``predict`` (+ ``names``, ``imgsz``) instead, e.g. to
            score with predictions made elsewhere.
        imgsz: letterbox size (default: the model's own).
        out_dir: where ``label_issues.csv`` and ``label_issues_top.png`` go; None = not written.
        trained_splits: splits the model was trained on (their rows are ``in_sample``).

    Raises:
        DamageError, DatasetError: bad model, data or arguments.
    """
    t0 = time.perf_counter()
    if (model is None) == (predict is None):
        raise DamageError("mine_label_issues: pass exactly one of model= or predict=")
    stride = 32
    if model is not None:
        predict, imgsz, stride, names = model_predictor(model, data_yaml, imgsz, cfg.conf_floor, cfg.iou,
                                                        cfg.max_det)
    elif names is None or imgsz is None:
        raise DamageError("mine_label_issues: predict= needs names= and imgsz=")
    rows: list[dict[str, Any]] = []
    images: dict[str, int] = {}
    top = _TopK(cfg.top_k)
    for split in cfg.splits:
        images[split] = _score_split(data_yaml, split, predict, names, int(imgsz), stride, cfg, top, rows,
                                     in_sample=split in trained_splits, label=str(model or "predictions"))
    return _finish(rows, images, top, cfg, tuple(s for s in cfg.splits if s in trained_splits), out_dir, t0)


def _score_split(data_yaml: str | Path, split: str, predict: Predictor, names: Sequence[str], imgsz: int,
                 stride: int, cfg: LabelIssuesConfig, top: _TopK, rows: list[dict[str, Any]], in_sample: bool,
                 label: str, as_split: str | None = None, extra: dict[str, Any] | None = None) -> int:
    """Score every image of one split into ``rows`` (and the top-K collector); returns the image count.
    ``as_split`` names the split in the rows (a K-fold held-out list is the dataset's train split)."""
    from damage.tasks.evaluation.evaluate import load_split

    ds, data = load_split(data_yaml, split, imgsz, stride)
    if len(data["names"]) != len(names):
        raise DamageError(f"{label}: {len(names)} classes, {data_yaml} has {len(data['names'])}")
    root = Path(data.get("path") or Path(data_yaml).resolve().parent).resolve()
    for idx in range(len(ds)):
        item = ds[idx]
        preds = predict(item)
        masks = item["masks"].bool().numpy()
        cls = item["cls"].view(-1).long().numpy()
        for row in score_image(cls, masks, preds, names, cfg.conf_floor, cfg.min_conf, cfg.overlap_iou,
                               cfg.match_iou):
            row.update(image=_rel(item["im_file"], root), split=as_split or split, in_sample=in_sample,
                       **(extra or {}))
            j = row.pop("_pred", None)
            a = row["annotation"]
            top.offer(row, lambda item=item, a=a, j=j, preds=preds, masks=masks: (
                item["img"].numpy().transpose(1, 2, 0)[..., ::-1].copy(),
                masks[a] if a >= 0 else None, _pred_mask(preds, j, cfg.conf_floor)))
            rows.append(row)
    return len(ds)


def _finish(rows: list[dict[str, Any]], images: dict[str, int], top: _TopK, cfg: LabelIssuesConfig,
            in_sample_splits: tuple[str, ...], out_dir: Path | None, t0: float) -> LabelIssues:
    """Rank, count, write the CSV and the overlay grid."""
    rows.sort(key=rank_key)
    for r, row in enumerate(rows, 1):
        row["rank"] = r
    flagged = dict(Counter(r["kind"] for r in rows if r["score"] >= cfg.flag_score))
    res = LabelIssues(rows, {k: flagged.get(k, 0) for k in KINDS}, images, in_sample_splits=in_sample_splits)
    best = top.best()
    res.top = [dict(r) for r, _ in best]
    if out_dir is not None:
        out_dir = Path(out_dir)
        res.csv_path = write_issues_csv(rows, out_dir / "label_issues.csv")
        if best:
            res.grid_path = write_overlay_grid(best, out_dir / "label_issues_top.png")
    res.seconds = time.perf_counter() - t0
    return res


def kfold_label_issues(data_yaml: str | Path, cfg: LabelIssuesConfig, weights: str | Path, train_cfg: TrainConfig,
                       work_dir: Path, imgsz: int | None = None, out_dir: Path | None = None,
                       seed: int = 0) -> LabelIssues:
    """Out-of-sample scores for the train split by K-fold, plus the val split scored by ``weights``.

    The train images are dealt into ``cfg.folds`` folds (seeded). For each fold a model is trained on
    the other folds and scores the held-out one: ``cfg.fold_start: trained`` fine-tunes ``weights``
    for ``cfg.fold_epochs`` epochs (cheap; the fold model still starts from weights that saw the fold,
    so a little memorisation remains), ``scratch`` trains ``train_cfg.model`` from its YAML for
    ``train_cfg.epochs`` (unbiased; K full trainings). The val split (never trained on) is scored by
    ``weights`` itself. Cost: K trainings on (K-1)/K of the train split, plus one inference pass
    over the dataset. Every row is ``in_sample=False`` and carries its ``fold`` (-1 for val).

    Lists and data.yaml of each fold are written under ``work_dir/fold<k>`` (absolute image paths
    inside the dataset root); the dataset itself is never changed.

    Raises:
        DamageError: fewer than 2 folds, or fewer train images than folds.
    """
    import yaml

    from damage.tasks.data.dataset import load_data_yaml, split_images
    from damage.tasks.training.train import train_model

    t0 = time.perf_counter()
    k_folds = int(cfg.folds)
    if k_folds < 2:
        raise DamageError(f"label_issues.folds={k_folds}: K-fold needs at least 2 folds")
    info = load_data_yaml(data_yaml)
    train = split_images(data_yaml, "train")
    if len(train) < k_folds:
        raise DamageError(f"{info.yaml_path}: {len(train)} train images cannot fill {k_folds} folds")
    order = np.random.default_rng(seed).permutation(len(train))
    fold_of = {train[i]: n % k_folds for n, i in enumerate(order)}
    rows: list[dict[str, Any]] = []
    images: dict[str, int] = {"train": 0}
    top = _TopK(cfg.top_k)
    size = int(imgsz or train_cfg.imgsz)
    if cfg.fold_start == "trained":
        fold_train = train_cfg.model_copy(update={"weights": str(weights), "epochs": cfg.fold_epochs,
                                                  "warmup_epochs": 0.0, "val": False, "time_min": None,
                                                  "finetune_guard": False})  # a fold is no candidate
    else:
        fold_train = train_cfg.model_copy(update={"val": False, "weights": None})
    for k in range(k_folds):
        fold_dir = Path(work_dir) / f"fold{k}"
        fold_dir.mkdir(parents=True, exist_ok=True)
        held = [p for p in train if fold_of[p] == k]
        rest = [p for p in train if fold_of[p] != k]
        atomic_write_text(fold_dir / "train.txt", "".join(f"{p}\n" for p in rest))
        atomic_write_text(fold_dir / "heldout.txt", "".join(f"{p}\n" for p in held))
        atomic_write_text(fold_dir / "data.yaml", yaml.safe_dump(
            {"path": str(info.root), "train": str(fold_dir / "train.txt"), "val": str(fold_dir / "heldout.txt"),
             "names": dict(enumerate(info.names))}, sort_keys=False))
        log.info("label issues: fold %d/%d, training on %d images, scoring %d", k + 1, k_folds, len(rest), len(held))
        fold_model = train_model(fold_dir / "data.yaml", fold_train, fold_dir / "runs", seed=seed + k).last
        predict, fsize, stride, names = model_predictor(fold_model, data_yaml, size, cfg.conf_floor, cfg.iou,
                                                        cfg.max_det)
        images["train"] += _score_split(fold_dir / "data.yaml", "val", predict, names, fsize, stride, cfg, top, rows,
                                        in_sample=False, label=str(fold_model), as_split="train", extra={"fold": k})
    if "val" in cfg.splits:
        predict, fsize, stride, names = model_predictor(weights, data_yaml, size, cfg.conf_floor, cfg.iou,
                                                        cfg.max_det)
        images["val"] = _score_split(data_yaml, "val", predict, names, fsize, stride, cfg, top, rows,
                                     in_sample=False, label=str(weights), extra={"fold": -1})
    return _finish(rows, images, top, cfg, (), out_dir, t0)


def _pred_mask(preds: ImagePreds, j: int | None, conf_floor: float) -> np.ndarray | None:
    """The prediction a row's evidence names (``j`` indexes the predictions above the floor)."""
    if j is None or j < 0:
        return None
    return np.asarray(preds.masks)[np.asarray(preds.conf) >= conf_floor][j]


def write_issues_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Ranked rows as CSV (``CSV_COLUMNS``), atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "score": f"{r['score']:.4f}", "conf": f"{r['conf']:.4f}", "iou": f"{r['iou']:.4f}"})
    return atomic_write_text(path, buf.getvalue())


def write_overlay_grid(best: Sequence[tuple[dict, tuple]], path: Path) -> Path:
    """The top rows as tiles: the annotation's outline in red, the rank / kind / score on top."""
    import cv2

    tiles = []
    for row, (img, label_mask, pred_mask) in best:
        tile = np.ascontiguousarray(img)
        for mask, colour in ((label_mask, (0, 0, 255)), (pred_mask, (0, 200, 0))):
            if mask is not None and mask.any():
                contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
                cv2.drawContours(tile, contours, -1, colour, 1)
        tile = cv2.resize(tile, (TILE, TILE), interpolation=cv2.INTER_NEAREST)
        band = np.full((34, TILE, 3), 255, np.uint8)
        cv2.putText(band, f"#{row['rank']} {row['kind']} {row['score']:.2f}", (3, 13), cv2.FONT_HERSHEY_SIMPLEX,
                    0.38, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(band, f"{Path(row['image']).name[:28]} a{row['annotation']}", (3, 28),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.35, (80, 80, 80), 1, cv2.LINE_AA)
        tiles.append(np.vstack([band, tile]))
    while len(tiles) % GRID_COLUMNS:
        tiles.append(np.full_like(tiles[0], 255))
    grid = np.vstack([np.hstack(tiles[i:i + GRID_COLUMNS]) for i in range(0, len(tiles), GRID_COLUMNS)])

    def write(tmp: str) -> None:
        if not cv2.imwrite(tmp, grid):
            raise OSError(f"{path}: cannot write the PNG")

    return atomic_write(path, write, suffix=".png")


# ----------------------------------------------------------------------------- the flow step


def publish_markdown(res: LabelIssues, k: int = 10) -> str | None:
    """Prefect markdown artifact with the counts and the top rows (only inside a flow/task run)."""
    from damage.tasks.core.prefect_ui import in_run_context

    if not in_run_context():
        return None
    from prefect.artifacts import create_markdown_artifact

    lines = [f"**Label issues** over {', '.join(f'{s}: {n} images' for s, n in res.images.items())}. "
             f"Flagged: {', '.join(f'{kd} {n}' for kd, n in res.flagged.items())}. "
             f"In-sample splits (scores biased towards the labels): {', '.join(res.in_sample_splits) or 'none'}.",
             "", "| rank | image | annotation | kind | score | evidence |", "|---|---|---|---|---|---|"]
    for r in res.rows[:k]:
        lines.append(f"| {r['rank']} | {r['image']} | {r['annotation']} | {r['kind']} | {r['score']:.2f} | "
                     f"{r['evidence'].replace('|', '/')} |")
    return str(create_markdown_artifact(markdown="\n".join(lines), key="label-issues",
                                        description=res.summary_line()))


def label_issues_step(model: str | Path, data_yaml: str | Path, cfg: LabelIssuesConfig, imgsz: int,
                      parent_run_id: str, out_dir: Path, train_cfg: TrainConfig | None = None,
                      seed: int = 0) -> LabelIssues:
    """``mine_label_issues`` (or ``kfold_label_issues`` with ``cfg.folds`` >= 2 and ``train_cfg``) in a
    nested MLflow run ``label-issues``: CSV and overlay grid as artifacts, flagged counts per kind as
    metrics, a Prefect markdown summary."""
    from damage.tasks.core import tracking

    with tracking.step_run(parent_run_id, "label-issues") as (c, run_id):
        if cfg.folds >= 2:
            if train_cfg is None:
                raise DamageError("label_issues.folds >= 2 needs the training config (fold models are trained)")
            res = kfold_label_issues(data_yaml, cfg, model, train_cfg, Path(out_dir) / "folds", imgsz=imgsz,
                                     out_dir=Path(out_dir), seed=seed)
        else:
            res = mine_label_issues(data_yaml, cfg, model=model, imgsz=imgsz, out_dir=Path(out_dir))
        tracking.log_params(c, run_id, {"model": str(model), "data": str(data_yaml), **cfg.model_dump()})
        tracking.log_metrics(c, run_id, {**{f"flagged/{k}": v for k, v in res.flagged.items()},
                                         **{f"images/{s}": n for s, n in res.images.items()},
                                         "rows": len(res.rows), "seconds": res.seconds})
        for p in (res.csv_path, res.grid_path):
            if p is not None:
                tracking.log_artifact(c, run_id, p, "label_issues")
        publish_markdown(res)
    print(res.summary_line())
    return res


__all__ = ["KINDS", "ImagePreds", "LabelIssues", "kfold_label_issues", "label_issues_step", "mine_label_issues",
           "score_image"]
