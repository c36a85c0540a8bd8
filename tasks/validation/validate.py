"""The data gate: validate a YOLO-seg dataset before any training run.

``validate_dataset`` streams over the dataset once (``damage.tasks.validation.scan``, both cores),
builds the per-image, per-annotation and dataset tables (``damage.tasks.validation.tables``), checks them
with the Great Expectations suites under ``expectations/suites`` (``damage.expectations.gx``), and
writes ``report.json`` (schema below), optional HTML (GE Data Docs + a self-contained summary
page) and an optional cleaned copy with ``quarantine.json``.

report.json::

    {"passed": bool, "dataset": str, "fingerprint": str,
     "summary": {"images": int, "annotations": int, "errors": int, "warnings": int,
                 "by_code": {code: count}},
     "findings": [{"code": str, "severity": "error"|"warning", "file": str, "detail": str}],
     "drift": {"reference": {"source", "dataset", "fingerprint", "images", "annotations"},
               "table": [row of the drift table]}}   # only when a reference profile was given

Beside report.json goes ``profile.json``, the dataset's profile (``damage.tasks.validation.drift``).

Example:
    >>> from damage.tasks.core.config import ValidateConfig
    >>> result = validate_dataset(Path("data/cardd"), ValidateConfig(), report_path=Path("report.json"))
    >>> result.passed, result.summary_line()
"""

from __future__ import annotations

import difflib
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from damage.tasks.core.atomic import atomic_write_json
from damage.tasks.core.config import ConfigError, RayConfig, ValidateConfig
from damage.tasks.core.errors import DatasetError

# Finding codes and their default severity. "error" blocks training (validate.severity overrides).
DEFAULT_SEVERITY: dict[str, str] = {
    "corrupt_image": "error",
    "unreadable_label": "error",
    "label_out_of_range": "error",
    "unknown_class": "error",
    "degenerate_polygon": "error",
    "orphan_label": "error",
    "split_leakage": "error",
    "empty_split": "error",
    "symlink_outside": "error",
    "missing_label": "warning",
    "duplicate_image": "warning",
    "near_duplicate": "warning",
    "blurry": "warning",
    "too_dark": "warning",
    "too_small": "warning",
    "class_imbalance": "warning",
    # drift against a reference profile (tasks/validation/drift.py); validate.on_drift=fail makes them errors
    "class_share_drift": "warning",
    "distribution_drift": "warning",
    "class_added": "warning",
    "class_removed": "warning",
}


@dataclass
class ValidationResult:
    """What the data gate found and wrote.

    Attributes:
        passed: no error-level finding.
        report: the report.json content (see the module docstring for the schema).
        report_path: where report.json was written (None if not requested).
        html_path: the self-contained summary page (``<html_dir>/index.html``), if requested.
        docs_path: the Great Expectations Data Docs index, if HTML was requested.
        clean_data_yaml: data.yaml of the cleaned copy, if ``clean_out`` was given.
        quarantine_path: quarantine.json of the cleaned copy.
        fingerprint: content fingerprint of the validated dataset.
        profile: the dataset's profile (``damage.tasks.validation.drift``), the reference of later drift checks.
        profile_path: where profile.json was written (beside report.json), if a report was written.
        timings: seconds per phase (scan, checks, outputs).
    """

    passed: bool
    report: dict[str, Any]
    report_path: Path | None = None
    html_path: Path | None = None
    docs_path: Path | None = None
    clean_data_yaml: Path | None = None
    quarantine_path: Path | None = None
    fingerprint: str = ""
    profile: dict[str, Any] = field(default_factory=dict)
    profile_path: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def drift_errors(self) -> list[dict[str, str]]:
        """Error-level drift findings (``validate.on_drift: fail``): a cleaned copy cannot fix these."""
        from damage.tasks.validation.drift import DRIFT_CODES

        return [f for f in self.report["findings"] if f["code"] in DRIFT_CODES and f["severity"] == "error"]

    @property
    def by_code(self) -> dict[str, int]:
        return self.report["summary"]["by_code"]

    def summary_line(self) -> str:
        """One line naming the verdict, counts per code (with severity) and where the report is."""
        s = self.report["summary"]
        sev = {f["code"]: f["severity"] for f in self.report["findings"]}
        parts = ", ".join(f"{c}={n} ({sev.get(c, '?')})" for c, n in s["by_code"].items())
        verdict = "passed" if self.passed else "FAILED"
        where = f"; report: {self.report_path}" if self.report_path else ""
        if self.html_path:
            where += f"; html: {self.html_path}"
        return (f"data gate {verdict}: {s['images']} images, {s['annotations']} annotations, "
                f"{s['errors']} errors, {s['warnings']} warnings" + (f" [{parts}]" if parts else "") + where)


