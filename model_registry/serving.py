"""What the scoring server needs of the registry: which version an alias names, its files, its
training-data profile, and where its serving reports go.

``damage.tasks.serving`` never imports this package: ``flows/commands/serve.py`` hands these functions
to the Ray Serve application (``damage.tasks.serving.ray_serve.build_app``) as plain callables.

Example:
    >>> version, local_dir = resolve("models:/damage-seg@production", cache_dir=Path(".state/serving"))
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from damage.model_registry.errors import RegistryError
from damage.model_registry.registry import alias_version, get_client

log = logging.getLogger(__name__)

_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")
SHADOW_TAG = "shadow.report"  # version tag: the shadow report summed over every window so far (JSON)
SHADOW_RUN_TAG = "shadow.run_id"  # version tag: the MLflow run holding one report per window
SERVING_RUN_TAG = "serving.run_id"  # version tag: the run holding the monitoring windows of its service


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` as (name, alias, version).

    Raises:
        RegistryError: any other form (a serving server follows registry URIs only).
    """
    m = _URI.match(uri.strip())
    if not m:
        raise RegistryError(f"model URI '{uri}': expected models:/<name>@<alias> or models:/<name>/<version>")
    return m["name"], m["alias"], m["version"]


def resolve(model_uri: str, cache_dir: str | os.PathLike, tracking_uri: str | None = None,
            notify=None) -> tuple[str, Path]:
    """The version ``model_uri`` names now, and its pyfunc folder on this machine.

    The one place serving fetches a version's files, into ``cache_dir/<name>/<version>`` (a temp folder first,
    then renamed, so a half download is never loaded). Only the ONNX file comes from the registry; the pyfunc
    around it (MLmodel and the predictor code) is written from this installed package, never taken from the
    artifact store (issue 31). ``production`` is the approved, hash-verified copy
    (``frozen.fetch_approved``, which also checks the alias against the approval record and notifies through
    ``notify`` on drift); a numbered version that was approved likewise. Other aliases (the ``staging``
    candidate of a canary or shadow) are downloaded as registered: they answer only as the operator's
    configured canary or shadow.

    Raises:
        RegistryError: a malformed URI, an alias that names no version, a failed download.
        ApprovalMismatch: production (or an approved version) whose files differ from what was approved.
    """
    from damage.model_registry.frozen import approved_file, check_production, fetch_approved, record_for
    from damage.model_registry.registry import PRODUCTION
    from damage.tasks.serving.pyfunc import save_pyfunc

    name, alias, version = parse_model_uri(model_uri)
    c = get_client(tracking_uri)
    if alias is not None:
        version = alias_version(c, name, alias)
        if version is None:
            raise RegistryError(f"{model_uri}: the alias '{alias}' names no version of '{name}'")
    # production: the alias is checked against the approval record on every call (cheap: metadata only; a
    # drift raises ApprovalMismatch, so a follower keeps what it serves); files are verified when fetched, and
    # the verified build is cached under the record's id
    record = check_production(c, name, notify) if alias == PRODUCTION else \
        record_for(c, name, str(version)) if alias is None else None
    approved = record is not None
    root = Path(cache_dir).resolve()
    dst = (root / name / (f"{version}-approved-{record}" if approved else str(version))).resolve()
    if not dst.is_relative_to(root) or name in (".", ".."):
        raise RegistryError(f"model URI '{model_uri}': the name '{name}' would leave the model cache {root}")
    if (dst / "MLmodel").is_file():
        return str(version), dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=dst.parent))
    try:
        if approved:  # verified when fetched: a swapped file in the store is refused, naming it
            onnx = approved_file(fetch_approved(c, name, PRODUCTION if alias == PRODUCTION else str(version),
                                                tmp / "files", notify), ".onnx")
        else:  # the candidate's registered files, of which only its one ONNX file is used
            import mlflow.artifacts

            source = c.get_model_version_download_uri(name, str(version))
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp / "files"),
                                                             tracking_uri=c.tracking_uri))
            onnx = approved_file(local, ".onnx")
        built = save_pyfunc(onnx, tmp / "pyfunc")
        try:  # never over an existing folder: another replica may be loading it
            os.replace(built, dst)
        except OSError:
            if not (dst / "MLmodel").is_file():  # another replica renamed its copy first: keep that one
                raise
    except Exception as e:
        if isinstance(e, RegistryError):  # ApprovalMismatch is one: it names the file
            raise
        raise RegistryError(f"{model_uri}: cannot prepare version {version}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(version), dst


def training_profile(model_name: str, version: str, tracking_uri: str | None = None) -> dict[str, Any] | None:
    """The data gate's profile of the dataset ``version`` was trained on (None when none was logged).

    It is ``data_profile/profile.json`` of the pipeline run behind the version (its
    ``source_run_id`` tag), as the nightly drift check uses.
    """
    from damage.tasks.validation.drift import PROFILE_ARTIFACT, load_profile

    c = get_client(tracking_uri)
    mv = c.get_model_version(model_name, str(version))
    run_id = (mv.tags or {}).get("source_run_id") or mv.run_id
    if not run_id:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = c.download_artifacts(run_id, PROFILE_ARTIFACT, tmp)
        except Exception:
            return None  # the run logged no profile (gate off, or older code)
        return load_profile(Path(local))


def _report_run(c: Any, model_name: str, version: str, kind: str, experiment: str) -> str:
    """The run holding ``kind`` reports of a version (created on first use, named on the version)."""
    from damage.tasks.core import tracking

    tag = SHADOW_RUN_TAG if kind == "shadow" else SERVING_RUN_TAG
    mv = c.get_model_version(model_name, version)
    run_id = (mv.tags or {}).get(tag)
    if run_id:
        return run_id
    exp = tracking.ensure_experiment(c, experiment)
    run_id = tracking.start_run(c, exp, f"{'shadow' if kind == 'shadow' else 'serving'}-{model_name}-v{version}",
                                tags={"damage.kind": f"serving-{kind}", "damage.model": model_name,
                                      "damage.model_version": str(version)})
    c.set_model_version_tag(model_name, version, tag, run_id)
    return run_id


def _metrics(report: dict[str, Any], kind: str) -> dict[str, float]:
    keys = (("mask_iou_mean", "damage_diff_abs_mean", "damage_diff_abs_max", "latency_ms_p95", "errors", "dropped",
             "images", "matched") if kind == "shadow" else
            ("requests", "images", "error_rate", "latency_ms_p50", "latency_ms_p95"))
    out = {f"{kind}/{k}": float(report[k]) for k in keys if isinstance(report.get(k), int | float)}
    if kind == "window":
        out["window/drift_findings"] = float(len(report.get("drift", {}).get("findings", [])))
        for col, q in report.get("input", {}).items():
            if q.get("median") is not None:
                out[f"window/input_median/{col}"] = float(q["median"])
        for cls, n in report.get("predictions", {}).get("classes", {}).items():
            out[f"window/instances/{cls}"] = float(n)
    return out


def log_window(model_name: str, experiment: str, tracking_uri: str | None, kind: str, version: str, index: int,
               report: dict[str, Any]) -> None:
    """Log one closed monitoring window (``kind=window``) or shadow report (``kind=shadow``) of ``version``.

    Metrics go to the version's serving (or shadow) run with ``step = index``, the whole report as
    ``<kind>/<index>.json``; a shadow report is also summed into the version tag ``shadow.report``
    that ``damage registry approve`` and the Prefect approval form show.
    """
    from damage.tasks.core import tracking

    c = get_client(tracking_uri)
    run_id = _report_run(c, model_name, str(version), kind, experiment)
    tracking.log_metrics(c, run_id, _metrics(report, kind), step=int(index))
    # a restarted server counts its windows from 1 again: the time keeps their files apart
    tracking.log_dict(c, run_id, report, f"{kind}/{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{int(index):05d}.json")
    if kind == "shadow":
        # the report sums every window of this service so far ("total"); the tag is what the approver reads
        summary = {**(report.get("total") or report), "run_id": run_id}
        c.set_model_version_tag(model_name, str(version), SHADOW_TAG, json.dumps(summary, separators=(",", ":")))


def shadow_report(model_name: str, version: str, tracking_uri: str | None = None) -> dict[str, Any] | None:
    """The version's shadow report so far (the ``shadow.report`` tag), None when it never ran as a shadow."""
    c = get_client(tracking_uri)
    try:
        raw = (c.get_model_version(model_name, str(version)).tags or {}).get(SHADOW_TAG)
    except Exception as e:
        log.warning("shadow report of %s v%s not read: %s", model_name, version, e)
        return None
    if not raw:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return None


EVIDENCE_METRICS = ("mask/mAP50", "mask/mAP50-95", "box/mAP50", "box/mAP50-95", "damage_pct_mae", "latency_ms")


def evidence_lines(model_name: str, version: str, tracking_uri: str | None = None) -> list[str]:
    """What an approver reads before moving ``production``: offline metrics beside the shadow report.

    Offline: the version's evaluation metrics on the validation split (its ``metric.*`` tags).
    Production evidence: its shadow report so far (``shadow_report``), or a line saying it has none.
    """
    from damage.tasks.serving.shadow import report_lines

    c = get_client(tracking_uri)
    try:
        tags = c.get_model_version(model_name, str(version)).tags or {}
    except Exception as e:
        return [f"no evidence for {model_name} v{version}: {e}"]
    shown = [f"{k} {float(tags['metric.' + k]):.4g}" for k in EVIDENCE_METRICS if f"metric.{k}" in tags]
    lines = [f"offline (validation split): {', '.join(shown) or 'no metrics recorded'}"]
    return lines + report_lines(shadow_report(model_name, str(version), tracking_uri) or {})
