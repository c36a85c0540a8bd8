"""Data drift: tonight's dataset against the profile of an earlier, accepted one.

A **profile** is a small JSON description of a dataset that passed the gate: class counts and
shares, split sizes, and a quantile sketch (at most ``SKETCH_SIZE`` values) of every numeric
column: image width, height, brightness, blur, contrast, instances per image, and polygon area
(fraction of the image) per class. The gate writes it next to ``report.json`` and the nightly
flow logs it with the run (``data_profile/profile.json`` on the pipeline run).

The **comparison** builds one table, ``drift``, from the reference profile and tonight's: one
row per class (share of all annotations, presence in each profile) and one per numeric column
(two-sample Kolmogorov-Smirnov statistic; PSI over the reference deciles, reported only). The
Great Expectations suite ``expectations/suites/drift.json`` checks it; each row carries its
own limit: the configured minimum effect (``validate.drift_max_share_change``,
``validate.drift_max_ks``), raised to what sampling alone explains at ``validate.drift_alpha``
(two-proportion z bound; KS critical value ``c(alpha) * sqrt((n + m) / (n m))``). So a
resampled copy of the same distribution stays quiet on small datasets, and a real shift of
a large one is reported even if its sample would allow a smaller threshold.

Finding codes: ``class_share_drift``, ``distribution_drift``, ``class_added``,
``class_removed``; severity ``warning``, or ``error`` with ``validate.on_drift: fail``
(``validate.severity`` still overrides per code).

Example:
    >>> ref = load_profile(Path("profile.json"))
    >>> res = validate_dataset(Path("data/cardd"), ValidateConfig(), reference=ref)
    >>> [f for f in res.report["findings"] if f["code"] in DRIFT_CODES]
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from damage.tasks.core.errors import DatasetError

if TYPE_CHECKING:
    from damage.tasks.core.config import RayConfig, ValidateConfig
    from damage.tasks.validation.scan import Inventory, Layout

PROFILE_KIND = "damage.dataset_profile"
PROFILE_VERSION = 1
SKETCH_SIZE = 1000  # quantiles kept per numeric column (exact values when the column is smaller)
DRIFT_CODES = ("class_share_drift", "distribution_drift", "class_added", "class_removed")
IMAGE_COLUMNS = ("width", "height", "brightness", "blur", "contrast", "instances")
PROFILE_ARTIFACT = "data_profile/profile.json"  # where the nightly flow logs it on the pipeline run
ACCEPTED_TAG = "data_profile"  # pipeline-run tag: "accepted" once the gate let the dataset through
DRIFT_COLUMNS = ["entity", "file", "name", "column", "reference", "ref_count", "cur_count", "ref_share",
                 "cur_share", "share_change", "share_change_abs", "share_limit", "in_reference", "in_current",
                 "ks", "ks_limit", "psi", "ref_n", "cur_n", "ref_median", "cur_median"]


class ProfileError(DatasetError):
    """A reference profile that cannot be read or is not a dataset profile."""


# --------------------------------------------------------------------------------------------
# Profile
# --------------------------------------------------------------------------------------------


def sketch(values: np.ndarray, size: int = SKETCH_SIZE) -> dict[str, Any]:
    """Finite values as ``{"n": count, "q": sorted values or evenly spaced quantiles}``."""
    v = np.asarray(values, np.float64)
    v = np.sort(v[np.isfinite(v)])
    if len(v) > size:
        v = np.quantile(v, np.linspace(0, 1, size))
    return {"n": int(np.isfinite(np.asarray(values, np.float64)).sum()), "q": [round(float(x), 6) for x in v]}


def build_profile(layout: Layout, inv: Inventory, images: pd.DataFrame, annotations: pd.DataFrame,
                  fingerprint: str) -> dict[str, Any]:
    """The profile of a scanned dataset (the gate's per-image and per-annotation tables)."""
    names = list(layout.names)
    ok_img = images[images["decodes"]]
    ann = annotations[annotations["parse_ok"]]
    cid = ann["class_id"]
    ann = ann[(cid >= 0) & (cid < len(names)) & (cid == np.floor(cid))]
    counts = np.bincount(ann["class_id"].astype(int).to_numpy(), minlength=len(names))[:len(names)]
    total = int(counts.sum())
    columns = {c: sketch(ok_img[c].to_numpy()) for c in IMAGE_COLUMNS}
    for i, name in enumerate(names):
        columns[f"area/{name}"] = sketch(ann.loc[ann["class_id"] == i, "area"].to_numpy())
    return {
        "kind": PROFILE_KIND,
        "version": PROFILE_VERSION,
        "dataset": str(layout.root),
        "fingerprint": fingerprint,
        "images": int(len(images)),
        "annotations": total,
        "splits": {k: int(v) for k, v in inv.split_images.items()},
        "classes": names,
        "class_counts": {n: int(c) for n, c in zip(names, counts, strict=True)},
        "class_shares": {n: (float(c) / total if total else 0.0) for n, c in zip(names, counts, strict=True)},
        "columns": columns,
    }


def profile_dataset(data: Path, cfg: ValidateConfig, ray: RayConfig | None = None) -> dict[str, Any]:
    """Scan a dataset (no expectation suites) and return its profile (``--against DATASET``); ``ray``: scan
    on Ray workers (``scanner.Scanner``), the same profile.

    Raises:
        DatasetError: not a dataset.
    """
    from damage.tasks.data.fingerprint import dataset_fingerprint
    from damage.tasks.validation.scan import enumerate_samples, resolve_layout
    from damage.tasks.validation.scanner import Scanner
    from damage.tasks.validation.tables import TableBuilder

    layout = resolve_layout(data)
    inv = enumerate_samples(layout)
    builder = TableBuilder(inv.samples)
    with Scanner(inv.samples, cfg.max_pixels, cfg.workers, cfg.chunk_size, ray=ray) as scanner:
        for idx, row, anns in scanner.results():
            builder.add(idx, row, anns)
    return build_profile(layout, inv, builder.images_frame(), builder.annotations_frame(),
                         dataset_fingerprint(layout.root))


def check_profile(obj: Any, source: str) -> dict[str, Any]:
    """``obj`` if it is a dataset profile this code can compare with.

    Raises:
        ProfileError: naming ``source`` and what is wrong.
    """
    if not isinstance(obj, dict) or obj.get("kind") != PROFILE_KIND:
        raise ProfileError(f"{source}: not a dataset profile (expected \"kind\": \"{PROFILE_KIND}\")")
    if obj.get("version") != PROFILE_VERSION:
        raise ProfileError(f"{source}: profile version {obj.get('version')!r}, this code reads {PROFILE_VERSION}")
    for key in ("classes", "class_counts", "columns", "annotations"):
        if key not in obj:
            raise ProfileError(f"{source}: profile has no '{key}'")
    return obj


def load_profile(path: Path) -> dict[str, Any]:
    """Read a profile JSON written by the gate (``profile.json``).

    Raises:
        ProfileError: missing file, not JSON, or not a profile.
    """
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"{path}: profile file not found")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProfileError(f"{path}: not a readable JSON profile: {e}") from None
    return check_profile(obj, str(path))


