"""``damage registry list/history`` fit an 80-column terminal and give JSON with ``--json``."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tests.helpers import LINEAGE, sqlite_client


def _register(c, name: str, n: int, folder) -> str:
    """``n`` versions of ``name`` (mask mAP50-95 0.25, 0.35, ...); the last one passed the gate and holds
    ``staging`` through ``set_staging``, so the alias history has one recorded move. Returns that version."""
    import damage.model_registry as mr

    exp = c.get_experiment_by_name("t")
    # artifacts under the test's folder: without a location MLflow writes ./mlruns in the working directory
    eid = exp.experiment_id if exp else c.create_experiment("t", artifact_location=(folder / "art").as_uri())
    f = folder / "a.onnx"
    f.write_bytes(b"x")
    for k in range(n):  # one source run per version: registration is idempotent per source run
        run_id = c.create_run(eid).info.run_id
        v = mr.register_candidate(c, name, run_id, f, None, {"mask/mAP50-95": 0.25 + k / 10,
                                                              "box/mAP50-95": 0.3}, {"conf": 0.3}, LINEAGE)
    c.set_model_version_tag(name, v.version, "validation_status", "passed")
    mr.set_staging(c, name, v.version, by="gate-test", reason="passed the gate")
    return v.version


@pytest.fixture(scope="module")
def registry_uri(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-tables")
    c = sqlite_client(d)
    _register(c, "tbl-m", 3, d)
    return c.tracking_uri


def _run(args, columns=80):
    from damage.flows.cli import app

    return CliRunner().invoke(app, args, env={"COLUMNS": str(columns), "TERM": "dumb"})


def test_registry_list_fits_80_columns_without_truncated_words(registry_uri):
    r = _run(["registry", "list", "tbl-m", "--tracking-uri", registry_uri])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert max(len(x) for x in lines) <= 80, "\n".join(lines)
    assert "…" not in r.stdout  # no "versi…", "stagi…"
    for word in ("staging", "pending", "approval", "aliases", "0.450"):
        assert word in r.stdout, r.stdout
    assert "columns left out" in r.stdout  # it says what it dropped
    wide = _run(["registry", "list", "tbl-m", "--tracking-uri", registry_uri], columns=200)
    assert "created" in wide.stdout and "columns left out" not in wide.stdout


def test_registry_list_and_history_json(registry_uri):
    r = _run(["registry", "list", "tbl-m", "--tracking-uri", registry_uri, "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)  # stdout is only the JSON document
    assert sorted(d["version"] for d in data) == ["1", "2", "3"]
    v3 = next(d for d in data if d["version"] == "3")
    assert v3["aliases"] == ["staging"] and v3["metrics"]["mask/mAP50-95"] == pytest.approx(0.45)
    h = _run(["registry", "history", "tbl-m", "--tracking-uri", registry_uri, "--json"])
    assert h.exit_code == 0, h.output
    (move,) = json.loads(h.stdout)  # the fixture's one recorded move, as a JSON object
    assert {k: move[k] for k in ("alias", "version_from", "version_to", "action", "by", "reason")} == {
        "alias": "staging", "version_from": None, "version_to": "3", "action": "gate", "by": "gate-test",
        "reason": "passed the gate"}
    assert move["seq"] >= 0 and move["at"]


def test_fit_columns_drops_lowest_priority_first():
    from damage.flows.tables import Col, fit_columns

    cols = [Col("a", "A", 1), Col("b", "B", 3), Col("c", "C", 2)]
    rows = [{"a": "x" * 40, "b": "y" * 20, "c": "z" * 20}]
    kept, dropped = fit_columns(cols, rows, 80)
    assert [c.key for c in kept] == ["a", "c"] and [c.key for c in dropped] == ["b"]
    kept, dropped = fit_columns(cols, rows, 200)
    assert not dropped


def test_approve_sends_a_promotion_notification(tmp_path):
    from tests.recording_http import Recorder

    c = sqlite_client(tmp_path)  # its own registry: approving changes what the tests above read
    v = _register(c, "tbl-a", 2, tmp_path)
    with Recorder() as rec:
        cfg = tmp_path / "notify.yaml"
        cfg.write_text(f"notify:\n  urls: ['{rec.json_url('promo')}']\n")
        r = _run(["registry", "approve", "tbl-a", v, "--by", "alice", "--reason", "checked overlays",
                  "--tracking-uri", c.tracking_uri, "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    (path, msg), = rec.posts
    assert path == "/promo" and f"v{v} promoted to production" in msg["title"]
    assert "alice" in msg["message"] and "checked overlays" in msg["message"]
    assert f"/#/models/tbl-a/versions/{v}" in msg["message"]
