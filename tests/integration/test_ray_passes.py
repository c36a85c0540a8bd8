"""``--ray`` on the per-image passes (evaluate, sweep, data issues, the data gate's scan): Ray workers give
exactly what the single-process path gives; a worker killed mid-batch loses and doubles no item; a worker's
own error reaches the user as it is."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import die_once

pytestmark = pytest.mark.integration


def _ray_cfg(**kw):
    from damage.tasks.core.config import RayConfig

    # 2 workers, small batches: every split is cut into several batches over both workers
    return RayConfig(**{"workers": 2, "worker_threads": 1, "batch_size": 3, **kw})


@pytest.fixture(scope="module")
def onnx_model(tiny_model, tmp_path_factory) -> Path:
    from damage.tasks.export.onnx import export_onnx

    return export_onnx(tiny_model, tmp_path_factory.mktemp("ray-passes") / "tiny.onnx", 96)


def _fresh_process(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a newly spawned process, as ``damage evaluate`` / ``damage data issues`` run
    without ``--ray``: the single-process side of the comparisons. Not this test process: it trained the
    session's models in-process first, and after that its near-floor detections (conf ~0.0018) differed from
    both a fresh process and the Ray workers on an AMD EPYC (AVX512_BF16): the same ONNX, data and settings gave
    identical rows fresh vs Ray (95 of 95), while this process found 12 detections where they found 11."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        return ex.submit(fn, *args, **kwargs).result(timeout=900)


def _same(a, b) -> bool:
    """Equal as JSON (NaN equal to NaN, tuples as lists)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


@pytest.mark.parametrize("fmt", ["pt", "onnx"])
def test_collect_on_ray_equals_single_process(ray_local, tiny_model, onnx_model, tiny_dataset, fmt):
    """Every image's matched detections, damage errors and confusion counts, per NMS IoU, are identical."""
    from damage.tasks.evaluation.evaluate import collect

    model = tiny_model if fmt == "pt" else onnx_model
    args = dict(split="train", ious=(0.5, 0.7), op_confs=(0.001, 0.01), confusion=True)
    local = _fresh_process(collect, model, tiny_dataset, **args)
    on_ray = collect(model, tiny_dataset, ray=_ray_cfg(), **args)
    assert len(local.truths) == len(on_ray.truths) == 18
    assert [t.name for t in on_ray.truths] == [t.name for t in local.truths]  # index order, not arrival order
    for iou in (0.5, 0.7):
        for kind in ("map_scores", "op_scores"):
            a, b = getattr(local, kind)[iou], getattr(on_ray, kind)[iou]
            for sa, sb in zip(a, b, strict=True):
                for f in ("conf", "cls", "tp_box", "tp_mask"):
                    np.testing.assert_array_equal(getattr(sa, f), getattr(sb, f))
                assert _same(sa.damage, sb.damage)
    assert sum(len(s.conf) for s in local.map_scores[0.7]) > 0  # real detections are compared, not empty lists
    np.testing.assert_array_equal(local.confusion.matrix, on_ray.confusion.matrix)
    assert local.confusion.matrix.sum() > 0


def test_evaluate_and_sweep_cli_on_ray_match(ray_local, onnx_model, tiny_dataset, tmp_path):
    """``damage evaluate --ray`` / ``damage sweep --ray``: the same figures as without Ray (speed aside)."""
    from typer.testing import CliRunner

    from damage.flows.cli import app

    common = ["--state-dir", str(tmp_path / "s"), "--set", "ray.workers=2", "--set", "ray.batch_size=2"]
    docs = {}
    for cmd in ("evaluate", "sweep"):
        for flag in ("--no-ray", "--ray"):
            r = CliRunner().invoke(app, [*common, cmd, str(onnx_model), "--data", str(tiny_dataset), "--split",
                                         "train", "--no-mlflow", "--json", flag])
            assert r.exit_code == 0, r.output
            docs[cmd, flag] = json.loads(r.stdout)
    ev_local, ev_ray = docs["evaluate", "--no-ray"], docs["evaluate", "--ray"]
    timing = {"latency_ms"} | {k for k in ev_local["metrics"] if k.startswith("speed/")}
    assert timing and ev_local["metrics"]["images"] == 18
    assert _same({k: v for k, v in ev_ray["metrics"].items() if k not in timing},
                 {k: v for k, v in ev_local["metrics"].items() if k not in timing})
    assert _same(ev_ray["per_class"], ev_local["per_class"])
    sw_local, sw_ray = docs["sweep", "--no-ray"], docs["sweep", "--ray"]
    assert len(sw_local["rows"]) > 1
    assert _same(sw_ray["rows"], sw_local["rows"]) and _same(sw_ray["thresholds"], sw_local["thresholds"])


