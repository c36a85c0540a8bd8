"""Shadow traffic: the candidate answers the same images as production, and nobody sees its answer.

``compare`` puts one image's two predictions side by side: instances per class of both, the mask
IoU of each matched pair (same class, greedy by IoU, pairs under ``match_iou`` stay unmatched),
and the damage-% difference of each matched vehicle. ``ShadowReport`` sums a window of those,
with the candidate's latency and errors, into the report the approver reads
(``damage registry approve``, the Prefect approval form): it is logged to MLflow on the
candidate's version (``damage.model_registry.serving.log_window``).

Example:
    >>> rep = ShadowReport("4", "3")
    >>> rep.add(compare(primary_pred, candidate_pred), latency_s=0.02)
    >>> rep.to_dict()["mask_iou_mean"]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

MATCH_IOU = 0.5  # a pair of same-class instances overlapping less is two unmatched instances


def mask_iou(a: Any, b: Any) -> float:
    """IoU of two instance masks (``BoxMask`` crops or full-frame arrays of one image)."""
    ea = a.extent if hasattr(a, "extent") else (0, 0, a.shape[1], a.shape[0])
    eb = b.extent if hasattr(b, "extent") else (0, 0, b.shape[1], b.shape[0])
    x0, y0, x1, y1 = min(ea[0], eb[0]), min(ea[1], eb[1]), max(ea[2], eb[2]), max(ea[3], eb[3])
    if x1 <= x0 or y1 <= y0:
        return 0.0
    ma, mb = np.asarray(a[y0:y1, x0:x1], bool), np.asarray(b[y0:y1, x0:x1], bool)
    union = int((ma | mb).sum())
    return float((ma & mb).sum()) / union if union else 0.0


def _match(a: list, b: list, match_iou: float) -> list[tuple[int, int, float]]:
    """Greedy same-class matching by mask IoU: ``(index in a, index in b, iou)``."""
    pairs = [(mask_iou(x.mask, y.mask), i, j) for i, x in enumerate(a) for j, y in enumerate(b) if x.cls == y.cls]
    used_a, used_b, out = set(), set(), []
    for iou, i, j in sorted(pairs, reverse=True):
        if iou < match_iou:
            break
        if i in used_a or j in used_b:
            continue
        used_a.add(i)
        used_b.add(j)
        out.append((i, j, iou))
    return out


def compare(primary: Any, candidate: Any, match_iou: float = MATCH_IOU) -> dict[str, Any]:
    """One image's predictions (``damage.tasks.serving.predictor.Prediction``) of production and the candidate."""
    counts_p: dict[str, int] = {}
    counts_c: dict[str, int] = {}
    for inst in primary.instances:
        counts_p[inst.name] = counts_p.get(inst.name, 0) + 1
    for inst in candidate.instances:
        counts_c[inst.name] = counts_c.get(inst.name, 0) + 1
    matched = _match(primary.instances, candidate.instances, match_iou)
    by_id_p = {v["id"]: v for v in primary.damage.vehicles}
    by_id_c = {v["id"]: v for v in candidate.damage.vehicles}
    damage_diff = []
    for i, j, _ in matched:
        vp, vc = by_id_p.get(primary.instances[i].id), by_id_c.get(candidate.instances[j].id)
        if vp is not None and vc is not None:  # a matched pair of vehicles
            damage_diff.append(round(float(vc["damage_percent"]) - float(vp["damage_percent"]), 3))
    return {"counts_primary": counts_p, "counts_candidate": counts_c, "iou": [round(m[2], 4) for m in matched],
            "unmatched_primary": len(primary.instances) - len(matched),
            "unmatched_candidate": len(candidate.instances) - len(matched), "damage_diff": damage_diff}


def _add_counts(total: dict[str, int], part: dict[str, int]) -> None:
    for k, v in part.items():
        total[k] = total.get(k, 0) + int(v)


