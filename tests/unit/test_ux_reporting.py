"""Model card, run summary markdown, UI links, notifications (against a loopback HTTP endpoint)."""

from __future__ import annotations

import socket

import pytest

from tests.recording_http import Recorder


def _notify_cfg(*urls, events=("failure", "approval", "promotion")):
    from damage.tasks.core.config import NotifyConfig

    return NotifyConfig(urls=list(urls), events=list(events), timeout_s=5)


def test_notify_posts_to_every_url():
    from damage.tasks.core.notify import failure_message, send

    with Recorder() as a, Recorder() as b:
        title, body = failure_message("train", "RuntimeError('boom')", "http://mlflow/#/x")
        assert send(_notify_cfg(a.json_url("a"), b.json_url("b")), "failure", title, body) is True
    for rec, path in ((a, "/a"), (b, "/b")):
        assert len(rec.posts) == 1 and rec.posts[0][0] == path
        msg = rec.posts[0][1]
        assert "train" in msg["title"] and "boom" in msg["message"] and "http://mlflow/#/x" in msg["message"]
        assert msg["type"] == "failure"


def test_notify_event_filter_and_no_urls():
    from damage.tasks.core.notify import send

    with Recorder() as r:
        assert send(_notify_cfg(r.json_url(), events=["failure"]), "promotion", "t", "b") is False
        assert send(_notify_cfg(), "failure", "t", "b") is False
    assert r.posts == []
    with pytest.raises(ValueError, match="unknown notification event"):
        send(_notify_cfg(), "nope", "t", "b")


def test_notify_failure_to_send_never_raises(caplog):
    from damage.tasks.core.notify import send

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    with Recorder(status=500) as bad:
        cfg = _notify_cfg(f"json://127.0.0.1:{dead}/x?token=SECRET123", bad.json_url(), "notaurl://zzz")
        with caplog.at_level("WARNING"):
            assert send(cfg, "failure", "t", "b") is False
    assert len(bad.posts) == 1  # the reachable endpoint still got it
    assert "SECRET123" not in caplog.text  # URLs are secrets: never logged


def test_notify_urls_are_secret_in_config_dump_and_hash():
    from damage.tasks.core.config_load import load_config

    a = load_config(overrides=['notify.urls=["json://h/x?token=SECRET123"]'])
    b = load_config()
    assert "SECRET123" not in str(a.to_dict()) and "SECRET123" not in repr(a)
    assert a.hash() != "" and a.notify.urls[0].get_secret_value().endswith("SECRET123")
    assert a.to_dict()["notify"]["urls"] == ["**********"] and b.to_dict()["notify"]["urls"] == []


def test_approval_message_has_the_command_and_metrics():
    from damage.tasks.core.notify import approval_message

    title, body = approval_message("damage-seg", 7, {"mask/mAP50": 0.51234}, "http://x/#/models/damage-seg/versions/7")
    assert "v7" in title
    assert 'damage registry approve damage-seg 7 --by YOU --reason "..."' in body
    assert "mask/mAP50: 0.512" in body


def test_links_open_the_model_training_view():
    from damage.tasks.core import links

    assert links.mlflow_run_url("3", "abc", "http://h:5000/") == \
        "http://h:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert links.mlflow_experiment_url("3", "http://h:5000").endswith(
        "/#/experiments/3/runs?workflowType=machine_learning&orderByKey=attributes.start_time&orderByAsc=true")
    assert links.mlflow_base(None, "http://srv:8080/") == "http://srv:8080"
    assert links.mlflow_base(None, "sqlite:///x.db") == links.DEFAULT_MLFLOW_UI
    assert links.mlflow_version_url("damage seg", 2, "http://h").endswith("/#/models/damage%20seg/versions/2")


def test_model_card_lists_per_class_and_operating_point():
    from damage.model_registry.card import model_card

    per_class = [{"class": "dent", "images": 3, "instances": 5, "box/AP50": 0.5, "box/AP50-95": 0.25,
                  "mask/AP50": 0.45678, "mask/AP50-95": 0.2},
                 {"class": "crack", "images": 0, "instances": 0, "box/AP50": None, "box/AP50-95": None,
                  "mask/AP50": None, "mask/AP50-95": None}]
    md = model_card("damage-seg", 4, {"mask/mAP50": 0.4, "latency_ms": 12.345}, per_class,
                    {"conf": 0.4, "iou": 0.5, "objective": "mask_f1", "value": 0.61},
                    objective_help="max mask F1", flat_objective=True, dataset_fingerprint="abcd1234",
                    dataset_sizes={"images/train": 18}, trained_from="3", kind="int8-static",
                    source_run_url="http://m/#/experiments/1/runs/r?workflowType=machine_learning",
                    flow_run_url="http://p/runs/flow-run/f", family="yolo11")
    assert "**Family:** yolo11" in md
    assert "| dent | 3 | 5 | 0.500 | 0.250 | 0.457 | 0.200 |" in md
    assert "| crack | 0 | 0 | – | – | – | – |" in md
    assert "conf **0.4**, NMS IoU **0.5**" in md and "mask_f1" in md and "flat across the grid" in md
    assert "`abcd1234`" in md and "images/train: 18" in md and "version 3" in md and "int8-static" in md
    assert "| latency (ms/image, pre+inference+post) | 12.3 on" in md
    assert "[source MLflow run](http://m/#/experiments/1/runs/r?workflowType=machine_learning)" in md
    assert "[Prefect flow run](http://p/runs/flow-run/f)" in md


def test_summary_markdown_has_figures_gate_and_links():
    from damage.tasks.nightly.reporting import summary_markdown

    s = {"metrics": {"mask/mAP50": 0.3333}, "per_class": [{"class": "dent", "instances": 2, "mask/AP50": 0.1}],
         "promotion": {"passed": True, "reasons": ["first candidate"]}, "registered_model": "damage-seg",
         "registered_version": "2", "mlflow_run_id": "r1", "operating_point": {"conf": 0.4, "iou": 0.5,
                                                                              "objective": "mask_f1"}}
    md = summary_markdown(s, {"mlflow_run_url": "http://m:5000/#/experiments/1/runs/r1?workflowType=machine_learning"})
    assert "| mask/mAP50 | 0.333 |" in md and "| dent | 2 |" in md and "passed: staging" in md
    assert "(http://m:5000/#/models/damage-seg/versions/2)" in md
    assert "[MLflow run r1](http://m:5000/#/experiments/1/runs/r1?workflowType=machine_learning)" in md


def test_reporting_keys_do_not_change_the_pipeline_key():
    from damage.tasks.core.config_load import load_config
    from damage.tasks.nightly.skip import skip_config_hash

    base = skip_config_hash(load_config())
    for o in ('notify.urls=["json://h/x"]', "notify.events=[failure]", "mlflow.system_metrics_interval_s=0",
              "mlflow.ui_url=http://m:5000"):
        assert skip_config_hash(load_config(overrides=[o])) == base, o
    assert skip_config_hash(load_config(overrides=["train.epochs=3"])) != base
