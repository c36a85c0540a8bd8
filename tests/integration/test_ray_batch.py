"""``damage predict --ray``: Ray Data workers read images straight from S3 (moto on loopback) and write what
the single-process path writes, byte for byte; a worker killed mid-batch loses no image and doubles none."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import S3_BUCKET

from tests.helpers import die_once

pytestmark = pytest.mark.integration

N_IMAGES = 40


@pytest.fixture(scope="module")
def real_onnx(tiny_model, tmp_path_factory) -> Path:
    """The session's 1-epoch model, exported (a real network: scores differ per image)."""
    from damage.tasks.export.onnx import export_onnx

    return export_onnx(tiny_model, tmp_path_factory.mktemp("ray-batch") / "tiny.onnx", 96)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    from damage.tasks.data.synth import generate_dataset

    data = generate_dataset(tmp_path_factory.mktemp("ray-photos") / "ds", images=N_IMAGES, seed=5, imgsz=96,
                            val_fraction=0.25)
    imgs = sorted(data.parent.glob("images/*/*.png"))
    assert len(imgs) == N_IMAGES
    return imgs


def test_predict_ray_from_s3_equals_single_process(ray_local, moto_s3, real_onnx, photos, tmp_path, monkeypatch):
    import boto3
    from typer.testing import CliRunner

    from damage.flows.cli import app

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_s3)
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    s3 = boto3.client("s3", endpoint_url=moto_s3)
    for p in photos:  # one level of "folders" in the keys: listing is recursive under the prefix
        s3.put_object(Bucket=S3_BUCKET, Key=f"claims/{p.parent.name}/{p.name}", Body=p.read_bytes())
    src = f"s3://{S3_BUCKET}/claims"
    # a confidence low enough that the 1-epoch model reports instances
    common = ["--state-dir", str(tmp_path / "s"), "--set", "ray.worker_threads=1", "--set", "ray.batch_size=4",
              "--set", "predictor.threads=1"]
    args = ["predict", src, "--model", str(real_onnx), "--conf", "0.0001"]
    r1 = CliRunner().invoke(app, [*common, *args, "--out", str(tmp_path / "local"), "--no-ray"])
    assert r1.exit_code == 0, r1.output
    r2 = CliRunner().invoke(app, [*common, *args, "--out", str(tmp_path / "ray"), "--ray"])
    assert r2.exit_code == 0, r2.output
    assert "Ray:" in r2.output and f"predicted {N_IMAGES}/{N_IMAGES}" in r2.output

    local = {p.name: p.read_bytes() for p in (tmp_path / "local").iterdir()}
    ray = {p.name: p.read_bytes() for p in (tmp_path / "ray").iterdir()}
    assert local.keys() == ray.keys()
    assert len([n for n in local if n.endswith(".json") and n != "index.json"]) == N_IMAGES
    assert len([n for n in local if n.endswith(".png")]) == N_IMAGES
    differ = [n for n in local if local[n] != ray[n]]
    assert not differ, f"Ray output differs from the single-process output in {differ[:5]}"
    index = json.loads(local["index.json"])
    assert [e["image"] for e in index] == sorted(e["image"] for e in index)  # input order, not arrival order
    assert all(e["image"].startswith(src + "/") for e in index)
    assert sum(e["instances"] for e in index) > 0  # the comparison covers real instances, not empty lists


def _crash_once_predictor(marker: str):
    """A predictor factory whose first predictor, in whichever worker builds it, kills its process on its
    second batch (``O_EXCL``: exactly one crash in the run)."""
    from damage.tasks.scale.batch import build_predictor

    def make(path, settings, threads):
        pred = build_predictor(path, settings, threads)
        real, maybe_die = pred.predict, die_once(marker)

        def predict(*a, **kw):
            maybe_die()  # the worker process dies mid-batch, after one image of it was done
            return real(*a, **kw)

        pred.predict = predict
        return pred

    return make


def test_worker_killed_mid_batch_is_retried_without_loss_or_double_count(ray_local, real_onnx, photos, tmp_path):
    from damage.tasks.core.config import RayConfig
    from damage.tasks.scale.batch import PredictorSettings, predict_on_ray

    marker = tmp_path / "crashed"
    sources = [str(p) for p in photos]
    rows = list(predict_on_ray(real_onnx, sources, PredictorSettings(conf=0.01), RayConfig(workers=2, batch_size=4),
                               model_label="m", overlay=False, make_predictor=_crash_once_predictor(str(marker))))
    assert marker.exists()  # a worker did die
    assert len(rows) == len(sources) and sorted(r.source for r in rows) == sorted(sources)
    assert not any(r.failed for r in rows)


def test_unreadable_image_is_an_error_row_not_a_retry(ray_local, real_onnx, photos, tmp_path):
    from damage.tasks.core.config import RayConfig
    from damage.tasks.scale.batch import PredictorSettings, predict_on_ray

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    sources = [str(photos[0]), str(bad), str(tmp_path / "missing.png")]
    rows = {r.source: r for r in predict_on_ray(real_onnx, sources, PredictorSettings(), RayConfig(workers=1),
                                                model_label="m", overlay=False)}
    assert not rows[str(photos[0])].failed
    assert "not a readable image" in rows[str(bad)].doc["error"]
    assert "not found" in rows[str(tmp_path / "missing.png")].doc["error"]