def test_label_issues_on_ray_rank_the_same_rows(ray_local, onnx_model, tiny_dataset, tmp_path):
    from damage.tasks.core.config import LabelIssuesConfig
    from damage.tasks.evaluation.label_issues import mine_label_issues

    cfg = LabelIssuesConfig(splits=["train", "val"])
    local = _fresh_process(mine_label_issues, tiny_dataset, cfg, model=onnx_model, out_dir=tmp_path / "local")
    on_ray = mine_label_issues(tiny_dataset, cfg, model=onnx_model, out_dir=tmp_path / "ray", ray=_ray_cfg())
    assert len(local.rows) > 0
    assert _same(on_ray.rows, local.rows)
    assert (tmp_path / "ray" / "label_issues.csv").read_bytes() == (tmp_path / "local" / "label_issues.csv").read_bytes()


def test_data_gate_scan_on_ray_gives_the_same_report_and_profile(ray_local, tiny_dataset, tmp_path):
    from damage.tasks.core.config import ValidateConfig
    from damage.tasks.validation.validate import validate_dataset

    cfg = ValidateConfig(workers=1, chunk_size=4)  # 24 images: six Ray tasks
    local = validate_dataset(tiny_dataset, cfg, report_path=tmp_path / "local" / "report.json")
    on_ray = validate_dataset(tiny_dataset, cfg, report_path=tmp_path / "ray" / "report.json", ray=_ray_cfg())
    assert local.report["summary"]["images"] == 24
    assert _same(on_ray.report, local.report)
    assert _same(on_ray.profile, local.profile)


def _crash_once(marker: str):
    """A factory whose per-item function kills its worker process on its second batch, once in the whole run
    (``O_EXCL`` on ``marker``); otherwise item i -> i*i."""

    def build():
        maybe_die = die_once(marker)

        def fn(ids):
            maybe_die()
            return [i * i for i in ids]

        return fn

    return build


def test_killed_worker_is_retried_without_loss_or_double_count(ray_local, tmp_path):
    from damage.tasks.scale.shards import map_indices

    marker = tmp_path / "crashed"
    seen: list[int] = []
    out = map_indices(40, _crash_once(str(marker)), {}, _ray_cfg(batch_size=4), on_result=lambda i, r: seen.append(i))
    assert marker.exists()  # a worker did die mid-run
    assert out == [i * i for i in range(40)]
    assert sorted(seen) == list(range(40))  # each item reported once


def _failing_on(bad: int | None):
    """A factory whose worker fails with the user's error: when built (``bad`` None) or on item ``bad``."""

    def build():
        from damage.tasks.core.errors import DamageError

        if bad is None:
            raise DamageError("model.onnx: cannot load model on this worker")

        def fn(ids):
            if bad in ids:
                raise DamageError(f"item {bad}: unreadable image")
            return list(ids)

        return fn

    return build


@pytest.mark.parametrize("bad, message", [(7, "item 7: unreadable image"),
                                          (None, "model.onnx: cannot load model on this worker")])
def test_a_workers_own_error_reaches_the_user_unwrapped(ray_local, bad, message):
    from damage.tasks.core.errors import DamageError
    from damage.tasks.scale.shards import map_indices

    with pytest.raises(DamageError) as e:
        map_indices(12, _failing_on(bad), {}, _ray_cfg())
    assert str(e.value) == message


def test_a_bad_model_on_ray_is_a_one_line_error(ray_local, tiny_dataset, tmp_path):
    from typer.testing import CliRunner

    from damage.flows.cli import app

    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not an onnx file")
    r = CliRunner().invoke(app, ["--state-dir", str(tmp_path / "s"), "evaluate", str(bad), "--data",
                                 str(tiny_dataset), "--no-mlflow", "--ray"])
    assert r.exit_code == 2
    assert "broken.onnx" in r.output and "cannot load model" in r.output
