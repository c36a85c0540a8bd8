"""Issue 31, medium and low items: one test per item, named after it (items 1-6: test_issue31_trust.py)."""

from __future__ import annotations

import json
import time

import pytest
from conftest import MLFLOW_ACCOUNTS, mlflow_user

import damage.model_registry as mr
from damage.tasks.core.config import ConfigError

pytestmark = pytest.mark.integration

_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "DAMAGE_STATE_DIR",
        "DAMAGE_WORKER_CONFIG", "DAMAGE_REGISTRY_CONFIG")


@pytest.fixture
def restore_env(monkeypatch):
    """Whatever a CLI command run in-process pins in the environment is undone after the test."""
    import os

    for k in _ENV:
        if k in os.environ:
            monkeypatch.setenv(k, os.environ[k])
        else:
            monkeypatch.delenv(k, raising=False)


# --- item 7: a READ account's lock with an absurd TTL blocks every rollback --------------------------

def test_item7_lock_with_absurd_ttl_or_no_tags_expires(tmp_path):
    from mlflow.tracking import MlflowClient

    from damage.model_registry.lock import TAG_OWNER, TAG_TTL, lock_name, registry_lock

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for tags in ({TAG_OWNER: "viewer", TAG_TTL: "1e12"}, {}):
        c.create_registered_model(lock_name("m7"), tags=tags)
        # the waiter's own lease (1 s) bounds how long a lock it did not take can hold it
        with registry_lock(c, "m7", holder="approver", timeout_s=30, ttl_s=1.0, poll_s=0.05):
            assert c.get_registered_model(lock_name("m7")).tags[TAG_OWNER] != "viewer"


# --- item 10: `damage schedule` stores --set overrides in the deployment's parameters --------------

def test_item10_schedule_keeps_secrets_out_of_deployment_parameters(monkeypatch, restore_env, tmp_path):
    from typer.testing import CliRunner

    import damage.flows.deploy as D
    from damage.flows.cli import app

    captured = []
    monkeypatch.setattr(D, "register_with_pool", lambda deps, pool: captured.extend(deps) or ["id"])
    r = CliRunner().invoke(app, ["--state-dir", str(tmp_path / "s"),
                                 "--set", "mlflow.tracking_uri=http://pipeline:S3CRET-PW@127.0.0.1:1",
                                 "--set", 'notify.urls=["json://127.0.0.1:1/x?token=S3CRET-TOKEN"]',
                                 "--set", "train.epochs=3", "schedule", "--work-pool", "p"])
    assert r.exit_code == 0, r.output
    stored = json.dumps([d.parameters for d in captured])
    assert captured and "S3CRET" not in stored
    assert "train.epochs=3" in stored  # an allowed run parameter still travels


# --- item 12: the gate scores on settings the run chose ----------------------------------------------

@pytest.mark.parametrize("override", ["evaluate.split=train", "evaluate.max_det=1", "export.imgsz=64",
                                      "train.imgsz=64", "sweep.enabled=false", "registry.floor_mask_map=0"])
def test_item12_run_overrides_cannot_change_gate_evaluation(override):
    from damage.tasks.core.run_params import run_config
    from tests.helpers import worker_config

    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"'{key}' is not allowed"):
        run_config(None, [override])
    with worker_config(["evaluate.split=val", "evaluate.max_det=300"]):  # the worker's settings are the gate's
        cfg = run_config(None, ["train.epochs=2"])
    assert (cfg.evaluate.split, cfg.evaluate.max_det, cfg.train.epochs) == ("val", 300, 2)


def test_item12_run_cannot_name_a_model_file():
    from damage.tasks.core.run_params import check_run_overrides

    for bad in ("train.init=/data/from-s3/best.pt", "train.model=/tmp/evil.pt", "train.model=x.yaml"):
        with pytest.raises(ConfigError, match="cannot name a file"):
            check_run_overrides([bad])


# --- item 13: the identity is the environment variable alone -----------------------------------------

