"""The nightly flow's data step: structure check, then the Great Expectations gate.

The report and HTML are logged to MLflow whatever the outcome. On error-level findings the
step either fails (``validate.on_error: fail``; training never starts) or hands the cleaned
copy on (``on_error: clean``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from damage.tasks.core.config import RayConfig, ValidateConfig
from damage.tasks.core.errors import GateFailed

log = logging.getLogger(__name__)

@dataclass
class DataCheck:
    """Which dataset training should use, and why."""

    data_yaml: Path
    fingerprint: str
    passed: bool
    cleaned: bool = False
    images: dict[str, int] = field(default_factory=dict)
    instances: dict[str, int] = field(default_factory=dict)
    report_path: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def check_data_step(data_yaml: Path, cfg: ValidateConfig, report_dir: Path, parent_run_id: str,
                    reference: tuple[dict[str, Any] | None, str] | None = None,
                    fingerprint: str | None = None, ray: RayConfig | None = None,
                    state_dir: Path | None = None) -> DataCheck:
    """Structure check + GE validation inside a nested MLflow run "validate".

    ``reference`` is ``(profile, where it came from)`` (``damage.tasks.validation.drift.find_reference``):
    tonight's data is also checked for drift against it. The dataset's own profile is logged to
    the nested run and to the pipeline run (``data_profile/profile.json``); once the gate lets
    the data through, the pipeline run is tagged ``data_profile=accepted`` so that later nights
    can compare with it.

    ``fingerprint`` is the dataset's content fingerprint when the flow already computed it (the
    skip check does, so a nightly run hashes the dataset once); None = computed here.

    ``ray`` (``ray.enabled``): the images are read and measured on Ray workers (joined or started here,
    embedded Ray's files under ``state_dir``); the report and profile are the same.

    Raises:
        DatasetError: the dataset is structurally broken (missing split, bad data.yaml...).
        GateFailed: error-level findings and ``on_error == "fail"``, or error-level drift
            (``on_drift == "fail"``; a cleaned copy cannot fix drift); the message names the
            counts per code and where the report is.
    """
    from damage.tasks.core import tracking
    from damage.tasks.data.dataset import check_structure, load_data_yaml
    from damage.tasks.data.fingerprint import dataset_fingerprint
    from damage.tasks.validation.drift import ACCEPTED_TAG, PROFILE_ARTIFACT

    # With the gate on, only the data.yaml must load here: label problems become findings in
    # the report (logged either way) instead of an exception before any report exists.
    info = load_data_yaml(data_yaml) if cfg.enabled else check_structure(data_yaml)
    with tracking.step_run(parent_run_id, "validate") as (c, run_id):
        tracking.log_metrics(c, run_id, {f"images/{k}": v for k, v in info.images.items()})
        tracking.log_metrics(c, run_id, {f"instances/{k}": v for k, v in info.instances.items()})
        if not cfg.enabled:
            fp = fingerprint or dataset_fingerprint(info.root)
            tracking.set_tags(c, run_id, {"dataset_fingerprint": fp, "validation": "skipped"})
            return DataCheck(Path(data_yaml), fp, True, images=info.images, instances=info.instances)

        from damage.tasks.validation.validate import validate_dataset

        report_dir.mkdir(parents=True, exist_ok=True)
        clean_out = report_dir / "cleaned" if cfg.on_error == "clean" else None
        profile, source = reference if reference is not None else (None, "")
        if ray is not None:
            from damage.tasks.scale.ray_runtime import connect

            connect(ray, state_dir)
        res = validate_dataset(Path(data_yaml), cfg, report_path=report_dir / "report.json",
                               html_dir=report_dir / "html", clean_out=clean_out, reference=profile,
                               reference_source=source, fingerprint=fingerprint, ray=ray)
        summary = res.report["summary"]
        log.info("data gate: %s", res.summary_line())  # reaches the flow run's logs (prefect_ui)
        tracking.log_metrics(c, run_id, {"errors": summary["errors"], "warnings": summary["warnings"],
                                         **{f"findings/{k}": v for k, v in summary["by_code"].items()}})
        tracking.set_tags(c, run_id, {"dataset_fingerprint": res.fingerprint, "validation": str(res.passed)})
        tracking.log_artifact(c, run_id, res.report_path, "validation")
        tracking.log_artifact(c, run_id, res.profile_path, "validation")
        tracking.log_artifact(c, parent_run_id, res.profile_path, str(Path(PROFILE_ARTIFACT).parent))
        tracking.set_tags(c, run_id, {"drift_reference": source or "none"})
        if res.html_path is not None:
            tracking.log_artifact(c, run_id, Path(res.html_path).parent if Path(res.html_path).is_file()
                                  else res.html_path, "validation/html")
        check = DataCheck(Path(data_yaml), res.fingerprint, res.passed, images=info.images,
                          instances=info.instances, report_path=res.report_path, summary=summary)
        if res.passed:
            tracking.set_tags(c, parent_run_id, {ACCEPTED_TAG: "accepted"})
            return check
        if res.drift_errors:
            raise GateFailed(f"data gate failed on drift against {source}: {res.summary_line()}")
        if cfg.on_error == "clean" and res.clean_data_yaml is not None:
            # The profile logged above is the uncleaned dataset's; close enough as a later reference.
            tracking.set_tags(c, parent_run_id, {ACCEPTED_TAG: "accepted"})
            tracking.set_tags(c, run_id, {"trained_on": "cleaned copy"})
            check.data_yaml, check.cleaned = Path(res.clean_data_yaml), True
            # the copy was hashed when it was written (quarantine.json): not read again here
            check.fingerprint = json.loads(Path(res.quarantine_path).read_text())["fingerprint"]
            return check
        raise GateFailed(f"data gate failed: {res.summary_line()}")
