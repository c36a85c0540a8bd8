"""Label-issue scores: the model's evidence about each annotation, calibrated per class on held-out data.

Why calibrated. A mediocre model (mask mAP50 0.5-0.75, what a real damage dataset gives) misses
many correct labels: a scratch it cannot see looks, to a raw "no confident prediction here" score,
exactly like a box someone drew on bare paint, and every such label would score 1.0. What tells
them apart is how the model usually behaves on *correct* labels of that class. So every score here
is a posterior probability computed from densities the model's own output defines on held-out
annotations (images the model did not train on; their labels are mostly right):

    P(kind | evidence) = prior * LR / (prior * LR + 1 - prior),   LR = p(evidence | error) / p(evidence | correct)

Evidence, per annotation of class ``a`` (one inference pass, predictions kept down to the
evaluator's 0.001 confidence floor, multi-label NMS as in evaluation, soft masks: IoU and coverage
are computed from mask probabilities, so a thin object keeps its overlap at prototype resolution):

* ``presence[c]`` = max over class-``c`` predictions of ``conf * coverage`` (share of the annotated
  region inside the predicted mask): "is there any ``c`` inside this region?"; at least the raw
  class-``c`` score of the anchors centred inside it, so a region no kept prediction touches still
  has evidence;
* ``support[c]`` = max over class-``c`` predictions of ``conf * IoU``: "is this region a ``c``?";
* the most confident same-class prediction overlapping it (IoU >= ``overlap_iou``): conf ``q``, IoU ``u``;
* in both, a prediction that another annotation matches better (IoU >= ``match_iou`` and above its IoU
  with this one) is the model's view of that annotation and counts for no other: a box drawn over an
  object that has its own label is a spurious label, not that object with a wrong class or a bad outline;
* ``dense``: the highest raw class-``a`` score of any anchor centred inside the region, before any
  floor or NMS (a correct label the model misses usually keeps 1e-3 or more, a region with nothing
  of ``a`` far less); it also orders rows whose calibrated evidence is otherwise equal.

==================  ==========================================================================
kind                likelihood ratio (densities estimated per class on held-out annotations)
==================  ==========================================================================
``spurious_label``  ``f_null_a(presence[a]) / f_self_a(presence[a])``: how often a region of an
                    ``a`` label's shape moved to a random place of its image where no ``a`` is
                    labelled (a decoy; without decoys, annotations of other classes) gets this
                    little ``a``, against how often a
                    correct ``a`` label does. For a class the model always misses, both are near
                    zero and the ratio stays near 1: "unsupported" is weak evidence there, strong
                    for a class the model reliably finds. Both densities are conditioned on the
                    label's width (area over longer extent; a decoy keeps its source's shape):
                    held-out samples weigh by a Gaussian kernel in log width (``WIDTH_KERNEL``)
                    around it. The model misses thin and small objects (a hairline scratch, a
                    sliver cut by the image border) far more often, so "unsupported" says less
                    there.
``wrong_class``     the spurious ratio (the label's class is absent) times, for the other class
                    ``b`` with the most support, ``g_self_b(support[b]) / g_other_b(support[b])``:
                    a ``b`` of this extent is as present as on correct ``b`` labels, and more than
                    on labels of other classes (the model's confusions are in the denominator).
``bad_outline``     ``prec_a(q) * sqrt(2(1 - u) / h_a(u) * 2(1 - s) / k_a(s)) + 1 - prec_a(q)``: a
                    confident same-class prediction (``prec_a``: the model's precision for class
                    ``a`` at conf ``q``) overlaps the label with an IoU ``u``, and lies inside it
                    by a share ``s`` of its mask, that are rare for correct ``a`` labels (``h_a``,
                    ``k_a``: their densities for the model's most confident overlapping
                    prediction on them, per confidence stratum, measured at full resolution,
                    fitted unimodal: the held-out labels hold bad outlines too, a bump at low
                    values that would otherwise read as normal for the class). A bad outline's
                    ``u`` and ``s`` are taken as triangular, low more often than high. ``s`` tells
                    a model that under-segments (its mask inside a correct label: low IoU, ``s``
                    near 1) from an outline that misses the object (much of the mask outside);
                    ``u`` still sees an outline drawn far too large. The two ratios describe one
                    overlap, so they enter as a geometric mean, not a product. A class the model
                    outlines poorly has flat densities and gets little from a low overlap.
``missing_label``   a prediction of class ``c`` at conf ``q`` that no annotation explains:
                    ``r_c(q) / n_c(q)``, the conf density of the model on correct ``c`` labels
                    against that of unexplained predictions, with prior odds ``prior * labels /
                    unexplained predictions`` (both counted on held-out images); times
                    ``o_c(v) / m_c(v)``, ``v`` the candidate's best IoU with any annotation of its
                    image: ``o_c`` is that overlap for correct ``c`` labels (each one's best IoU
                    with the other labels of its image: how real objects sit among labelled ones),
                    ``m_c`` for the candidates. A prediction lying over another class's label (a
                    confusion, a duplicate) is a less likely missing object than one on open
                    ground; the ratio never rises with ``v``.
==================  ==========================================================================

Densities are smoothed per-class histograms (``densities.py``: shrunk towards the all-class
histogram, a uniform floor, read by linear interpolation, so a score moves continuously with its
evidence). The held-out labels are the ones being cleaned, errors included: ``fit_robust`` fits
once, then refits (``ROBUST_ROUNDS``) with each annotation weighted by its probability of being
correct and each missing-label candidate by its probability of not being one (one EM step of the
mixture "correct or error"). Every ratio is made monotone in its evidence (an isotonic fit over the
bins): less of the label's class never makes a label less suspicious, a more confident unexplained
prediction never a less likely missing label. An annotation gets one row, of its most probable kind.

No ties unless the same case: rows are ordered by log-odds (which do not saturate at 1.0 as the
printed probability does, and which plateau where a histogram ratio is flat), then by a continuous
strength of the kind's own evidence (``1 - dense`` for spurious labels: the raw anchor score is
never exactly equal for two different regions), then by the whole evidence vector, then kind
order; image and annotation index only order rows whose evidence is identical.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from damage.tasks.evaluation.densities import Density

KINDS = ("missing_label", "wrong_class", "bad_outline", "spurious_label")
CONF_STRATA = (0.25, 0.6)  # the IoU a prediction reaches depends on its confidence: densities per stratum
WIDTH_KERNEL = 0.3  # presence densities conditioned on the label's width: kernel sd in log width (x1.35)
WIDTH_GRID = 24  # log widths the conditioned densities are fitted at; read between them by interpolation
WIDTH_FLOOR = 1e-4  # relative widths below this count as this
ROBUST_ROUNDS = 1  # refits with each held-out annotation weighted by its probability of being correct


# ----------------------------------------------------------------------------- evidence


@dataclass
class ImageEvidence:
    """One image's evidence (see the module docstring); arrays over annotations (n) and predictions (k)."""

    label_cls: np.ndarray  # (n,)
    presence: np.ndarray  # (n, nc)
    support: np.ndarray  # (n, nc)
    support_pred: np.ndarray  # (n, nc) prediction index giving support[c], -1 none
    best_q: np.ndarray  # (n,) conf of the most confident overlapping same-class prediction (0 none)
    best_u: np.ndarray  # (n,) its IoU
    best_pred: np.ndarray  # (n,) its index, -1 none
    matched_q: np.ndarray  # (n,) max conf of same-class predictions with IoU >= match_iou (0 none)
    dense: np.ndarray  # (n,) highest raw label-class score of an anchor inside the region
    pred_cls: np.ndarray  # (k,)
    pred_conf: np.ndarray  # (k,)
    pred_tp: np.ndarray  # (k,) bool: on a same-class annotation with IoU >= match_iou
    unexplained: np.ndarray  # (k,) bool
    candidates: np.ndarray  # indices of unexplained predictions >= min_conf, one per object
    cand_iou: np.ndarray  # best IoU of each candidate with any annotation
    decoy_cls: np.ndarray = field(default_factory=lambda: np.zeros(0, int))  # (m,) class of the source label
    decoy_presence: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # (m, nc)
    label_iou: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (n,) best IoU with another annotation
    label_size: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (n,) width relative to the image (_size)
    decoy_size: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (m,)
    best_share: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (n,) share of best_pred's mask inside