def test_item13_identity_is_confirmed_by_the_server(sqlite_mlflow_server, mlflow_s3_server, monkeypatch):
    from damage.model_registry.identity import confirmed_identity

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "approver")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "anything")
    # a server without authentication: any name would do, so nobody is an approver there
    with pytest.raises(mr.AccessDenied, match="has no authentication"):
        confirmed_identity(sqlite_mlflow_server)
    with pytest.raises(mr.AccessDenied, match="has no authentication"):
        mr.approve(sqlite_mlflow_server, "m13", "1", by="approver", reason="r", approvers=["approver"])
    # a basic-auth server: a claimed name with a wrong password is refused, the right one confirmed
    with pytest.raises(mr.AccessDenied, match="refused this process's credentials"):
        confirmed_identity(mlflow_s3_server)
    with mlflow_user("approver"):
        assert confirmed_identity(mlflow_s3_server) == MLFLOW_ACCOUNTS["approver"][0]


# --- item 14: redact_uri misses some passwords and query secrets --------------------------------------

@pytest.mark.parametrize("uri", ["http://pipeline:pa/ss@mlflow:5000/", "http://pipeline:pa#ss@mlflow:5000",
                                 "http://pipeline:pa?ss@mlflow:5000/x", "https://h/x?sig=S3CRET",
                                 "https://h/x?auth=S3CRET&a=1", "http://u:p@ss@mlflow:5000"])
def test_item14_redact_uri_hides_every_password(uri, monkeypatch):
    from damage.tasks.core.secrets import move_uri_credentials_to_env, redact_uri

    out = redact_uri(uri)
    for secret in ("pa/ss", "pa#ss", "pa?ss", "S3CRET", "p@ss"):
        assert secret not in out, out
    assert out.split("://")[1].split("/")[0].split("?")[0] in ("mlflow:5000", "h")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    if "@" in uri:  # the password reaches MLflow whole, through its variable
        move_uri_credentials_to_env(uri)
        import os

        assert os.environ["MLFLOW_TRACKING_PASSWORD"] == uri.split("://")[1].split(":", 1)[1].rsplit("@mlflow", 1)[0]


def test_item14_time_bound():
    """redact_uri on a long hostile string stays linear (no catastrophic backtracking in the userinfo rule)."""
    from damage.tasks.core.secrets import redact_uri

    hostile = "http://u:" + "@" * 20000 + "x"
    t0 = time.perf_counter()
    redact_uri(hostile)
    t1 = time.perf_counter()
    redact_uri("http://u:" + "@" * 40000 + "x")
    # twice the input may cost more, never orders of magnitude more (a ratio, not an absolute time)
    assert time.perf_counter() - t1 < 50 * max(t1 - t0, 1e-3)


# --- item 9: --overwrite replaces the auto-discovered COCO images folder ------------------------------

def _coco(root, file_name: str, segmentation=None):
    import cv2
    import numpy as np

    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    cv2.imwrite(str(root / "train2017" / "a.png"), np.full((32, 32, 3), 99, np.uint8))
    seg = segmentation or [[2, 2, 20, 2, 20, 20, 2, 20]]
    js = root / "annotations" / "instances_train2017.json"
    js.write_text(json.dumps({"images": [{"id": 1, "file_name": file_name, "width": 32, "height": 32}],
                              "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": seg,
                                               "bbox": [2, 2, 18, 18], "area": 300, "iscrowd": 0}],
                              "categories": [{"id": 1, "name": "dent"}]}))
    return js


def test_item9_overwrite_never_replaces_the_discovered_images_folder(tmp_path):
    from damage.tasks.data.dataset import DatasetError
    from damage.tasks.data.importer import import_dataset

    js = _coco(tmp_path / "cardd", "a.png")
    images = tmp_path / "cardd" / "train2017"
    with pytest.raises(DatasetError, match="images folder"):
        import_dataset(js, images, overwrite=True)
    assert (images / "a.png").is_file() and sorted(p.name for p in images.iterdir()) == ["a.png"]


# --- item 15: hostile COCO values and the CLI's own error path ------------------------------------------

