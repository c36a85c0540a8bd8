"""What a new user trips over (issue 32), each asserted by the message or the behaviour they see."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import LINEAGE, sqlite_client

ROOT = Path(__file__).resolve().parents[2]


def _damage(*args: str, state: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "DAMAGE_STATE_DIR": str(state), "COLUMNS": "400"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "damage.flows.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _register(c, name: str, tmp_path: Path) -> str:
    import damage.model_registry as mr

    run_id = c.create_run(c.create_experiment(f"exp-{name}")).info.run_id
    f = tmp_path / f"{name}.onnx"
    f.write_bytes(b"x")
    return mr.register_candidate(c, name, run_id, f, None, {"mask/mAP50-95": 0.3}, {}, LINEAGE).version


# 1. `damage serve` right after `make demo`: no production yet
def test_serve_without_production_says_approve_or_serve_staging(tmp_path):
    state = tmp_path / "s"
    state.mkdir()
    c = sqlite_client(state)
    version = _register(c, "damage-seg", tmp_path)
    c.set_registered_model_alias("damage-seg", "staging", version)
    p = _damage("serve", "--port", "5999", state=state)
    assert p.returncode == 2 and "Traceback" not in p.stderr + p.stdout
    err = " ".join(p.stderr.split())
    assert "no version of 'damage-seg' holds the alias 'production' yet" in err
    assert f"damage registry approve damage-seg {version} --by YOU" in err
    assert "damage serve models:/damage-seg@staging" in err


def test_alias_hint_without_staging_or_model(tmp_path):
    from damage.model_registry.uri import alias_hint

    c = sqlite_client(tmp_path)
    assert "no registered model 'ghost'" in alias_hint(c, "models:/ghost@production")
    v = _register(c, "lonely", tmp_path)
    hint = alias_hint(c, "models:/lonely@production")
    assert f"registered versions: {v}" in hint and f"damage serve models:/lonely/{v}" in hint
    c.set_registered_model_alias("lonely", "production", v)
    assert alias_hint(c, "models:/lonely@production") is None  # set: nothing to say
    assert alias_hint(c, "models:/lonely/1") is None and alias_hint(c, "runs:/abc/model") is None


# 5. serve: a wrong column name is a 400 naming the expected column; the path error names its setting
def _served_model(tmp_path):
    from damage.tasks.serving.predictor import Predictor
    from damage.tasks.serving.pyfunc_model import DamageSegModel
    from tests.unit.test_issue13_serving import fake_onnx

    m = DamageSegModel()
    m.predictor, m.onnx_name = Predictor(fake_onnx(tmp_path / "m.onnx", [(10, 10, 50, 50)])), "m.onnx"
    return m


def test_serve_wrong_column_is_a_400_naming_the_expected_column(tmp_path):
    import pandas as pd
    import pytest
    from mlflow.exceptions import MlflowException
    from mlflow.models.utils import _enforce_schema

    from damage.tasks.serving.pyfunc import signature

    m = _served_model(tmp_path)
    # what the scoring server hands predict for {"columns": ["img"], ...}: MLflow drops the unknown column
    enforced = _enforce_schema(pd.DataFrame({"img": ["x"]}), signature().inputs)
    with pytest.raises(MlflowException, match="no 'image' column") as err:
        m.predict(None, enforced)
    assert err.value.get_http_status_code() == 400
    assert m.predict(None, pd.DataFrame({"image": []})) == []  # an empty request with the right column: fine


def test_serve_path_error_names_the_setting_and_the_printed_hint_says_it_is_off(tmp_path, monkeypatch):
    from damage.tasks.serving.pyfunc_model import PATH_ERROR, PATH_ROOT_ENV

    monkeypatch.delenv(PATH_ROOT_ENV, raising=False)
    m = _served_model(tmp_path)
    err = m.predict(None, [{"path": "x.png"}])[0]["error"]
    assert err == PATH_ERROR and f"${PATH_ROOT_ENV}" in err


# 4. the signature has outputs (the MLflow UI shows what a request returns)
def test_signature_declares_inputs_params_and_outputs():
    from damage.tasks.serving.pyfunc import signature

    sig = signature()
    assert set(sig.inputs.input_names()) == {"image", "path"}
    assert {"image", "instances", "vehicles", "damage_percent", "error"} <= set(sig.outputs.input_names())
    assert {p.name for p in sig.params.params} == {"conf", "iou"}


# 9. `damage train --help` names every family the pipeline builds, not YOLOv8 alone
def test_train_help_names_every_family(tmp_path):
    from damage.tasks.core.families import FAMILIES

    p = _damage("train", "--help", state=tmp_path / "s")
    assert p.returncode == 0
    text = " ".join(p.stdout.split())
    assert "YOLOv8-seg model alone" not in text
    for fam in FAMILIES:
        assert fam in text, (fam, text)


# 7. training under a wall-time budget says that it re-planned the epoch count
def test_epoch_line_says_when_the_budget_re_planned():
    from damage.tasks.training.train import epoch_line

    assert "re-planned after each epoch" in epoch_line(0, 36, None, 11.0, {})
    assert epoch_line(1, 36, 36, 11.0, {}) == "epoch 2/36: "  # unchanged: no note
    line = epoch_line(2, 97, 36, 11.0, {"mask/mAP50": 0.5})
    assert line.startswith("epoch 3/97 (re-planned from 36 epochs to fit the 11-minute budget)")
    assert epoch_line(0, 40, None, None, {"mask/mAP50": 0.5}) == "epoch 1/40: mask/mAP50 0.500"  # no budget


# 6. `registry history` at 80 columns: no word broken, one approval fits a 40-line screen
GATE_REASON = ("mask/mAP50-95 0.412 >= floor 0.050 (no production version: first candidate); "
               "box/mAP50-95 0.455 vs production none; per-class mask AP50 ok: vehicle 0.912, dent 0.478, "
               "scratch 0.401, crack 0.352, glass_shatter 0.612, lamp_broken 0.533, tire_flat 0.701, "
               "bumper_dent 0.388; latency_ms 16.9 <= budget none")


def test_registry_history_fits_80_columns_without_breaking_words(tmp_path):
    import damage.model_registry as mr

    state = tmp_path / "s"
    state.mkdir()
    c = sqlite_client(state)
    v = _register(c, "damage-seg", tmp_path)
    c.set_model_version_tag("damage-seg", v, "validation_status", "passed")
    mr.set_staging(c, "damage-seg", v, by="gate", reason=GATE_REASON)
    mr.approve(c, "damage-seg", v, by="alice", reason="checked the glass_shatter overlays by eye")
    env_cols = {"COLUMNS": "80", "LINES": "40"}
    env = {**os.environ, "DAMAGE_STATE_DIR": str(state), **env_cols}
    env.pop("MLFLOW_TRACKING_URI", None)
    p = subprocess.run([sys.executable, "-m", "damage.flows.cli", "registry", "history", "damage-seg"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert max(len(ln) for ln in lines) <= 80 and len(lines) <= 40, p.stdout
    # words of the reasons stay whole: each reason word is on one line of the table
    cells = " ".join(ln.split("│")[-2].strip() for ln in lines if ln.count("│") >= 2)
    for word in ("glass_shatter", "overlays", "first"):
        assert word in cells.split() or any(word in w for w in cells.split()), (word, p.stdout)
    assert "glass_sh " not in cells and "(as above)" in cells, p.stdout


def test_clip_clauses_keeps_whole_clauses():
    from damage.flows.tables import clip_clauses

    out = clip_clauses(GATE_REASON, 140)
    assert len(out) < len(GATE_REASON) and out.endswith("more, see --json)")
    assert GATE_REASON.startswith(out.split(" … ")[0])
    assert clip_clauses("short", 140) == "short"


# 2. `damage ui` prints the experiment's deep link (model-training view) first, and how to get there by hand
def test_ui_banner_prints_the_deep_link_first(tmp_path):
    from damage.flows.commands.serve import ui_banner

    url = "http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning"
    text = ui_banner("http://127.0.0.1:5000", url, "http://127.0.0.1:4200", tmp_path, tmp_path / "logs")
    first = text.splitlines()[0]
    assert first == f"open this: {url}"
    assert "'Model training'" in text and "MLflow UI : http://127.0.0.1:5000" in text
    assert ui_banner("http://m", "", "http://p", tmp_path, tmp_path).startswith("MLflow UI : http://m")


# 4. the dataset panel has a schema MLflow renders; the version is an MLflow 3 logged model (Models tab)
def test_dataset_schema_is_an_mlflow_colspec(tmp_path):
    import json

    from mlflow.types.schema import Schema

    from damage.tasks.data.mlflow_input import dataset_entity
    from damage.tasks.data.synth import generate_dataset

    data_yaml = generate_dataset(tmp_path / "ds", images=4, seed=0, imgsz=64)
    schema = json.loads(dataset_entity(data_yaml, "fp").schema)
    cols = Schema.from_json(json.dumps(schema["mlflow_colspec"]))
    assert cols.input_names() == ["split", "image", "label"]


def test_registered_version_links_to_a_logged_model(tmp_path):
    import json

    import damage.model_registry as mr
    from damage.model_registry.steps import link_logged_model, log_pyfunc_model
    from tests.unit.test_issue13_serving import fake_onnx

    c = sqlite_client(tmp_path)
    exp = c.create_experiment("logged", artifact_location=str(tmp_path / "artifacts"))
    run_id = c.create_run(exp).info.run_id
    onnx = fake_onnx(tmp_path / "m.onnx", [(10, 10, 50, 50)])
    ids: list[str] = []
    v = mr.register_candidate(c, "logged-m", run_id, onnx, None, {"mask/mAP50-95": 0.3}, {}, LINEAGE,
                              log_model_fn=lambda rid, o, pt: log_pyfunc_model(c, rid, o, pt, ids))
    link_logged_model(c, ids[0], "logged-m", v.version)
    models = c.search_logged_models([exp])  # what the experiment's Models tab lists
    assert [m.model_id for m in models] == ids
    logged = models[0]
    assert logged.source_run_id == run_id and str(logged.status) == "READY"
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": "logged-m", "version": str(v.version)}]
    assert [o.model_id for o in c.get_run(run_id).outputs.model_outputs] == ids  # the run page lists it
    assert v.tags["artifact.onnx"].endswith(".onnx") and "/model/" in v.tags["artifact.onnx"]
