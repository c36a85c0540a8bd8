"""What users of MLflow, Prefect and Apprise see after a nightly run (issue 15), read back from the
MLflow store and the Prefect API: dataset inputs, system metrics, evaluation figures, the model
card, the flow run's artifacts / logs / links, a skipped run, and the notifications (a loopback
HTTP endpoint records the POSTs; a dead endpoint never fails the run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import worker_config
from tests.integration.tiny_night import MODEL, TINY, worker_registry


@pytest.fixture(scope="module", autouse=True)
def registry_env():
    """The worker's registry section of the shared night, for the runs this module adds."""
    with worker_registry():
        yield


@pytest.fixture(scope="module")
def ux_run(tiny_night):
    """The suite's shared forced tiny nightly (tests/integration/tiny_night.py)."""
    return tiny_night


@pytest.fixture(scope="module")
def ux_skipped(ux_run, night_notify_config):
    """The same run again, unforced: nothing changed, so it is skipped (its final Prefect state)."""
    from damage.flows.nightly import nightly

    with worker_config(TINY, night_notify_config):
        return nightly(force=False, return_state=True)


@pytest.fixture(scope="module")
def ux_failed(prefect_harness, state_paths, night_notify_config, night_recorder):
    """A run that fails in the data gate: the gate's error propagates, a failure message goes out."""
    from damage.flows.nightly import nightly

    failing = TINY + ["validate.min_width=10000", "validate.severity={too_small: error}"]
    with pytest.raises(Exception, match="data gate failed") as err:  # the gate error, not a notify error
        with worker_config(failing, night_notify_config):
            nightly(force=True)
    return {"error": str(err.value), "posts": night_recorder.posts}


def _client(summary):
    from mlflow.tracking import MlflowClient

    return MlflowClient(summary["tracking_uri"])


def _child(c, summary, step):
    parent = c.get_run(summary["mlflow_run_id"])
    runs = c.search_runs([parent.info.experiment_id],
                         filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.`damage.step` = '{step}'")
    assert runs, f"no nested run {step}"
    return runs[0]


def test_dataset_input_and_system_metrics_on_train_and_evaluate(ux_run):
    import json

    s = ux_run["summary"]
    c = _client(s)
    for step, context in (("train", "training"), ("evaluate", "evaluation")):
        run = c.get_run(_child(c, s, step).info.run_id)
        inputs = run.inputs.dataset_inputs
        assert len(inputs) == 1, step
        ds = inputs[0].dataset
        assert ds.digest == s["dataset_fingerprint"]
        assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == context
        prof = json.loads(ds.profile)
        assert prof["splits"]["train"] == 18 and prof["splits"]["val"] == 6
        assert sum(prof["instances"].values()) > 0
        assert json.loads(ds.source)["uri"] == str(Path(s["dataset"]).resolve().parent)
        sysm = [k for k in run.data.metrics if k.startswith("system/")]
        assert "system/cpu_utilization_percentage" in sysm and "system/system_memory_usage_megabytes" in sysm, step


def test_evaluate_run_has_curves_and_confusion_matrix(ux_run):
    from damage.tasks.evaluation.plots import CM_FILES

    s = ux_run["summary"]
    c = _client(s)
    run_id = _child(c, s, "evaluate").info.run_id
    files = {Path(a.path).name for a in c.list_artifacts(run_id, "plots")}
    for kind in ("box", "mask"):
        assert {f"{kind}_PR_curve.png", f"{kind}_F1_curve.png"} <= files
    assert set(CM_FILES) <= files
    local = c.download_artifacts(run_id, "plots/mask_PR_curve.png")
    assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_version_description_is_the_model_card(ux_run):
    s = ux_run["summary"]
    c = _client(s)
    mv = c.get_model_version(MODEL, str(s["registered_version"]))
    md = mv.description
    assert "| class | images | instances | box/AP50 |" in md
    for row in s["per_class"]:
        assert f"| {row['class']} | {row['images']} | {row['instances']} |" in md
    assert s["dataset_fingerprint"] in md and "Operating point" in md and "latency (ms/image, pre+inference+post)" in md
    assert f"/runs/{s['mlflow_run_id']}?workflowType=machine_learning" in md
    assert f"/runs/flow-run/{s['prefect_flow_run_id']}" in md


def test_flow_run_has_summary_progress_link_and_project_logs(ux_run):
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )

    s = ux_run["summary"]
    fid = UUID(s["prefect_flow_run_id"])
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[fid])))
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[fid])))
        fr = client.read_flow_run(fid)
    by_key = {a.key: a for a in arts}
    md = by_key["nightly-summary"]
    assert md.type == "markdown" and "| mask/mAP50 |" in md.data and "Promotion gate" in md.data
    assert f"versions/{s['registered_version']}" in md.data
    for key in ("train-epochs", "validate-scan", "sweep"):  # per epoch, per scan chunk, per sweep image
        assert by_key[key].type == "progress" and float(by_key[key].data) == 100.0, key
    link = by_key["mlflow-run"]
    assert link.type == "markdown" or link.type == "link"
    assert f"/runs/{s['mlflow_run_id']}?workflowType=machine_learning" in str(link.data)
    assert f"mlflow-run:{s['mlflow_run_id']}" in fr.tags
    project = [lg for lg in logs if lg.name.startswith(("damage.tasks.", "damage.model_registry."))]
    assert any(lg.name == "damage.tasks.validation.data_check" and "data gate:" in lg.message for lg in project), \
        [(lg.name, lg.message[:80]) for lg in logs][:20]
    # and the MLflow run links back to the flow run, clickable (markdown description)
    run = _client(s).get_run(s["mlflow_run_id"])
    assert f"(http://127.0.0.1:4200/runs/flow-run/{fid})" in run.data.tags["mlflow.note.content"] \
        or f"/runs/flow-run/{fid})" in run.data.tags["mlflow.note.content"]