def _damage(*args, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "DAMAGE_STATE_DIR": str(tmp_path / "s"), "COLUMNS": "400"}
    env.pop("DAMAGE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "damage.flows.cli", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("case", ["nul", "rle"])
def test_item15_hostile_coco_is_one_line_error(case, tmp_path):
    seg = {"size": [32, 32], "counts": [2**62, 2**62, 5]} if case == "rle" else None
    js = _coco(tmp_path / "c", "a\u0000.png" if case == "nul" else "a.png", seg)
    p = _damage("data", "import", str(js), str(tmp_path / "out"), tmp_path=tmp_path)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr and "has no 'Abort'" not in p.stderr and "AttributeError" not in p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error:"), p.stderr[-2000:]


def test_item15_cli_error_path_handles_unexpected_errors(monkeypatch, capsys):
    """An unexpected exception inside a command: one line and exit 1 (typer 0.29.2's missing `Abort`)."""
    import typer

    from damage.flows.common import DamageGroup

    app = typer.Typer(cls=DamageGroup)

    @app.command()
    def boom() -> None:
        raise RuntimeError("kaboom http://u:pw@h:1")

    @app.command()
    def other() -> None:
        pass

    monkeypatch.delenv("DAMAGE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        typer.main.get_command(app).main(["boom"], prog_name="damage")
    err = capsys.readouterr().err
    assert e.value.code == 1 and "RuntimeError: kaboom" in err and "pw" not in err


# --- item 11: an ONNX graph with a huge fixed input, or a large damage.max_pixels -------------------------

def test_item11_predictor_bounds_come_from_the_project_not_the_file(tmp_path):
    import onnx

    from damage.tasks.core.errors import DamageError
    from damage.tasks.core.images import DEFAULT_MAX_PIXELS
    from damage.tasks.serving.predictor import Predictor
    from tests.unit.test_issue13_serving import fake_onnx

    huge = fake_onnx(tmp_path / "huge.onnx", [(10, 10, 50, 50)])
    m = onnx.load(str(huge))
    for d in m.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.dim_value = 60000  # harmless metadata, a 60000x60000 fixed input: 10.8 GB per batch
    onnx.save(m, str(huge))
    with pytest.raises(DamageError, match=r"huge\.onnx: fixed ONNX input \[60000, 60000\] is outside"):
        Predictor(huge)
    raised = fake_onnx(tmp_path / "raised.onnx", [(10, 10, 50, 50)], {"damage.max_pixels": str(2**40)})
    assert Predictor(raised).max_pixels == DEFAULT_MAX_PIXELS  # the file may lower the limit, never raise it
    lowered = fake_onnx(tmp_path / "lowered.onnx", [(10, 10, 50, 50)], {"damage.max_pixels": "4096"})
    assert Predictor(lowered).max_pixels == 4096


# --- item 8: a data.yaml with `path: /` and an absolute split ------------------------------------------

def test_item8_data_yaml_paths_stay_inside_the_dataset(tmp_path):
    import yaml

    from damage.tasks.data.dataset import DatasetError, load_data_yaml
    from damage.tasks.data.importer import import_dataset
    from damage.tasks.data.synth import generate_dataset

    secret = tmp_path / "elsewhere" / "images"
    real = generate_dataset(tmp_path / "real", images=4, seed=0, imgsz=64)
    secret.parent.mkdir()
    (tmp_path / "real" / "images").rename(secret)  # images outside any dataset folder
    ds = tmp_path / "hostile"
    ds.mkdir()
    names = yaml.safe_load(real.read_text())["names"]
    for spec, what in (({"path": "/", "train": str(secret), "val": str(secret)}, "a folder above"),
                       ({"train": str(secret), "val": str(secret)}, "lies outside the dataset root"),
                       ({"path": "../..", "train": "elsewhere/images", "val": "elsewhere/images"}, "a folder above")):
        (ds / "data.yaml").write_text(yaml.safe_dump({**spec, "names": names}))
        with pytest.raises(DatasetError, match=what):
            load_data_yaml(ds / "data.yaml")
        with pytest.raises(DatasetError, match=str(ds / "data.yaml")):
            import_dataset(ds, tmp_path / f"out-{len(what)}")
        assert not (tmp_path / f"out-{len(what)}").exists()
    # a data.yaml elsewhere whose absolute `path:` names its dataset (what the state dir's resolved copies are)
    (tmp_path / "copy.yaml").write_text(yaml.safe_dump({"path": str(secret.parent), "train": "images",
                                                        "val": "images", "names": names}))
    assert load_data_yaml(tmp_path / "copy.yaml").root == secret.parent
