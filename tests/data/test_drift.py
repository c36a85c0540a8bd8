"""Drift against a reference profile: a shifted copy gets the matching codes, a resample gets none."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from damage.tasks.core.config import ValidateConfig
from damage.tasks.validation.drift import (
    DRIFT_CODES,
    ProfileError,
    drift_table,
    ks_statistic,
    load_profile,
    reference_profile,
)
from damage.tasks.validation.validate import severities

CFG = ValidateConfig(workers=1)


def _drift_codes(report: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in report["findings"]:
        if f["code"] in DRIFT_CODES:
            out.setdefault(f["code"], []).append(f["detail"])
    return out


@pytest.fixture(scope="module")
def synth_pair(state_paths, tmp_path_factory):
    """Two draws of the same synthetic distribution (different seeds) at 96 px."""
    from damage.tasks.data.synth import generate_dataset

    root = tmp_path_factory.mktemp("drift")
    ref = generate_dataset(root / "ref", images=100, seed=1, imgsz=96, val_fraction=0.25)
    resample = generate_dataset(root / "resample", images=100, seed=2, imgsz=96, val_fraction=0.25)
    return root, ref.parent, resample.parent


def _shifted_copy(src: Path, dst: Path) -> Path:
    """Copy with a shifted class mix (vehicle mostly unlabelled, tire_flat gone) and +70 brightness."""
    shutil.copytree(src, dst)
    meta = yaml.safe_load((dst / "data.yaml").read_text())
    (dst / "data.yaml").write_text(yaml.safe_dump(dict(meta, path=str(dst))))
    names = meta["names"]
    names = names if isinstance(names, list) else [names[k] for k in sorted(names)]
    vehicle, tire = names.index("vehicle"), names.index("tire_flat")
    rng = np.random.default_rng(0)
    for lbl in (dst / "labels").rglob("*.txt"):
        keep = []
        for line in lbl.read_text().splitlines():
            c = int(line.split()[0])
            if c == tire or (c == vehicle and rng.random() < 0.8):
                continue
            keep.append(line)
        lbl.write_text("".join(f"{x}\n" for x in keep))
    for img in (dst / "images").rglob("*.*"):
        im = cv2.imread(str(img))
        cv2.imwrite(str(img), cv2.add(im, np.full_like(im, 70)))
    return dst


def test_drift_resample_quiet_shift_loud(synth_pair, tmp_path):
    import uuid

    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from damage.flows.cli import app
    from damage.tasks.core import tracking
    from damage.tasks.validation.data_check import check_data_step
    from damage.tasks.validation.drift import ACCEPTED_TAG, PROFILE_ARTIFACT, find_reference

    root, ref_dir, resample_dir = synth_pair
    ref = reference_profile(ref_dir, CFG)  # --against DATASET: the folder is profiled
    assert ref["classes"][0] == "vehicle" and ref["class_counts"]["tire_flat"] > 0

    # Nightly data step on the same distribution drawn again: no drift finding; the profile goes
    # to the pipeline run, which is tagged accepted.
    c: MlflowClient = tracking.client()
    exp = tracking.ensure_experiment(c, f"drift-{uuid.uuid4().hex[:8]}")
    night1 = tracking.start_run(c, exp, "night1")
    check = check_data_step(resample_dir / "data.yaml", CFG, tmp_path / "n1", night1, (ref, "ref"))
    report = json.loads(check.report_path.read_text())
    assert check.passed and _drift_codes(report) == {}, _drift_codes(report)
    assert report["drift"]["reference"]["fingerprint"] == ref["fingerprint"]
    assert any(r["entity"] == "column" for r in report["drift"]["table"])
    assert c.get_run(night1).data.tags[ACCEPTED_TAG] == "accepted"

    # The next night's reference: the last accepted dataset, then the production version's.
    model = f"drift-model-{uuid.uuid4().hex[:8]}"
    prof, source = find_reference(ValidateConfig(), c.tracking_uri, exp, model, current_run_id="night2")
    assert prof["fingerprint"] == check.fingerprint and night1 in source
    night0 = tracking.start_run(c, exp, "night0")
    c.log_dict(night0, ref, PROFILE_ARTIFACT)
    c.create_registered_model(model)
    mv = c.create_model_version(model, "file:///nowhere", run_id=night0, tags={"source_run_id": night0})
    c.set_registered_model_alias(model, "production", mv.version)
    from damage.model_registry.frozen import T_SOURCE_VERSION, ApprovalMismatch, approved_name
    from damage.model_registry.reference import production_source

    def production_run():
        return production_source(c, model)

    with pytest.raises(ApprovalMismatch):  # production without an approval record: refused (issue 31)
        find_reference(ValidateConfig(), c.tracking_uri, exp, model, production_run=production_run)
    c.create_registered_model(approved_name(model))  # the approval record (what approve writes)
    rec = c.create_model_version(approved_name(model), "file:///nowhere", tags={T_SOURCE_VERSION: mv.version})
    c.set_registered_model_alias(approved_name(model), "production", rec.version)
    prof, source = find_reference(ValidateConfig(), c.tracking_uri, exp, model, production_run=production_run)
    assert prof["fingerprint"] == ref["fingerprint"] and "production" in source and night0 in source
    assert find_reference(ValidateConfig(drift_reference="none"), c.tracking_uri, exp, model)[0] is None

    # By hand: a copy with a shifted class mix and brighter images, against the stored profile,
    # with on_drift=fail: the matching codes as errors, exit 1.
    shifted = _shifted_copy(resample_dir, root / "shifted")
    ref_json = tmp_path / "profile.json"
    ref_json.write_text(json.dumps(ref))
    out = tmp_path / "shift"
    r = CliRunner().invoke(app, ["validate", str(shifted), "--against", str(ref_json), "--report",
                                 str(out / "report.json"), "--html", str(out / "html"),
                                 "--set", "validate.on_drift=fail", "--set", "validate.workers=1"])
    assert r.exit_code == 1, r.output
    assert "drift against" in r.output and "class_removed=1" in r.output
    report = json.loads((out / "report.json").read_text())
    codes = _drift_codes(report)
    assert set(codes) == {"class_share_drift", "distribution_drift", "class_removed"}, codes
    assert any("'vehicle'" in d for d in codes["class_share_drift"])
    assert any(d.startswith("brightness:") for d in codes["distribution_drift"])
    assert codes["class_removed"] == [d for d in codes["class_removed"] if "'tire_flat'" in d] != []
    assert all(f["severity"] == "error" for f in report["findings"] if f["code"] in DRIFT_CODES)
    page = (out / "html" / "index.html").read_text()
    assert "class_share_drift" in page and "Drift against" in page
    # The profile of the validated dataset is written beside the report and reads back.
    assert load_profile(out / "profile.json")["fingerprint"] == report["fingerprint"]


def test_on_drift_fail_makes_errors():
    sev = severities(ValidateConfig(on_drift="fail"))
    assert all(sev[c] == "error" for c in DRIFT_CODES)
    assert severities(ValidateConfig(on_drift="fail", severity={"class_added": "warning"}))["class_added"] == "warning"
    assert all(severities(ValidateConfig())[c] == "warning" for c in DRIFT_CODES)


def _profile(counts: dict[str, int], bright: np.ndarray) -> dict:
    from damage.tasks.validation.drift import PROFILE_KIND, PROFILE_VERSION, sketch

    total = sum(counts.values())
    return {"kind": PROFILE_KIND, "version": PROFILE_VERSION, "dataset": "x", "fingerprint": "f",
            "annotations": total, "classes": list(counts), "class_counts": counts,
            "class_shares": {k: v / total for k, v in counts.items()}, "columns": {"brightness": sketch(bright)}}


def test_drift_table_added_removed_and_limits():
    rng = np.random.default_rng(0)
    ref = _profile({"a": 500, "b": 500, "c": 10}, rng.normal(100, 10, 400))
    cur = _profile({"a": 500, "b": 480, "d": 30}, rng.normal(100, 10, 400))
    t = drift_table(ref, cur, CFG).set_index("name", drop=False)
    assert not t.loc["c", "in_current"] and t.loc["c", "in_reference"]  # removed
    assert not t.loc["d", "in_reference"] and t.loc["d", "in_current"]  # added
    assert abs(t.loc["a", "share_change"]) < t.loc["a", "share_limit"]
    col = t[t["entity"] == "column"].iloc[0]
    assert col["ks"] < col["ks_limit"]
    # A small sample raises the KS limit above the configured minimum (sampling noise).
    tiny = drift_table(_profile({"a": 5}, rng.normal(0, 1, 25)), _profile({"a": 5}, rng.normal(0, 1, 25)), CFG)
    assert tiny[tiny["entity"] == "column"].iloc[0]["ks_limit"] > CFG.drift_max_ks
    assert ks_statistic(np.arange(10.0), np.arange(10.0) + 100) == 1.0


def test_reference_errors_name_the_file(tmp_path):
    with pytest.raises(ProfileError, match="not found"):
        reference_profile(tmp_path / "nope", CFG)
    bad = tmp_path / "p.json"
    bad.write_text("{\"kind\": \"other\"}")
    with pytest.raises(ProfileError, match=r"p\.json: not a dataset profile"):
        reference_profile(bad, CFG)
    bad.write_text("{oops")
    with pytest.raises(ProfileError, match=r"p\.json: not a readable JSON"):
        load_profile(bad)
