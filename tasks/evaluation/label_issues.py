"""Label-issue mining: rank the annotations a trained model most disagrees with.

One inference pass over the chosen splits (default train and val) collects the model's evidence
about every annotation and every unexplained prediction, down to the evaluator's 0.001 confidence
floor; the evidence of held-out images (splits the model did not train on) then calibrates, per
class, what the model's behaviour on a *correct* label looks like, and every row is scored as a
posterior probability of being wrong (``tasks/evaluation/label_scores.py`` explains the scores
and why). Four kinds:

==================  ==========================================================================
kind                meaning
==================  ==========================================================================
``missing_label``   an object the model finds that no annotation explains (row annotation -1)
``wrong_class``     the label's class is absent and another class of the same extent is present
``bad_outline``     a confident same-class prediction overlaps the label with an unusually low IoU
``spurious_label``  nothing of the label's class is in the region, where a correct label of that
                    class would usually show some
==================  ==========================================================================

An annotation gets one row, of its most probable kind. Every row carries its geometry in image
pixels (``tasks/evaluation/label_rows.py``): the annotation's box and polygon and, where a
prediction is the evidence, the prediction's.

**Out of sample.** Scores on images the model trained on are biased towards their labels
(the model has partly memorised them). Every row says whether its image lies in a split the model
trained on (``in_sample``); ``label_issues.splits: [val]`` restricts mining to held-out data, and
:func:`kfold_label_issues` (``label_issues.folds`` >= 2) scores the train split with K fold models,
each trained without the fold it scores (K trainings: the cost is stated in its docstring). The
calibration uses held-out rows only; with none, all rows (said in the summary).

Nothing in the dataset is changed: this ranks, a person decides. (Ultralytics' dataset
loader may write its usual ``labels/*.cache`` beside the labels, as evaluation does.)

Example:
    >>> res = mine_label_issues("data.yaml", LabelIssuesConfig(), model="best.pt", out_dir=Path("issues"))
    >>> res.csv_path, res.flagged
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from damage.tasks.core.atomic import atomic_write_text
from damage.tasks.core.errors import DamageError
from damage.tasks.evaluation.label_rows import (
    CSV_COLUMNS,
    Frame,
    box_of,
    poly_list,
    pred_geometry,
    rel_path,
    write_issues_csv,
    write_overlay_grid,
)
from damage.tasks.evaluation.label_scores import (
    KINDS,
    Calibration,
    ImageEvidence,
    fit_robust,
    image_evidence,
    other_class,
    rank_key,
    score_annotations,
    score_candidates,
)

if TYPE_CHECKING:
    from damage.tasks.core.config import LabelIssuesConfig, RayConfig, TrainConfig

log = logging.getLogger(__name__)


@dataclass
class ImagePreds:
    """Predictions of one image, in the labels' (letterboxed) frame.

    Attributes:
        cls, conf: (k,) class and confidence (multi-label rows allowed, down to any floor).
        masks: (k, h, w) mask probabilities (or bool masks), at the label resolution or a
            coarser one (the model's prototype grid): labels are area-averaged down to it.
        boxes: (k, 4) xyxy in letterbox pixels (optional; else taken from the masks).
        anchors: (A, 2) anchor centres in letterbox pixels and ``anchor_scores`` (A, nc) their raw
            class scores, before any floor (optional: they only break ties between rows).
    """

    cls: np.ndarray
    conf: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray | None = None
    anchors: np.ndarray | None = None
    anchor_scores: np.ndarray | None = None


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
        calibration: what the scores were calibrated on (held-out annotations and images, or
            ``in_sample`` when no held-out image was scored).
    """

    rows: list[dict[str, Any]]
    flagged: dict[str, int]
    images: dict[str, int]
    csv_path: Path | None = None
    grid_path: Path | None = None
    seconds: float = 0.0
    in_sample_splits: tuple[str, ...] = ()
    top: list[dict[str, Any]] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-able figures for the run summary."""
        return {"images": self.images, "rows": len(self.rows), "flagged": self.flagged,
                "in_sample_splits": list(self.in_sample_splits), "calibration": self.calibration,
                "csv": str(self.csv_path) if self.csv_path else None,
                "grid": str(self.grid_path) if self.grid_path else None, "seconds": round(self.seconds, 2)}

    def summary_line(self) -> str:
        flagged = ", ".join(f"{k}={self.flagged.get(k, 0)}" for k in KINDS)
        where = f"; csv: {self.csv_path}" if self.csv_path else ""
        return (f"label issues: {sum(self.images.values())} images, {len(self.rows)} rows scored, flagged "
                f"{flagged}" + where)


# ----------------------------------------------------------------------------- the model side


def model_predictor(model: str | Path, data_yaml: str | Path, imgsz: int | None, conf_floor: float,
                    iou: float, max_det: int) -> tuple[Predictor, int, int, list[str]]:
    """A predictor running ``model`` (``.pt``/``.onnx``) once per image, post-processed as evaluation
    does: multi-label NMS down to ``conf_floor``, masks at the prototype resolution, here kept as
    probabilities; plus every anchor's raw class scores (ties only).

    Returns:
        (predictor, imgsz, stride, class names).
    """
    import torch
    from ultralytics.utils import nms, ops

    from damage.tasks.evaluation.evaluate import open_model, split_outputs

    m = open_model(model, data_yaml, imgsz)
    nc = len(m.names)
    end2end = bool(getattr(m.backend, "end2end", False))
    with torch.inference_mode():
        m.backend(torch.zeros(1, 3, m.imgsz, m.imgsz))  # warm-up, as evaluation does

    def predict(item: dict) -> ImagePreds:
        with torch.inference_mode():
            im = item["img"][None].float() / 255
            preds, protos = split_outputs(m.backend(im))
            p, proto = preds[0].float(), protos[0].float()
            det = nms.non_max_suppression(p[None], conf_floor, iou, nc=nc, multi_label=True, max_det=max_det,
                                          end2end=end2end)[0]
            nm, mh, mw = proto.shape
            h, w = im.shape[2:]
            prob = (det[:, 6:] @ proto.view(nm, -1)).sigmoid().view(-1, mh, mw)
            prob = ops.crop_mask(prob, det[:, :4] * torch.tensor([mw / w, mh / h, mw / w, mh / h]))
            anchors = scores = None
            if not end2end:
                anchors, scores = p[:2].T.numpy(), p[4:4 + nc].T.numpy()
        return ImagePreds(det[:, 5].long().numpy(), det[:, 4].numpy(), prob.numpy(), det[:, :4].numpy(),
                          anchors, scores)

    return predict, m.imgsz, m.stride, [m.names[i] for i in sorted(m.names)]


def _dense(labels: np.ndarray, preds: ImagePreds) -> np.ndarray | None:
    """(n, nc): per annotation and class, the highest raw class score of an anchor centred inside the
    annotation (else of the anchor nearest its centre)."""
    if preds.anchors is None or preds.anchor_scores is None:
        return None
    h, w = labels.shape[1:]
    xy = np.round(preds.anchors).astype(int)
    ok = (xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)
    out = np.zeros((len(labels), preds.anchor_scores.shape[1]))
    for i in range(len(labels)):
        inside = np.zeros(len(xy), bool)
        inside[ok] = labels[i][xy[ok, 1], xy[ok, 0]]
        if inside.any():
            out[i] = preds.anchor_scores[inside].max(0)
        else:
            ys, xs = np.nonzero(labels[i])
            centre = (xs.mean(), ys.mean()) if len(xs) else (w / 2, h / 2)
            out[i] = preds.anchor_scores[np.argmin(((preds.anchors - centre) ** 2).sum(1))]
    return out


def _decoys(labels: np.ndarray, cls: np.ndarray, seed: int, tries: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Each annotation mask moved (whole, inside the image) to a random place that no annotation of its
    class touches: the decoys of ``label_scores`` (what a label of that class and shape gets where
    there is none). Seeded by the image, so a rerun gives the same scores. Returns (masks, classes);
    an annotation with no free place has no decoy."""
    rng = np.random.default_rng(seed)
    h, w = labels.shape[1:]
    out, out_cls = [], []
    taken_by = {int(c): labels[cls == c].any(0) for c in np.unique(cls)}
    for i, m in enumerate(labels):
        ys, xs = np.nonzero(m)
        if not len(xs):
            continue
        taken = taken_by[int(cls[i])]
        probe = np.linspace(0, len(xs) - 1, min(len(xs), 64)).astype(int)  # a few pixels reject most places fast
        for _ in range(tries):
            dx = int(rng.integers(-xs.min(), w - xs.max()))
            dy = int(rng.integers(-ys.min(), h - ys.max()))
            if not taken[ys[probe] + dy, xs[probe] + dx].any() and not taken[ys + dy, xs + dx].any():
                d = np.zeros((h, w), bool)
                d[ys + dy, xs + dx] = True
                out.append(d)
                out_cls.append(int(cls[i]))
                break
    return (np.stack(out) if out else np.zeros((0, h, w), bool)), np.array(out_cls, int)


def _downsample(labels: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Annotation masks as coverage fractions on a coarser grid (area average)."""
    import cv2

    if labels.shape[1:] == tuple(hw) or not len(labels):
        return labels.astype(np.float32).reshape(len(labels), *hw)
    return np.stack([cv2.resize(m.astype(np.float32), (hw[1], hw[0]), interpolation=cv2.INTER_AREA) for m in labels])


# ----------------------------------------------------------------------------- mining


@dataclass
class _Record:
    """One scored image: its evidence and what its rows need (geometry in image pixels)."""

    meta: dict[str, Any]
    ev: ImageEvidence
    ann: list[dict[str, Any]]
    pred: dict[int, dict[str, Any]]


def mine_label_issues(data_yaml: str | Path, cfg: LabelIssuesConfig, model: str | Path | None = None,
                      predict: Predictor | None = None, names: Sequence[str] | None = None,
                      imgsz: int | None = None, out_dir: Path | None = None,
                      trained_splits: Sequence[str] = ("train",), ray: RayConfig | None = None) -> LabelIssues:
    """Score every annotation of ``cfg.splits`` against one pass of the model and rank them.

    Args:
        data_yaml: YOLO-seg data.yaml (read only).
        cfg: the ``label_issues:`` config section.
        model: ``.pt``/``.onnx``; or pass ``predict`` (+ ``names``, ``imgsz``) instead, e.g. to
            score with predictions made elsewhere.
        imgsz: letterbox size (default: the model's own).
        out_dir: where ``label_issues.csv`` and ``label_issues_top.png`` go; None = not written.
        trained_splits: splits the model was trained on (their rows are ``in_sample`` and do not
            calibrate the scores).
        ray: score the images on Ray workers (``model`` only); None = in this process. The same rows.

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
    records: list[_Record] = []
    images: dict[str, int] = {}
    for split in cfg.splits:
        images[split] = _score_split(data_yaml, split, predict, names, int(imgsz), stride, cfg, records,
                                     in_sample=split in trained_splits, label=str(model or "predictions"),
                                     model=model, ray=ray)
    return _finish(records, images, names, cfg, tuple(s for s in cfg.splits if s in trained_splits), out_dir,
                   _root(data_yaml), t0)


def _root(data_yaml: str | Path) -> Path:
    from damage.tasks.data.dataset import load_data_yaml

    return Path(load_data_yaml(data_yaml).root).resolve()


class SplitScorer:
    """The evidence of images of one split, by index: what ``_score_split`` does per image, in this process or
    on a Ray worker (``split_scorer``); ``as_split`` names the split in the rows (a K-fold held-out list is the
    dataset's train split)."""

    def __init__(self, data_yaml: str | Path, split: str, predict: Predictor, names: Sequence[str],
                 imgsz: int, stride: int, cfg: LabelIssuesConfig, in_sample: bool, label: str,
                 as_split: str | None = None, extra: dict[str, Any] | None = None) -> None:
        from damage.tasks.evaluation.evaluate import load_split

        self.ds, data = load_split(data_yaml, split, imgsz, stride)
        if len(data["names"]) != len(names):
            raise DamageError(f"{label}: {len(names)} classes, {data_yaml} has {len(data['names'])}")
        self.root = Path(data.get("path") or Path(data_yaml).resolve().parent).resolve()
        self.predict, self.nc, self.cfg = predict, len(names), cfg
        self.meta = {"split": as_split or split, "in_sample": in_sample, **(extra or {})}

    def __len__(self) -> int:
        return len(self.ds)

    def __call__(self, indices: Sequence[int]) -> list[_Record]:
        return [self.one(int(i)) for i in indices]

    def one(self, idx: int) -> _Record:
        """The record of image ``idx``: its annotations' evidence, outlines and the predictions they cite."""
        cfg, ds = self.cfg, self.ds
        item = ds[idx]
        preds = self.predict(item)
        full = item["masks"].bool().numpy()
        cls = item["cls"].view(-1).long().numpy()
        masks = np.asarray(preds.masks, np.float32)
        hw = masks.shape[1:] if len(masks) else full.shape[1:]
        decoys, decoy_cls = _decoys(full, cls, idx)
        ev = image_evidence(cls, _downsample(full, hw), preds.cls, preds.conf, masks, self.nc,
                            _dense(full, preds), cfg.min_conf, cfg.overlap_iou, cfg.match_iou,
                            labels_full=full, decoys=_downsample(decoys, hw), decoy_cls=decoy_cls,
                            decoy_dense=_dense(decoys, preds))
        frame = Frame(item)
        segs = ds.labels[idx].get("segments") or []
        ann = []
        for i in range(len(cls)):
            if len(segs) == len(cls):
                poly = np.asarray(segs[i], float).reshape(-1, 2) * (frame.hw[1], frame.hw[0])
            else:  # polygons not kept by the loader: the mask's outline
                from damage.tasks.evaluation.label_rows import mask_polygon

                poly = frame.to_image(mask_polygon(full[i], full.shape[1:]) if full[i].any() else np.zeros((1, 2)))
            ann.append({"ann_box": box_of(poly), "ann_polygon": poly_list(poly)})
        cited = {int(j) for j in ev.candidates} | {int(j) for j in ev.best_pred if j >= 0}
        cited |= {int(ev.support_pred[i, b]) for i in range(len(cls)) if (b := other_class(ev, i)) >= 0}
        geom = {j: pred_geometry(masks[j], None if preds.boxes is None else preds.boxes[j], frame, full.shape[1:])
                for j in cited}
        return _Record({"image": rel_path(item["im_file"], self.root), **self.meta}, ev, ann, geom)


def split_scorer(model: str | Path, data_yaml: str | Path, split: str, imgsz: int, cfg: LabelIssuesConfig,
                 in_sample: bool, label: str, as_split: str | None = None,
                 extra: dict[str, Any] | None = None) -> SplitScorer:
    """A ``SplitScorer`` with its own predictor of ``model``: what each Ray worker builds once."""
    predict, imgsz, stride, names = model_predictor(model, data_yaml, imgsz, cfg.conf_floor, cfg.iou, cfg.max_det)
    return SplitScorer(data_yaml, split, predict, names, imgsz, stride, cfg, in_sample, label, as_split, extra)


def _score_split(data_yaml: str | Path, split: str, predict: Predictor, names: Sequence[str], imgsz: int,
                 stride: int, cfg: LabelIssuesConfig, records: list[_Record], in_sample: bool, label: str,
                 as_split: str | None = None, extra: dict[str, Any] | None = None,
                 model: str | Path | None = None, ray: RayConfig | None = None) -> int:
    """Collect the evidence of every image of one split into ``records``; returns the image count.

    With ``ray`` (and the ``model`` behind ``predict``) the images are scored on Ray workers, each with its own
    predictor of ``model``; the records come back in index order, the same as in this process."""
    scorer = SplitScorer(data_yaml, split, predict, names, imgsz, stride, cfg, in_sample, label, as_split, extra)
    if ray is None or model is None:
        records.extend(scorer(range(len(scorer))))
    else:
        from damage.tasks.scale.shards import map_indices

        records.extend(map_indices(len(scorer), split_scorer, {
            "model": model, "data_yaml": data_yaml, "split": split, "imgsz": imgsz, "cfg": cfg,
            "in_sample": in_sample, "label": label, "as_split": as_split, "extra": extra}, ray, ship=("model",)))
    return len(scorer)


def _evidence_text(kind: str, why: dict[str, Any], lc: str, pc: str, floor: float) -> str:
    if kind == "spurious_label":
        return (f"no '{lc}' found in the region: best '{lc}' evidence {why['presence']:.3f} (conf x coverage, "
                f"floor {floor}); {why['lr']:.1f}x likelier for a region without '{lc}' than for a correct "
                f"'{lc}' label (held-out calibration)")
    if kind == "wrong_class":
        return (f"'{pc}' predicted over it (conf x IoU {why['support']:.2f}) while '{lc}' evidence is "
                f"{why['presence']:.3f}; likelihood ratio {why['lr']:.1f}")
    if kind == "bad_outline":
        return (f"'{lc}' predicted at conf {why['conf']:.2f} (model precision there {why['precision']:.2f}) with "
                f"mask IoU only {why['iou']:.2f}; likelihood ratio {why['lr']:.1f}")
    return (f"'{pc}' predicted at conf {why['conf']:.2f} (model precision there {why['precision']:.2f}), no "
            f"annotation explains it (best mask IoU with any annotation {why['iou']:.2f})")


def _rows(rec: _Record, cal: Calibration, names: Sequence[str], cfg: LabelIssuesConfig) -> list[dict[str, Any]]:
    ev = rec.ev

    def name(c: int) -> str:
        return names[c] if 0 <= c < len(names) else str(c)

    out = []
    for row in score_annotations(ev, cal, cfg.prior) + score_candidates(ev, cal):
        i, j, why = row["annotation"], row.pop("_pred"), row.pop("_why")
        lc = name(int(ev.label_cls[i])) if i >= 0 else ""
        pc = name(int(ev.pred_cls[j])) if j >= 0 else ""
        conf = float(ev.pred_conf[j]) if j >= 0 else float(why.get("presence", 0.0))
        if row["kind"] == "wrong_class":
            iou = float(why["support"]) / max(conf, 1e-12)
        else:
            iou = float(why.get("iou", ev.best_u[i] if i >= 0 else 0.0))
        geom = {"ann_box": "", "ann_polygon": "", **(rec.ann[i] if i >= 0 else {}),
                **(rec.pred.get(j, {}) if j >= 0 else {"pred_box": "", "pred_polygon": ""})}
        row.update(rec.meta, label_class=lc, pred_class=pc, conf=conf, iou=iou, **geom,
                   evidence=_evidence_text(row["kind"], why, lc, pc, cfg.conf_floor))
        out.append(row)
    return out


def _finish(records: list[_Record], images: dict[str, int], names: Sequence[str], cfg: LabelIssuesConfig,
            in_sample_splits: tuple[str, ...], out_dir: Path | None, root: Path, t0: float) -> LabelIssues:
    """Calibrate on the held-out records, score, rank, count, write the CSV and the overlay grid."""
    held = [r.ev for r in records if not r.meta["in_sample"]]
    where = "held-out"
    if not held:
        log.warning("label issues: no held-out images were scored: calibrating on in-sample rows (biased)")
        held, where = [r.ev for r in records], "in_sample"
    cal = fit_robust(held, len(names), cfg.prior)
    rows = [row for rec in records for row in _rows(rec, cal, names, cfg)]
    rows.sort(key=rank_key)
    for r, row in enumerate(rows, 1):
        row["rank"] = r
    flagged = dict(Counter(r["kind"] for r in rows if r["score"] >= cfg.flag_score))
    res = LabelIssues(rows, {k: flagged.get(k, 0) for k in KINDS}, images, in_sample_splits=in_sample_splits,
                      calibration={"on": where, "images": cal.images, "annotations": cal.annotations})
    res.top = [dict(r) for r in rows[:cfg.top_k]]
    if out_dir is not None:
        out_dir = Path(out_dir)
        res.csv_path = write_issues_csv(rows, out_dir / "label_issues.csv")
        if res.top:
            res.grid_path = write_overlay_grid(res.top, root, out_dir / "label_issues_top.png")
    res.seconds = time.perf_counter() - t0
    return res


def kfold_label_issues(data_yaml: str | Path, cfg: LabelIssuesConfig, weights: str | Path, train_cfg: TrainConfig,
                       work_dir: Path, imgsz: int | None = None, out_dir: Path | None = None,
                       seed: int = 0, ray: RayConfig | None = None) -> LabelIssues:
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

    ``ray``: the scoring passes run on Ray workers (the fold trainings stay in this process).

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
    records: list[_Record] = []
    images: dict[str, int] = {"train": 0}
    size = int(imgsz or train_cfg.imgsz)
    if cfg.fold_start == "trained":
        fold_train = train_cfg.model_copy(update={"weights": str(weights), "epochs": cfg.fold_epochs,
                                                  "warmup_epochs": 0.0, "val": False, "time_min": None,
                                                  "finetune_guard": False, "plots": False})  # no candidate
    else:
        fold_train = train_cfg.model_copy(update={"val": False, "weights": None, "plots": False})
    # a fold model only scores its held-out images: nobody reads its figures (about 6 s each to draw)
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
        images["train"] += _score_split(fold_dir / "data.yaml", "val", predict, names, fsize, stride, cfg, records,
                                        in_sample=False, label=str(fold_model), as_split="train", extra={"fold": k},
                                        model=fold_model, ray=ray)
    if "val" in cfg.splits:
        predict, fsize, stride, names = model_predictor(weights, data_yaml, size, cfg.conf_floor, cfg.iou,
                                                        cfg.max_det)
        images["val"] = _score_split(data_yaml, "val", predict, names, fsize, stride, cfg, records,
                                     in_sample=False, label=str(weights), extra={"fold": -1}, model=weights,
                                     ray=ray)
    return _finish(records, images, names, cfg, (), out_dir, Path(info.root).resolve(), t0)


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


__all__ = ["CSV_COLUMNS", "KINDS", "ImagePreds", "LabelIssues", "kfold_label_issues", "label_issues_step", "mine_label_issues",
           "write_issues_csv"]