def severities(cfg: ValidateConfig) -> dict[str, str]:
    """Default severities with ``cfg.severity`` applied; unknown codes are a config error."""
    from damage.tasks.validation.drift import DRIFT_CODES

    out = dict(DEFAULT_SEVERITY)
    if cfg.on_drift == "fail":
        out.update({code: "error" for code in DRIFT_CODES})
    for code, sev in cfg.severity.items():
        if code not in out:
            close = difflib.get_close_matches(code, list(out), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"validate.severity: unknown finding code '{code}'{hint}")
        out[code] = sev
    return out


def suite_parameters(cfg: ValidateConfig, num_classes: int) -> dict[str, Any]:
    """Values for the suites' ``$PARAMETER`` placeholders (also usable in detail templates)."""
    return {
        "min_width": cfg.min_width,
        "min_height": cfg.min_height,
        "blur_threshold": cfg.blur_threshold,
        "dark_threshold": cfg.dark_threshold,
        "imbalance_ratio": cfg.imbalance_ratio,
        "near_duplicate_distance": cfg.near_duplicate_distance,
        "min_polygon_area": cfg.min_polygon_area,
        "class_ids": list(range(num_classes)),
        "num_classes": num_classes,
        "max_class_id": num_classes - 1,
    }


def _sort_key(f: dict[str, str]) -> tuple:
    return (f["severity"] != "error", f["code"], f["file"], f["detail"])


def build_report(dataset: str, fingerprint: str, images: int, annotations: int,
                 findings: list[dict[str, str]]) -> dict[str, Any]:
    """The report.json dict (exact schema) from severity-tagged findings."""
    findings = sorted(findings, key=_sort_key)
    errors = sum(f["severity"] == "error" for f in findings)
    by_code = dict(sorted(Counter(f["code"] for f in findings).items()))
    return {
        "passed": errors == 0,
        "dataset": dataset,
        "fingerprint": fingerprint,
        "summary": {"images": images, "annotations": annotations, "errors": errors,
                    "warnings": len(findings) - errors, "by_code": by_code},
        "findings": [{"code": f["code"], "severity": f["severity"], "file": f["file"], "detail": f["detail"]}
                     for f in findings],
    }


def _json_rows(frame: Any) -> list[dict[str, Any]]:
    """DataFrame rows as JSON-ready dicts, nulls left out."""
    out = []
    for row in frame.to_dict("records"):
        clean = {}
        for k, v in row.items():
            v = v.item() if hasattr(v, "item") else v
            if v is None or (isinstance(v, float) and v != v):
                continue
            clean[k] = round(v, 6) if isinstance(v, float) else v
        out.append(clean)
    return out


def _check_outputs(root: Path, outs: list[Path | None], clean_out: Path | None) -> None:
    """Outputs must not land inside the dataset (the input is never modified), and the cleaned
    copy, which replaces its folder, must not contain the dataset either."""
    root_real = Path(os.path.realpath(root))
    for out in [*outs, clean_out]:
        if out is None:
            continue
        real = Path(os.path.realpath(out))
        if real == root_real or root_real in real.parents:
            raise DatasetError(f"{out}: output inside the dataset {root}; the input must stay untouched")
    if clean_out is not None and Path(os.path.realpath(clean_out)) in root_real.parents:
        raise DatasetError(f"{clean_out}: the cleaned copy's folder contains the dataset {root}")