def reference_profile(ref: Path, cfg: ValidateConfig, ray: RayConfig | None = None) -> dict[str, Any]:
    """A profile JSON file as is, or the profile of a dataset folder / data.yaml (scanned on Ray with ``ray``)."""
    ref = Path(ref)
    if ref.is_file() and ref.suffix.lower() == ".json":
        return load_profile(ref)
    if not ref.exists():
        raise ProfileError(f"{ref}: reference not found (a dataset folder, data.yaml or profile JSON)")
    return profile_dataset(ref, cfg, ray)


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: max distance of the empirical CDFs.

    >>> ks_statistic(np.array([1.0, 2, 3]), np.array([1.0, 2, 3]))
    0.0
    >>> ks_statistic(np.array([0.0, 1]), np.array([5.0, 6]))
    1.0
    """
    a, b = np.sort(a), np.sort(b)
    if not len(a) or not len(b):
        return math.nan
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def ks_critical(n: int, m: int, alpha: float) -> float:
    """KS distance that two samples of the same distribution exceed with probability ``alpha``."""
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def psi(ref: np.ndarray, cur: np.ndarray, bins: int = 10) -> float:
    """Population stability index over the reference's quantile bins (0 = same, > 0.25 = large)."""
    if not len(ref) or not len(cur):
        return math.nan
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1))[1:-1])
    r = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=len(edges) + 1) / len(ref)
    c = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=len(edges) + 1) / len(cur)
    r, c = np.clip(r, 1e-4, None), np.clip(c, 1e-4, None)
    return float(((c - r) * np.log(c / r)).sum())


def _z(alpha: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(1 - alpha / 2))