def test_task_runs_have_readable_names(ux_run):
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    fid = UUID(ux_run["summary"]["prefect_flow_run_id"])
    with get_client(sync_client=True) as client:
        names = {t.name for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fid])))}
    assert {"train", "evaluate", "sweep", "register", "model-card"} <= names


def test_skipped_run_shows_as_skipped(ux_run, ux_skipped):
    state = ux_skipped
    assert state.is_completed() and state.name == "Skipped"
    data = state.result()
    assert data["skipped"] is True
    run = _client(ux_run["summary"]).get_run(data["mlflow_run_id"])
    assert run.info.run_name.endswith("-skipped") and run.data.tags["damage.status"] == "skipped"
    first = ux_run["summary"]["mlflow_run_id"]  # the forced run before it is the run it refers to
    assert data["previous_run_id"] == first and f"unchanged since run {first}" in data["reason"]
    assert "epochs_run" not in data and "registered_version" not in data  # nothing trained, nothing registered


def test_approval_notification(ux_run):
    posts = [p for path, p in ux_run["posts"] if path == "/hook"]
    s = ux_run["summary"]
    approval = next((p for p in posts if "waits for approval" in p["title"]), None)
    assert approval is not None, [p["title"] for p in posts]
    assert f"damage registry approve {MODEL} {s['registered_version']}" in approval["message"]
    assert "mask/mAP50" in approval["message"]
    # the dead URL did not fail the run: the run finished and registered its version
    assert s["registered_version"]


def test_failure_notification_names_step_error_and_link(ux_failed):
    posts = [p for path, p in ux_failed["posts"] if path == "/hook"]
    failure = next((p for p in posts if "FAILED" in p["title"]), None)
    assert failure is not None, [p["title"] for p in posts]
    assert "validate" in failure["title"] and "data gate failed" in failure["message"]
    assert "workflowType=machine_learning" in failure["message"]


def test_registered_pyfunc_is_from_code_with_an_input_example(ux_run, tmp_path, caplog):
    import importlib
    import multiprocessing as mp
    import sys

    import mlflow
    import yaml

    from damage.tasks.serving.pyfunc import input_example, save_pyfunc

    s = ux_run["summary"]
    c = _client(s)
    mv = c.get_model_version(MODEL, str(s["registered_version"]))
    files = {Path(a.path).name for a in c.list_artifacts(mv.run_id, "model")}
    assert "python_model.pkl" not in files  # nothing pickled
    assert {"pyfunc_code.py", "input_example.json", "serving_input_example.json"} <= files
    mlmodel = yaml.safe_load(Path(c.download_artifacts(mv.run_id, "model/MLmodel")).read_text())
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    path_before, tasks_before = list(sys.path), sys.modules["damage"]
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}/{s['registered_version']}")
    out = model.predict(input_example())
    assert out[0]["width"] == 32 and "instances" in out[0]
    # loading (MLflow prepends the model's code folder to sys.path for good) shadows nothing of ours:
    # the predictor ships as `damage_serving`, and a spawned child still imports the repo's `tasks`
    added = [Path(p) for p in sys.path if p not in path_before]
    assert added and all((p / "damage_serving").is_dir() and not (p / "tasks").exists() for p in added), added
    assert sys.modules["damage"] is tasks_before
    assert type(model.unwrap_python_model()).__module__ == "damage_serving.serving.pyfunc_model"
    child = mp.get_context("spawn").Process(target=importlib.import_module, args=("damage.tasks.core.secrets",))
    child.start()
    child.join(120)
    assert child.exitcode == 0  # a module the pyfunc does not ship (the shadowing failed exactly here)
    with caplog.at_level("WARNING", logger="mlflow"):
        save_pyfunc(Path(s["onnx"]), tmp_path / "m")
    assert "CloudPickle" not in caplog.text