def validate_dataset(data: Path, cfg: ValidateConfig, report_path: Path | None = None,
                     html_dir: Path | None = None, clean_out: Path | None = None,
                     reference: dict[str, Any] | None = None, reference_source: str = "",
                     fingerprint: str | None = None, ray: RayConfig | None = None) -> ValidationResult:
    """Run the data gate on a YOLO-seg dataset.

    Args:
        data: dataset root or its data.yaml (``images/{split}`` + ``labels/{split}``, or
            ``{split}/images`` + ``{split}/labels`` as data.yaml points).
        cfg: the ``validate:`` config section (thresholds, severities, workers).
        report_path: where to write report.json (atomically); None = do not write.
        html_dir: where to write ``index.html`` (self-contained summary) and ``data_docs/``
            (Great Expectations Data Docs); None = no HTML.
        clean_out: where to write a cleaned copy (samples with errors and the second member
            of every duplicate group left out) plus ``quarantine.json``; None = no copy.
        fingerprint: the dataset's content fingerprint when the caller already has it (the
            nightly flow hashes the dataset once, in its skip check); None = computed here.
        reference: a dataset profile (``damage.tasks.validation.drift``) to check drift against; the
            report then has a ``drift`` section (``reference`` + the compared ``table``).
        reference_source: where the reference came from (shown in the report).
        ray: read and measure the images (the profile's figures) on Ray workers, one task per
            ``chunk_size`` images (Ray connected by the caller); None = ``cfg.workers`` local processes.
            The same report and profile either way.

    Returns:
        ValidationResult with ``passed``, the report dict and the paths written.

    Raises:
        DatasetError: no such path, not a dataset (no data.yaml, no names, no splits), or an
            output location inside the dataset.
        ConfigError: an unknown finding code in ``cfg.severity``.
    """
    from damage.tasks.data.fingerprint import dataset_fingerprint
    from damage.tasks.validation.drift import build_profile, drift_parameters, drift_table, reference_summary
    from damage.tasks.validation.scan import enumerate_samples, resolve_layout
    from damage.tasks.validation.scanner import Scanner
    from damage.tasks.validation.tables import TableBuilder, dataset_frame

    t0 = time.perf_counter()
    layout = resolve_layout(data)
    sev = severities(cfg)
    _check_outputs(layout.root, [Path(report_path).parent if report_path else None, html_dir], clean_out)
    inv = enumerate_samples(layout)
    builder = TableBuilder(inv.samples)
    with Scanner(inv.samples, cfg.max_pixels, cfg.workers, cfg.chunk_size, ray=ray) as scanner:
        # Import Great Expectations (seconds) while the workers read and decode.
        from damage.expectations import DRIFT_SUITE, SUITE_NAMES
        from damage.expectations.gx import GxRunner, findings_from_results

        runner = GxRunner(Path(html_dir) / "data_docs" if html_dir else None,
                          (*SUITE_NAMES, DRIFT_SUITE) if reference is not None else SUITE_NAMES)
        from damage.tasks.core.progress import track

        # One pass: every sample's row and annotations are added exactly once.
        with track("validate-scan", "data scan: images", len(inv.samples), artifact_every=cfg.chunk_size) as bar:
            for idx, row, anns in scanner.results():
                builder.add(idx, row, anns)
                bar.advance()
    t_scan = time.perf_counter()

    images = builder.images_frame()
    annotations = builder.annotations_frame()
    frames = {"images": images, "annotations": annotations,
              "dataset": dataset_frame(layout, inv, images, annotations, cfg.near_duplicate_distance,
                                       builder.thumb)}
    params = suite_parameters(cfg, len(layout.names))
    fingerprint = fingerprint or dataset_fingerprint(layout.root)
    profile = build_profile(layout, inv, images, annotations, fingerprint)
    if reference is not None:
        frames["drift"] = drift_table(reference, profile, cfg, layout.rel(layout.yaml_path))
        params.update(drift_parameters(cfg))
    results = runner.validate(frames, params)
    findings = [dict(f, severity=sev[f["code"]]) for f in findings_from_results(results, frames, params)]
    report = build_report(str(layout.root), fingerprint, len(inv.samples) + sum(
        1 for link in inv.outside_links if link["kind"] == "image"), int(builder.annotation_count), findings)
    if reference is not None:
        report["drift"] = {"reference": reference_summary(reference, reference_source),
                           "table": _json_rows(frames["drift"])}
    t_checks = time.perf_counter()

    result = ValidationResult(passed=report["passed"], report=report, fingerprint=fingerprint, profile=profile)
    if report_path is not None:
        result.report_path = atomic_write_json(Path(report_path), report)
        result.profile_path = atomic_write_json(Path(report_path).parent / "profile.json", profile)
    if html_dir is not None:
        from damage.tasks.validation.html import write_summary_page

        result.docs_path = runner.build_docs()
        result.html_path = write_summary_page(Path(html_dir), report, layout, images, frames["dataset"],
                                              docs_index=result.docs_path, max_pixels=cfg.max_pixels)
    if clean_out is not None:
        from damage.tasks.validation.report import write_clean_copy

        result.clean_data_yaml, result.quarantine_path = write_clean_copy(
            layout, inv, report, Path(clean_out))
    result.timings = {"scan": round(t_scan - t0, 3), "checks": round(t_checks - t_scan, 3),
                      "outputs": round(time.perf_counter() - t_checks, 3)}
    return result


def __getattr__(name: str):
    """``validate_task``: the Prefect task wrapper, created on first use so that importing this
    module (the CLI, tests) does not import Prefect."""
    if name == "validate_task":
        from damage.tasks.core.prefect_tasks import as_task

        wrapped = as_task(validate_dataset, "validate-data", task_run_name="validate-data")
        globals()["validate_task"] = wrapped
        return wrapped
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