def drift_table(ref: dict[str, Any], cur: dict[str, Any], cfg: ValidateConfig, file: str = "data.yaml") -> pd.DataFrame:
    """The ``drift`` table the drift suite checks (see the module docstring).

    Args:
        ref: reference profile. cur: tonight's profile. cfg: thresholds (``drift_*``).
        file: what findings name as their file (tonight's data.yaml, relative to the root).
    """
    label = f"{Path(str(ref.get('dataset', '?'))).name} {str(ref.get('fingerprint', ''))[:12]}".strip()
    rows: list[dict[str, Any]] = []
    n_ref, n_cur = int(ref["annotations"]), int(cur["annotations"])
    z = _z(cfg.drift_alpha)
    names = list(dict.fromkeys([*ref["classes"], *cur["classes"]]))
    for name in names:
        rc, cc = int(ref["class_counts"].get(name, 0)), int(cur["class_counts"].get(name, 0))
        if not rc and not cc:
            continue
        row = {"entity": "class", "file": file, "name": name, "reference": label, "ref_count": rc,
               "cur_count": cc, "in_reference": rc > 0, "in_current": cc > 0}
        if rc and cc:
            rs, cs = rc / n_ref, cc / n_cur
            pooled = (rc + cc) / (n_ref + n_cur)
            se = math.sqrt(pooled * (1 - pooled) * (1 / n_ref + 1 / n_cur))
            row.update(ref_share=rs, cur_share=cs, share_change=cs - rs, share_change_abs=abs(cs - rs),
                       share_limit=max(cfg.drift_max_share_change, z * se))
        rows.append(row)
    for col in sorted(set(ref["columns"]) & set(cur["columns"])):
        # KS on the sketches (quantiles of equal weight); the sampling limit uses the real counts.
        a, b = np.asarray(ref["columns"][col]["q"], np.float64), np.asarray(cur["columns"][col]["q"], np.float64)
        n, m = int(ref["columns"][col]["n"]), int(cur["columns"][col]["n"])
        if n < cfg.drift_min_samples or m < cfg.drift_min_samples:
            continue  # too few values to say anything (e.g. the area of a rare class)
        ks = ks_statistic(a, b)
        rows.append({"entity": "column", "file": file, "column": col, "reference": label, "ks": ks,
                     "ks_limit": max(cfg.drift_max_ks, ks_critical(n, m, cfg.drift_alpha)), "psi": psi(a, b),
                     "ref_n": n, "cur_n": m, "ref_median": float(np.median(a)), "cur_median": float(np.median(b))})
    return pd.DataFrame(rows, columns=DRIFT_COLUMNS)


def drift_parameters(cfg: ValidateConfig) -> dict[str, Any]:
    """Values the drift suite's detail templates may name."""
    return {"drift_max_share_change": cfg.drift_max_share_change, "drift_max_ks": cfg.drift_max_ks,
            "drift_alpha": cfg.drift_alpha}


def reference_summary(ref: dict[str, Any], source: str) -> dict[str, Any]:
    """What report.json says about the reference it was compared with."""
    return {"source": source, "dataset": ref.get("dataset"), "fingerprint": ref.get("fingerprint"),
            "images": ref.get("images"), "annotations": ref.get("annotations")}


# --------------------------------------------------------------------------------------------
# Where the nightly reference comes from
# --------------------------------------------------------------------------------------------


def _download_profile(c: Any, run_id: str) -> dict[str, Any] | None:
    import tempfile

    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = c.download_artifacts(run_id, PROFILE_ARTIFACT, tmp)
        except (MlflowException, OSError):
            return None  # the run logged no profile (older code, or the gate was off)
        return load_profile(Path(local))


def find_reference(cfg: ValidateConfig, tracking_uri: str, experiment_id: str, model_name: str,
                   current_run_id: str = "",
                   production_run: Callable[[], tuple[str, str] | None] | None = None,
                   ) -> tuple[dict[str, Any] | None, str]:
    """The profile tonight's gate compares with, and where it came from.

    ``validate.drift_reference``: ``none`` (no drift check), a profile JSON or dataset path,
    or ``auto``: the profile logged by the pipeline run behind the ``production`` version of
    ``model_name``, else the most recent pipeline run whose dataset the gate accepted.

    Args:
        production_run: returns ``(version, run_id)`` of ``model_name@production``, or None. It is the
            registry's to answer (``damage.model_registry.reference``), so the data gate stays below the registry;
            called only for ``auto``.

    Returns:
        (profile, description) or (None, reason) when there is nothing to compare with.
    """
    if not cfg.enabled or cfg.drift_reference == "none":
        return None, "drift check off"
    if cfg.drift_reference != "auto":
        return reference_profile(Path(cfg.drift_reference).expanduser(), cfg), cfg.drift_reference
    from damage.tasks.core import tracking

    c = tracking.client(tracking_uri)
    prod = production_run() if production_run is not None else None
    if prod is not None:  # production_run has checked the alias against the approval record
        profile = _download_profile(c, prod[1])
        if profile is not None:
            return profile, f"{model_name}@production (version {prod[0]}, run {prod[1]})"
    runs = c.search_runs([experiment_id], filter_string=f"tags.{ACCEPTED_TAG} = 'accepted'",
                         order_by=["attributes.start_time DESC"], max_results=20)
    for r in runs:
        if r.info.run_id == current_run_id:
            continue
        profile = _download_profile(c, r.info.run_id)
        if profile is not None:
            return profile, f"last accepted dataset (run {r.info.run_id})"
    return None, "no production version or accepted dataset with a profile yet"