def test_experiment_opens_in_the_model_training_view(ux_run):
    s = ux_run["summary"]
    c = _client(s)
    exp = c.get_experiment(c.get_run(s["mlflow_run_id"]).info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert s["mlflow_run_url"].endswith(f"/runs/{s['mlflow_run_id']}?workflowType=machine_learning")


def test_damage_serve_answers_the_printed_example(ux_run, tmp_path, monkeypatch):
    import json

    # a local store without accounts: the approval is recorded under --by, not under an MLflow login
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    import os
    import re
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from tests.integration.conftest import free_port

    s = ux_run["summary"]
    import damage.model_registry as mr

    # only an approved version is served (issue 31): approve the staged one (local store, no accounts)
    mr.approve(s["tracking_uri"], MODEL, s["registered_version"], by="test", reason="serve test")
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]),
               PATH="/usr/bin:/bin")  # the venv is NOT on PATH: `damage serve` must still find uvicorn
    out = tmp_path / "serve.out"
    with open(out, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "damage.flows.cli", "serve", f"models:/{MODEL}/{s['registered_version']}",
                                 "--port", str(port)], env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, out.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=3) as r:
                    if r.status == 200:
                        break
            except Exception:
                time.sleep(2)
        text = out.read_text()
        assert f"at http://127.0.0.1:{port}" in text
        body = re.search(r"-d '(\{.*\})'", text).group(1)  # the printed curl example, sent as printed
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            preds = json.loads(r.read())["predictions"]
        assert preds[0]["width"] == 32 and "instances" in preds[0]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:  # Ctrl-C: `damage serve` stops the scoring server it started
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_one_off_numbers_stay_out_of_the_charts(ux_run):
    import json

    s = ux_run["summary"]
    c = _client(s)
    train = c.get_run(_child(c, s, "train").info.run_id)
    assert not [k for k in train.data.metrics if k.startswith("final/")]
    assert len(c.get_metric_history(train.info.run_id, "train/box_loss")) == 1  # the per-epoch series stays
    final = json.loads(Path(c.download_artifacts(train.info.run_id, "results/final_metrics.json")).read_text())
    assert 0.0 <= final["mask/mAP50-95"] <= 1.0 and train.data.tags["epochs_run"] == "1"


def test_parent_run_has_headline_per_class_dataset_and_step_report_links(ux_run):
    """Issue 32, item 3: the parent run (opened first) has the per-class metrics, the dataset input and
    links to its step runs' reports; every task run takes plain inputs (issue 32: Prefect's default UI)."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    s = ux_run["summary"]
    c = _client(s)
    parent = c.get_run(s["mlflow_run_id"])
    labelled = [r["class"] for r in s["per_class"] if r.get("instances")]
    assert labelled and all(f"mask_ap50/{cls}" in parent.data.metrics for cls in labelled)
    assert parent.data.metrics["mask/mAP50"] == pytest.approx(s["metrics"]["mask/mAP50"])
    assert [d.dataset.digest for d in parent.inputs.dataset_inputs] == [s["dataset_fingerprint"]]
    note = parent.data.tags["mlflow.note.content"]
    validate, evaluate = _child(c, s, "validate"), _child(c, s, "evaluate")
    assert "### Step reports" in note and f"/runs/{validate.info.run_id}?" in note and \
        f"/runs/{evaluate.info.run_id}?" in note
    assert s["registered_artifact"]["precision"] == "FP32"  # compression off here
    fid = UUID(s["prefect_flow_run_id"])
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fid])))
    kinds = {i.input_type for t in runs for ins in t.task_inputs.values() for i in ins}
    assert "flow_run" not in kinds, kinds