def soft_overlap(labels: np.ndarray, preds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(IoU, coverage of each label by each prediction) from soft masks of one resolution.

    ``labels`` (n, h, w) and ``preds`` (k, h, w) hold values in [0, 1] (coverage fractions, mask
    probabilities); intersection is the product, so binary masks give the usual IoU.
    """
    n, k = len(labels), len(preds)
    if not n or not k:
        return np.zeros((n, k)), np.zeros((n, k))
    a = labels.reshape(n, -1).astype(np.float32)
    b = preds.reshape(k, -1).astype(np.float32)
    inter = (a @ b.T).astype(np.float64)
    sa, sb = a.sum(1).astype(np.float64), b.sum(1).astype(np.float64)
    union = sa[:, None] + sb[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    cov = np.divide(inter, sa[:, None], out=np.zeros_like(inter), where=sa[:, None] > 0)
    return iou, cov


def presence_in(regions: np.ndarray, pred_cls: np.ndarray, pred_conf: np.ndarray, preds: np.ndarray, nc: int,
                dense: np.ndarray | None = None) -> np.ndarray:
    """(m, nc) ``presence`` of every class in each region (coverage maps of the predictions' resolution)."""
    _, cov = soft_overlap(regions, preds)
    out = np.zeros((len(regions), nc))
    for c in range(nc):
        cols = np.flatnonzero(pred_cls == c)
        if len(cols) and len(regions):
            out[:, c] = (pred_conf[cols] * cov[:, cols]).max(1)
    return out if dense is None else np.maximum(out, np.asarray(dense, float).reshape(len(regions), nc))


def image_evidence(label_cls: np.ndarray, labels: np.ndarray, pred_cls: np.ndarray, pred_conf: np.ndarray,
                   preds: np.ndarray, nc: int, dense: np.ndarray | None = None, min_conf: float = 0.25,
                   overlap_iou: float = 0.1, match_iou: float = 0.5, dedupe_iou: float = 0.5,
                   labels_full: np.ndarray | None = None, decoys: np.ndarray | None = None,
                   decoy_cls: np.ndarray | None = None, decoy_dense: np.ndarray | None = None) -> ImageEvidence:
    """Evidence of one image from soft masks of one resolution (labels: coverage; predictions: probability).

    Args:
        label_cls: (n,) annotation classes, label-file order.
        labels: (n, h, w) annotation coverage in [0, 1].
        pred_cls, pred_conf: (k,) predictions (any confidence; multi-label rows allowed).
        preds: (k, h, w) mask probabilities.
        nc: number of classes.
        dense: (n, nc) highest raw score of each class over the anchors inside each annotation (a
            floor under ``presence``); None = no anchor scores (presence from the predictions only).
        min_conf: unexplained predictions at least this confident are missing-label candidates.
        overlap_iou: IoU at which a same-class prediction overlaps (explains) an annotation.
        match_iou: IoU at which another class's prediction explains an annotation (it covers it),
            and at which a prediction counts as correct for the model's precision.
        dedupe_iou: candidates overlapping a more confident candidate by this IoU are one object.
        labels_full: (n, H, W) the annotation masks at full resolution when ``labels`` is coarser: the
            bad-outline IoU is then measured there (a small object's IoU on the coarse grid says more
            about the grid than about the outline).
        decoys: (m, h, w) coverage of decoy regions: annotations moved to a random place of the same
            image that no annotation of their class touches (``decoy_cls``: their source classes;
            ``decoy_dense``: their anchors' raw scores).
            Their presence is what an annotation of that class and shape gets where nothing was
            labelled: the null of ``spurious_label``.
    """
    label_cls = np.asarray(label_cls, int)
    pred_cls, pred_conf = np.asarray(pred_cls, int), np.asarray(pred_conf, float)
    n, k = len(label_cls), len(pred_cls)
    iou, cov = soft_overlap(labels, preds)
    same = label_cls[:, None] == pred_cls[None, :]
    presence, support = np.zeros((n, nc)), np.zeros((n, nc))
    support_pred = np.full((n, nc), -1)
    # a prediction is the model's view of the annotation it matches best (any class): it counts for no other
    claimed = np.zeros((n, k), bool)
    if n > 1 and k:
        top2 = np.sort(iou, 0)[-2:]
        other = np.where(np.arange(n)[:, None] == iou.argmax(0)[None, :], top2[0], top2[1])  # best IoU elsewhere
        claimed = (other >= match_iou) & (other > iou)
    fits = same & (iou >= match_iou)
    for c in range(nc):
        cols = np.flatnonzero(pred_cls == c)
        if len(cols) and n:
            presence[:, c] = (pred_conf[cols] * cov[:, cols]).max(1)
            s = pred_conf[cols] * iou[:, cols] * ~claimed[:, cols]
            support[:, c] = s.max(1)
            support_pred[:, c] = np.where(support[:, c] > 0, cols[s.argmax(1)], -1)
    over = same & (iou >= overlap_iou)
    own = over & ~claimed  # the outline's own prediction, not a neighbour's that its own label matches
    ranked = np.where(own, pred_conf[None, :], -1.0)
    best_pred = np.where(own.any(1), ranked.argmax(1) if k else -1, -1) if n else np.zeros(0, int)
    best_q = np.where(best_pred >= 0, pred_conf[np.maximum(best_pred, 0)] if k else 0.0, 0.0)
    full = labels_full if labels_full is not None else labels
    ov = np.array([_full_overlap(full[i], preds[j]) if j >= 0 else (0.0, 0.0) for i, j in enumerate(best_pred)])
    ov = ov.reshape(n, 2)
    best_u, best_share = ov[:, 0], ov[:, 1]
    matched_q = np.where(fits, pred_conf[None, :], 0.0).max(1) if k else np.zeros(n)
    pred_tp = fits.any(0) if n else np.zeros(k, bool)
    explained = (over | (~same & (iou >= match_iou))).any(0) if n else np.zeros(k, bool)
    unexplained = ~explained
    cands: list[int] = []
    order = [j for j in np.argsort(-pred_conf, kind="stable") if unexplained[j] and pred_conf[j] >= min_conf]
    if order:
        pp, _ = soft_overlap(preds[order], preds[order])
        for a, j in enumerate(order):
            if all(pp[a, order.index(b)] < dedupe_iou for b in cands):
                cands.append(int(j))
    cand = np.array(cands, int)
    cand_iou = iou[:, cand].max(0) if n and len(cand) else np.zeros(len(cand))
    if dense is None:
        dense = presence[np.arange(n), label_cls] if n else np.zeros(0)
    else:  # below the floor no prediction is kept: the anchors' raw class scores are the evidence left
        dense = np.asarray(dense, float).reshape(n, nc)
        presence = np.maximum(presence, dense)
        dense = dense[np.arange(n), label_cls] if n else np.zeros(0)
    ll, _ = soft_overlap(labels, labels)
    np.fill_diagonal(ll, 0.0)
    ev = ImageEvidence(label_cls, presence, support, support_pred, best_q, best_u, best_pred, matched_q,
                       np.asarray(dense, float), pred_cls, pred_conf, pred_tp, unexplained, cand, cand_iou,
                       label_iou=ll.max(1) if n > 1 else np.zeros(n), label_size=_size(labels), best_share=best_share)
    if decoys is not None and len(decoys):
        ev.decoy_cls = np.asarray(decoy_cls, int)
        ev.decoy_size = _size(decoys)
        ev.decoy_presence = presence_in(decoys, pred_cls, pred_conf, preds, nc, decoy_dense)
    return ev


def _size(regions: np.ndarray) -> np.ndarray:
    """(n,) each region's width relative to the image side: its area over its longer extent (a square's side, a
    scratch's thickness; coverage maps, so below one cell too). What a strided detector resolves is the width."""
    if not len(regions):
        return np.zeros(0)
    r = np.asarray(regions, np.float64).reshape(len(regions), *regions.shape[-2:])
    out = np.zeros(len(r))
    for i, m in enumerate(r):
        ys, xs = np.nonzero(m > 0)
        if len(xs):
            out[i] = m.sum() / max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / max(m.shape)
    return out


def _full_overlap(label: np.ndarray, prob: np.ndarray) -> tuple[float, float]:
    """(soft IoU, share of the prediction inside the label) of an annotation mask with a mask probability map,
    upsampled to the annotation's resolution."""
    import cv2

    p = np.asarray(prob, np.float32)
    if p.shape != label.shape:
        p = cv2.resize(p, (label.shape[1], label.shape[0]), interpolation=cv2.INTER_LINEAR)
    a = np.asarray(label, np.float32)
    inter = float((a * p).sum())
    union = float(a.sum() + p.sum()) - inter
    return (inter / union if union > 0 else 0.0), (inter / float(p.sum()) if p.sum() > 0 else 0.0)


# ----------------------------------------------------------------------------- calibration


@dataclass
class Calibration:
    """The model's reliability per class, measured on held-out annotations (``fit``)."""

    nc: int
    width_grid: np.ndarray  # (G,) log widths at which the presence densities are fitted
    presence_self: list[Density]  # one per grid width
    presence_other: list[Density]
    presence_null: list[Density] | None  # decoys: annotations moved to random places (None: no decoys)
    support_self: Density
    support_other: Density
    iou_self: list[Density]  # one per confidence stratum (CONF_STRATA)
    share_self: list[Density]  # the same for the share of the prediction inside the label
    conf_tp: Density
    conf_fp: Density
    tp_share: np.ndarray  # (nc,) share of held-out predictions >= the floor that are correct
    conf_real: Density
    conf_unexplained: Density
    missing_prior_odds: np.ndarray  # (nc,)
    overlap_real: Density  # best IoU of a correct label with the other labels of its image
    overlap_unexplained: Density  # best IoU of a missing-label candidate with the labels of its image
    annotations: int
    images: int
    _bad_outline: dict = field(default_factory=dict, repr=False, compare=False)  # stratum -> its uniform density

    @classmethod
    def fit(cls, evidence: Sequence[ImageEvidence], nc: int, prior: float,
            label_weight: Sequence[np.ndarray] | None = None, cand_weight: Sequence[np.ndarray] | None = None
            ) -> Calibration:
        """Densities from the evidence of held-out images (mostly correct labels). ``label_weight`` (per image,
        per annotation) and ``cand_weight`` (per image, per candidate): the probability that each is correct / not
        a missing label (default 1), weighting the densities of correct labels and of unexplained predictions."""
        lab = np.concatenate([e.label_cls for e in evidence]) if evidence else np.zeros(0, int)
        pres = np.concatenate([e.presence for e in evidence]) if evidence else np.zeros((0, nc))
        sup = np.concatenate([e.support for e in evidence]) if evidence else np.zeros((0, nc))
        bq = np.concatenate([e.best_q for e in evidence]) if evidence else np.zeros(0)
        bu = np.concatenate([e.best_u for e in evidence]) if evidence else np.zeros(0)
        bs = np.concatenate([e.best_share for e in evidence]) if evidence else np.zeros(0)
        mq = np.concatenate([e.matched_q for e in evidence]) if evidence else np.zeros(0)
        li = np.concatenate([e.label_iou for e in evidence]) if evidence else np.zeros(0)
        cc = np.concatenate([e.pred_cls[e.candidates] for e in evidence]) if evidence else np.zeros(0, int)
        ci = np.concatenate([e.cand_iou for e in evidence]) if evidence else np.zeros(0)
        pc = np.concatenate([e.pred_cls for e in evidence]) if evidence else np.zeros(0, int)
        pf = np.concatenate([e.pred_conf for e in evidence]) if evidence else np.zeros(0)
        tp = np.concatenate([e.pred_tp for e in evidence]) if evidence else np.zeros(0, bool)
        un = np.concatenate([e.unexplained for e in evidence]) if evidence else np.zeros(0, bool)
        dc = np.concatenate([e.decoy_cls for e in evidence]) if evidence else np.zeros(0, int)
        dp = np.concatenate([e.decoy_presence.reshape(-1, nc) for e in evidence]) if len(dc) else np.zeros((0, nc))
        ls = np.concatenate([e.label_size for e in evidence]) if evidence else np.zeros(0)
        ds = np.concatenate([e.decoy_size for e in evidence]) if len(dc) else np.zeros(0)
        lw = (np.concatenate([np.asarray(w, float) for w in label_weight]) if label_weight is not None and evidence
              else np.ones(len(lab)))
        pw = np.ones(len(pc))
        if cand_weight is not None and evidence:
            start = np.cumsum([0] + [len(e.pred_cls) for e in evidence])[:-1]
            for s0, e, w in zip(start, evidence, cand_weight, strict=True):
                pw[s0 + np.asarray(e.candidates, int)] = w
        own = [lab == c for c in range(nc)]
        lx, dx = _log_width(ls), _log_width(ds)
        grid = (np.linspace(lx.min(), lx.max(), WIDTH_GRID) if len(lx) and lx.max() > lx.min()
                else lx[:1] if len(lx) else np.zeros(1))
        kern = [(np.exp(-0.5 * ((lx - g) / WIDTH_KERNEL) ** 2), np.exp(-0.5 * ((dx - g) / WIDTH_KERNEL) ** 2))
                for g in grid]
        has = bq > 0
        st = np.searchsorted(CONF_STRATA, bq)
        n_un = np.array([(un & (pc == c)).sum() for c in range(nc)], float)
        n_lab = np.array([o.sum() for o in own], float)
        tp_n = np.array([(tp & (pc == c)).sum() for c in range(nc)], float)
        all_n = np.array([(pc == c).sum() for c in range(nc)], float)
        return cls(
            nc,
            width_grid=grid,
            presence_self=[Density.fit([pres[o, c] for c, o in enumerate(own)], [kl[o] * lw[o] for o in own])
                           for kl, _ in kern],
            presence_other=[Density.fit([pres[~o, c] for c, o in enumerate(own)], [kl[~o] for o in own])
                            for kl, _ in kern],
            presence_null=[Density.fit([dp[dc == c, c] for c in range(nc)], [kd[dc == c] for c in range(nc)])
                           for _, kd in kern] if len(dc) else None,
            support_self=Density.fit([sup[o, c] for c, o in enumerate(own)], [lw[o] for o in own]),
            support_other=Density.fit([sup[~o, c] for c, o in enumerate(own)]),
            iou_self=[Density.fit([bu[o & has & (st == k)] for o in own], [lw[o & has & (st == k)] for o in own],
                                  log=False, unimodal=True) for k in range(len(CONF_STRATA) + 1)],
            share_self=[Density.fit([bs[o & has & (st == k)] for o in own], [lw[o & has & (st == k)] for o in own],
                                    log=False, unimodal=True) for k in range(len(CONF_STRATA) + 1)],
            conf_tp=Density.fit([pf[tp & (pc == c)] for c in range(nc)]),
            conf_fp=Density.fit([pf[~tp & (pc == c)] for c in range(nc)]),
            tp_share=(tp_n + 1) / (all_n + 2),
            conf_real=Density.fit([mq[o] for o in own], [lw[o] for o in own]),
            conf_unexplained=Density.fit([pf[un & (pc == c)] for c in range(nc)],
                                         [pw[un & (pc == c)] for c in range(nc)]),
            missing_prior_odds=prior * (n_lab + 1) / (n_un + 1),
            overlap_real=Density.fit([li[o] for o in own], [lw[o] for o in own], log=False),
            overlap_unexplained=Density.fit([ci[cc == c] for c in range(nc)], log=False),
            annotations=int(len(lab)), images=len(evidence))

    def spurious_ratio(self, c: int, width: float, presence: float) -> float:
        """``f_null_c / f_self_c`` at ``presence`` for a label of relative ``width`` (``_size``): the ratios at
        the two nearest grid widths, interpolated in log."""
        null = self.presence_null or self.presence_other
        pos = float(np.interp(_log_width(np.array([width]))[0], self.width_grid, np.arange(len(self.width_grid))))
        i0 = int(pos)
        i1 = min(i0 + 1, len(self.width_grid) - 1)
        r0 = null[i0].ratio(self.presence_self[i0], c, presence, increasing=False)
        r1 = null[i1].ratio(self.presence_self[i1], c, presence, increasing=False)
        return math.exp((1 - (pos - i0)) * math.log(r0) + (pos - i0) * math.log(r1))

    def outline_ratio(self, k: int, c: int, iou: float, share: float) -> float:
        """The bad-outline likelihood ratio of class ``c`` in confidence stratum ``k`` (see the module docstring)."""
        h = self.iou_self[k]
        # a bad outline's IoU with the object: anywhere, more often low than high (2(1 - u)); no samples of its
        # own: each ratio's monotone fit is weighted by the correct labels' samples alone
        if k not in self._bad_outline:
            self._bad_outline[k] = Density(h.lo, h.hi, h.bins, h.log, np.ones_like(h.pdf_table),
                                           np.zeros_like(h.counts))
        uniform, tri = self._bad_outline[k], 2 * (1 - h.centres())
        # the two views of one overlap are correlated: their ratios are combined as a geometric mean
        return math.sqrt(uniform.ratio(h, c, iou, increasing=False, weight=tri)
                         * uniform.ratio(self.share_self[k], c, share, increasing=False, weight=tri))

    def precision(self, c: int, q: float) -> float:
        """The model's precision for class ``c`` at confidence ``q`` (held-out, Bayes from the two
        densities, non-decreasing in ``q``)."""
        odds = self.tp_share[c] / (1 - self.tp_share[c]) * self.conf_tp.ratio(self.conf_fp, c, q, increasing=True)
        return float(odds / (1 + odds))


def _log_width(width: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(np.asarray(width, float), WIDTH_FLOOR))


def _log_odds(prior: float, lr: float) -> float:
    return math.log(prior / (1 - prior)) + math.log(max(lr, 1e-300))


def posterior(log_odds: float) -> float:
    """Probability from log-odds (the printed ``score``)."""
    return 1.0 / (1.0 + math.exp(-log_odds)) if log_odds > -700 else 0.0


def other_class(ev: ImageEvidence, i: int) -> int:
    """The class other than annotation ``i``'s with the most support there (-1: none)."""
    a = int(ev.label_cls[i])
    others = [b for b in range(ev.support.shape[1]) if b != a and ev.support[i, b] > 0]
    return max(others, key=lambda c: (ev.support[i, c], -c)) if others else -1


def score_annotations(ev: ImageEvidence, cal: Calibration, prior: float) -> list[dict[str, Any]]:
    """One row per annotation: its most probable kind, ``log_odds``, ``score`` (posterior),
    ``strength`` (continuous tie-break), the prediction index it cites (``_pred``) and the numbers
    behind it (``_why``)."""
    rows = []
    for i, a in enumerate(ev.label_cls):
        a = int(a)
        p_a = ev.presence[i, a]
        lr_sp = cal.spurious_ratio(a, float(ev.label_size[i]), p_a)
        cand = {"spurious_label": (_log_odds(prior, lr_sp), 1.0 - float(ev.dense[i]), -1,
                                   {"presence": p_a, "lr": lr_sp})}
        b = other_class(ev, i)
        if b >= 0:
            s_b = ev.support[i, b]
            lr_b = cal.support_self.ratio(cal.support_other, b, s_b, increasing=True)
            cand["wrong_class"] = (_log_odds(prior, lr_sp * lr_b), s_b - p_a, int(ev.support_pred[i, b]),
                                   {"presence": p_a, "cls": b, "support": s_b, "lr": lr_sp * lr_b})
        if ev.best_pred[i] >= 0:
            q, u = ev.best_q[i], ev.best_u[i]
            prec = cal.precision(a, q)
            k = int(np.searchsorted(CONF_STRATA, q))
            lr_bo = prec * cal.outline_ratio(k, a, u, float(ev.best_share[i])) + 1 - prec
            cand["bad_outline"] = (_log_odds(prior, lr_bo), q * (1 - u), int(ev.best_pred[i]),
                                   {"conf": q, "iou": u, "precision": prec, "lr": lr_bo})
        kind = max(cand, key=lambda kd: (cand[kd][0], cand[kd][1], -KINDS.index(kd)))
        lo, strength, j, why = cand[kind]
        # the whole evidence, least supported first: rows tie only when all of it is equal (the same case)
        tiebreak = (float(p_a), float(ev.dense[i]), float(ev.best_u[i]), -float(ev.best_q[i]),
                    -float(ev.support[i].max()))
        rows.append({"annotation": i, "kind": kind, "log_odds": lo, "score": posterior(lo), "strength": strength,
                     "tiebreak": tiebreak, "_pred": j, "_why": why})
    return rows


def score_candidates(ev: ImageEvidence, cal: Calibration) -> list[dict[str, Any]]:
    """One ``missing_label`` row per candidate prediction (see ``score_annotations`` for the fields)."""
    rows = []
    for j, best_iou in zip(ev.candidates, ev.cand_iou, strict=True):
        c, q = int(ev.pred_cls[j]), float(ev.pred_conf[j])
        lr_conf = cal.conf_real.ratio(cal.conf_unexplained, c, q, increasing=True)
        lr_overlap = cal.overlap_real.ratio(cal.overlap_unexplained, c, float(best_iou), increasing=False)
        lr = lr_conf * lr_overlap
        lo = math.log(cal.missing_prior_odds[c]) + math.log(lr)
        rows.append({"annotation": -1, "kind": "missing_label", "log_odds": lo, "score": posterior(lo), "strength": q,
                     "tiebreak": (float(best_iou),), "_pred": int(j), "_why": {"conf": q, "iou": float(best_iou), "lr": lr,
                                               "precision": cal.precision(c, q)}})
    return rows


def fit_robust(evidence: Sequence[ImageEvidence], nc: int, prior: float, rounds: int = ROBUST_ROUNDS) -> Calibration:
    """``Calibration.fit``, then ``rounds`` times again with each annotation weighted by the probability that it
    is correct (1 - its row's score) and each candidate by the probability that it is not a missing label: the
    held-out labels hold the very errors being looked for (a shifted outline's low IoU would otherwise read as
    normal for its class)."""
    cal = Calibration.fit(evidence, nc, prior)
    for _ in range(rounds):
        lw = [np.array([1 - r["score"] for r in score_annotations(e, cal, prior)]) for e in evidence]
        cw = [np.array([1 - r["score"] for r in score_candidates(e, cal)]) for e in evidence]
        cal = Calibration.fit(evidence, nc, prior, lw, cw)
    return cal


def rank_key(row: dict[str, Any]) -> tuple:
    """Best first: log-odds, the kind's own evidence strength, kind order; image and annotation
    order only rows with identical evidence (the same case)."""
    return (-row["log_odds"], -row["strength"], row.get("tiebreak", ()), KINDS.index(row["kind"]),
            row.get("image", ""), row["annotation"], row.get("_pred", -1))


__all__ = ["KINDS", "Calibration", "Density", "ImageEvidence", "fit_robust", "image_evidence", "other_class",
           "posterior", "rank_key", "score_annotations", "score_candidates", "soft_overlap"]
