"""Issue 13, items 15-17: credentials never recorded, code version without git, a retried flow resumes."""

from __future__ import annotations

import json
import subprocess

from damage.tasks.core.config_load import load_config

# ---- item 15 -----------------------------------------------------------------------------------------

def test_13_15_credentials_stripped_from_params_files_and_hash(tmp_path, monkeypatch):
    import os

    from mlflow.tracking import MlflowClient

    from damage.tasks.core import tracking
    from damage.tasks.core.secrets import move_uri_credentials_to_env, redact_uri
    from damage.tasks.nightly import pipeline
    from damage.tasks.nightly.skip import SkipDecision, record_skip, skip_config_hash

    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(k, "")  # recorded, so what the code under test sets is undone afterwards
        monkeypatch.delenv(k)
    a = load_config(overrides=["mlflow.tracking_uri=http://pipeline:s3cret@mlflow.example:5000"])
    b = load_config(overrides=["mlflow.tracking_uri=http://pipeline:0ther@mlflow.example:5000"])
    assert a.hash() == b.hash() and skip_config_hash(a) == skip_config_hash(b)  # password change: same hash
    assert "s3cret" not in json.dumps(a.to_dict())  # MLflow params and config/resolved.yaml are to_dict()
    assert a.to_dict()["mlflow"]["tracking_uri"] == "http://mlflow.example:5000"
    # activation (runtime.activate) hands the credentials to MLflow's own variables, keeps the URI clean
    assert move_uri_credentials_to_env(a.mlflow.tracking_uri) == "http://mlflow.example:5000"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("pipeline", "s3cret")
    # local paths are never rewritten
    assert redact_uri(f"sqlite:///{tmp_path}/x.db") == f"sqlite:///{tmp_path}/x.db"
    assert redact_uri("http://u:p@h:1/x?token=abc&a=1") == "http://h:1/x?token=REDACTED&a=1"

    class Stub:  # a client whose URI carries the password, as MlflowClient keeps it
        tracking_uri = "http://pipeline:s3cret@mlflow.example:5000"

    monkeypatch.setattr(tracking, "client", lambda uri=None: Stub())
    monkeypatch.setattr(tracking, "set_tags", lambda *a, **k: None)
    skipped = record_skip("x", "run", SkipDecision(True, "same", "k", "fp", "ch", "cv"))
    assert "s3cret" not in json.dumps(skipped) and skipped["tracking_uri"] == "http://mlflow.example:5000"
    monkeypatch.undo()
    # the parent run's params on a real store
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(overrides=[f"mlflow.tracking_uri={db}", f"mlflow.artifact_location={(tmp_path / 'a').as_uri()}",
                                 f"state_dir={tmp_path / 'state'}", "data.source=s3://key:s3cret@bucket/ds"])
    run = pipeline.open_pipeline_run(cfg)
    data = MlflowClient(db).get_run(run.run_id).data
    assert "s3cret" not in json.dumps(data.params) and "s3cret" not in json.dumps(data.tags)


# ---- item 16 -----------------------------------------------------------------------------------------

def test_13_16_code_version_without_git_hashes_the_package(tmp_path, monkeypatch):
    from damage.tasks.data import fingerprint

    def refused(cmd, *a, **kw):
        if cmd and cmd[0] == "git":
            raise subprocess.CalledProcessError(128, cmd, stderr="fatal: detected dubious ownership in repository")
        return real(cmd, *a, **kw)

    real = subprocess.run
    monkeypatch.setattr(fingerprint.subprocess, "run", refused)
    v = fingerprint.code_version()
    assert v.startswith("files-") and v != "files-" and v == "files-" + fingerprint.package_files_hash()
    monkeypatch.setenv("PATH", str(tmp_path))  # git absent altogether
    monkeypatch.setattr(fingerprint.subprocess, "run", real)
    assert fingerprint.code_version() == v
    # any change in the package's files changes it: skip-if-unchanged cannot miss a code change
    pkg = tmp_path / "tasks"
    pkg.mkdir()
    (pkg / "a.py").write_text("x = 1\n")
    h1 = fingerprint.package_files_hash([pkg])
    (pkg / "a.py").write_text("x = 2\n")
    assert fingerprint.package_files_hash([pkg]) != h1


# ---- item 17 -----------------------------------------------------------------------------------------

def test_13_17_retried_flow_resumes_training_and_registration(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    import damage.model_registry as mr
    from damage.tasks.nightly import pipeline
    from damage.tasks.training import train

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", db)  # step runs use the activated URI
    cfg = load_config(overrides=[f"mlflow.tracking_uri={db}", f"state_dir={tmp_path / 'state'}",
                                 f"mlflow.artifact_location={(tmp_path / 'art').as_uri()}"])
    monkeypatch.setattr(pipeline, "_prefect_flow_run", lambda: ("flow-run-1", "nightly-x"))
    first = pipeline.open_pipeline_run(cfg)
    # attempt 1: training finished, the version was registered, then the flow failed
    out_dir = tmp_path / "train-key"
    weights = out_dir / "train" / "weights"
    weights.mkdir(parents=True)
    (weights / "best.pt").write_bytes(b"pt")
    done = train.TrainResult(best=weights / "best.pt", last=weights / "best.pt", run_dir=out_dir / "train",
                             metrics={"mask/mAP50-95": 0.3}, epochs_run=2)
    train._mark_finished(out_dir, "train", done)
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx")
    lineage = {"dataset_fingerprint": "d", "config_hash": "h", "code_version": "c"}
    v1 = mr.register_candidate(db, "m17", first.run_id, onnx, None, {}, {}, lineage)
    pipeline.close_pipeline_run(first, ok=False, error="boom after registration")

    # attempt 2 of the same Prefect flow run
    second = pipeline.open_pipeline_run(cfg)
    assert second.run_id == first.run_id and second.root == first.root

    def no_training(*a, **kw):
        raise AssertionError("training ran again")

    monkeypatch.setattr(train, "train_model", no_training)
    res = train.train_step(tmp_path / "data.yaml", cfg.train, out_dir, second.run_id, reuse_finished=True)
    assert res.best == done.best and res.metrics == done.metrics
    v2 = mr.register_candidate(db, "m17", second.run_id, onnx, None, {}, {}, lineage)
    assert v2.version == v1.version
    assert len(MlflowClient(db).search_model_versions("name='m17'")) == 1
    # without the marker (training never finished) nothing is reused
    assert train.finished_training(tmp_path / "elsewhere") is None