@dataclass
class ShadowReport:
    """One window of shadow comparisons of ``candidate`` against ``primary`` (versions)."""

    candidate: str
    primary: str
    images: int = 0
    counts_primary: dict[str, int] = field(default_factory=dict)
    counts_candidate: dict[str, int] = field(default_factory=dict)
    ious: list[float] = field(default_factory=list)
    unmatched_primary: int = 0
    unmatched_candidate: int = 0
    damage_diff: list[float] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)
    primary_latency_s: list[float] = field(default_factory=list)
    errors: int = 0
    dropped: int = 0  # mirrored requests not run: the shadow already had shadow_max_inflight in flight

    def add(self, comparison: dict[str, Any], latency_s: float, primary_latency_s: float | None = None) -> None:
        """One compared image (``compare``), with the candidate's time for its request."""
        self.images += 1
        _add_counts(self.counts_primary, comparison["counts_primary"])
        _add_counts(self.counts_candidate, comparison["counts_candidate"])
        self.ious += comparison["iou"]
        self.unmatched_primary += comparison["unmatched_primary"]
        self.unmatched_candidate += comparison["unmatched_candidate"]
        self.damage_diff += comparison["damage_diff"]
        self.latency_s.append(float(latency_s))
        if primary_latency_s is not None:
            self.primary_latency_s.append(float(primary_latency_s))

    def merge(self, part: dict[str, Any]) -> None:
        """Add a replica's partial report (``to_dict(raw=True)`` of another ``ShadowReport``)."""
        self.images += part["images"]
        _add_counts(self.counts_primary, part["counts_primary"])
        _add_counts(self.counts_candidate, part["counts_candidate"])
        self.ious += part["ious"]
        self.unmatched_primary += part["unmatched_primary"]
        self.unmatched_candidate += part["unmatched_candidate"]
        self.damage_diff += part["damage_diff"]
        self.latency_s += part["latency_s"]
        self.primary_latency_s += part["primary_latency_s"]
        self.errors += part["errors"]
        self.dropped += part["dropped"]

    def to_dict(self, raw: bool = False) -> dict[str, Any]:
        """The report (``raw``: the lists too, for ``merge``)."""
        def q(v: list[float], p: float, scale: float = 1.0) -> float | None:
            return round(float(np.percentile(v, p)) * scale, 3) if v else None

        d = {"candidate": self.candidate, "primary": self.primary, "images": self.images,
             "counts_primary": dict(sorted(self.counts_primary.items())),
             "counts_candidate": dict(sorted(self.counts_candidate.items())),
             "matched": len(self.ious), "unmatched_primary": self.unmatched_primary,
             "unmatched_candidate": self.unmatched_candidate,
             "mask_iou_mean": round(float(np.mean(self.ious)), 4) if self.ious else None,
             "mask_iou_p10": q(self.ious, 10),
             "damage_diff_mean": round(float(np.mean(self.damage_diff)), 3) if self.damage_diff else None,
             "damage_diff_abs_mean": round(float(np.mean(np.abs(self.damage_diff))), 3) if self.damage_diff else None,
             "damage_diff_abs_max": round(float(np.max(np.abs(self.damage_diff))), 3) if self.damage_diff else None,
             "vehicles_compared": len(self.damage_diff),
             "latency_ms_p50": q(self.latency_s, 50, 1000), "latency_ms_p95": q(self.latency_s, 95, 1000),
             "primary_latency_ms_p50": q(self.primary_latency_s, 50, 1000),
             "primary_latency_ms_p95": q(self.primary_latency_s, 95, 1000),
             "errors": self.errors, "dropped": self.dropped}
        if raw:
            d.update(ious=list(self.ious), damage_diff=list(self.damage_diff), latency_s=list(self.latency_s),
                     primary_latency_s=list(self.primary_latency_s))
        return d


def report_lines(report: dict[str, Any]) -> list[str]:
    """The report as short lines for a terminal or a markdown form (approve, the Prefect form)."""
    if not report:
        return ["no shadow report (the version was never served as a shadow)"]
    classes = sorted(set(report.get("counts_primary", {})) | set(report.get("counts_candidate", {})))
    counts = ", ".join(f"{c} {report['counts_primary'].get(c, 0)}->{report['counts_candidate'].get(c, 0)}"
                       for c in classes) or "none"
    return [f"shadow of v{report.get('candidate')} beside production v{report.get('primary')}: "
            f"{report.get('images', 0)} images ({report.get('windows', 1)} window(s)), "
            f"{report.get('errors', 0)} errors, {report.get('dropped', 0)} dropped",
            f"instances per class (production->candidate): {counts}",
            f"matched instances {report.get('matched', 0)}, mask IoU mean {report.get('mask_iou_mean')} "
            f"(p10 {report.get('mask_iou_p10')}); unmatched {report.get('unmatched_primary', 0)} production / "
            f"{report.get('unmatched_candidate', 0)} candidate",
            f"damage % difference per vehicle: mean {report.get('damage_diff_mean')}, "
            f"mean abs {report.get('damage_diff_abs_mean')}, max abs {report.get('damage_diff_abs_max')} "
            f"({report.get('vehicles_compared', 0)} vehicles)",
            f"latency ms p50/p95: candidate {report.get('latency_ms_p50')}/{report.get('latency_ms_p95')}, "
            f"production {report.get('primary_latency_ms_p50')}/{report.get('primary_latency_ms_p95')}"]
