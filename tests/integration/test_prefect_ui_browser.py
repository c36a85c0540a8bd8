"""Prefect's default UI lists the task runs of a flow run whose tasks take a subflow's result (the
nightly's shape: register, promotion-gate, model-card, ... take the compress subflow's result).

Checked in a real browser: Debian's headless ``chromium`` loads the flow run page from a Prefect
server on loopback, opens the Task Runs tab and reads what it rendered. The control flow hands the
subflow's result on directly: the UI then shows "No task runs" (console: "Invalid TaskInputResponse"),
so the check can fail.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from tests.integration.browser import Browser, chromium_binary
from tests.integration.conftest import clean_env, free_port, run_process

pytestmark = pytest.mark.skipif(chromium_binary() is None,
                                reason="no chromium binary on PATH (Debian: apt-get install chromium)")

# The nightly's shape in small: a task, a subflow returning a dict, tasks taking (parts of) it.
FLOW = textwrap.dedent("""
    import sys
    from prefect import flow
    from damage.tasks.core.prefect_tasks import adopt_subflow_result, as_task

    def first(x): return {"a": x}
    def use(d): return len(d)

    @flow(name="pick")
    def pick(x: int) -> dict:
        return {"name": "int8", "table": [0.5, 0.7], "metrics": {"mask/mAP50": 0.6}}

    @flow(name=sys.argv[1])
    def shape(adopt: bool) -> None:
        a = as_task(first, "first")(1)
        chosen = pick(2)
        if adopt:
            chosen = adopt_subflow_result(chosen, "pick-result")
        as_task(use, "register")(chosen)
        as_task(use, "summary")({"compression": {"name": chosen["name"], "table": chosen["table"]}})
        as_task(use, "other")(a)

    if __name__ == "__main__":
        shape(sys.argv[1] == "adopted")
""")


@pytest.fixture(scope="module")
def prefect_ui(tmp_path_factory):
    """``prefect server start`` with its default UI on a loopback port; yields the base URL."""
    home = tmp_path_factory.mktemp("prefect-ui")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = clean_env(PREFECT_HOME=str(home), PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port),
                    PREFECT_UI_API_URL=f"{base}/api")
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
           "--analytics-off"]
    with run_process(cmd, home / "server.log", f"{base}/api/health", "prefect server", env=env, timeout_s=300):
        yield base


def _run_flow(base: str, name: str, tmp_path) -> str:
    """Run the shape flow against the server; returns its flow run id."""
    from pathlib import Path

    script = tmp_path / "shape.py"
    script.write_text(FLOW)
    root = str(Path(__file__).resolve().parents[2])
    env = clean_env(PREFECT_API_URL=f"{base}/api", PYTHONPATH=root, PREFECT_HOME=str(tmp_path / "prefect-client"))
    subprocess.run([sys.executable, str(script), name], env=env, check=True, cwd=root, timeout=300,
                   capture_output=True)
    import json
    import urllib.request

    req = urllib.request.Request(f"{base}/api/flow_runs/filter", method="POST",
                                 headers={"Content-Type": "application/json"},
                                 data=json.dumps({"flows": {"name": {"any_": [name]}}}).encode())
    with urllib.request.urlopen(req, timeout=30) as r:
        runs = json.load(r)
    assert len(runs) == 1, runs
    return runs[0]["id"]


def _task_runs_tab(base: str, flow_run_id: str) -> tuple[str, list[str]]:
    """The Task Runs tab's rendered text once its list settled, and the browser console."""
    with Browser() as b:
        b.goto(f"{base}/runs/flow-run/{flow_run_id}")
        b.wait_for_text("Task Runs", timeout_s=90)
        b.click_text("Task Runs")
        deadline = time.monotonic() + 60
        text = b.wait_for_text("Task runs")
        # settled: the list shows rows (the task "first" is in every variant) or says it has none
        while time.monotonic() < deadline and not any(
                s in text.split("Oldest to Newest")[-1] for s in ("No task runs", "first")):
            time.sleep(0.5)
            text = b.text()
        return text, b.console


def test_default_ui_lists_task_runs_that_take_a_subflow_result(prefect_ui, tmp_path):
    flow_run = _run_flow(prefect_ui, "adopted", tmp_path)
    text, console = _task_runs_tab(prefect_ui, flow_run)
    listed = text.split("Oldest to Newest")[-1]
    for task in ("register", "summary", "other", "first", "pick-result"):
        assert task in listed, listed
    assert "No task runs" not in text
    assert not any("Invalid TaskInputResponse" in m for m in console), console


def test_control_subflow_result_passed_directly_hides_them(prefect_ui, tmp_path):
    """The failure the fix removes, seen by the same check (Prefect 3.9's default UI)."""
    flow_run = _run_flow(prefect_ui, "direct", tmp_path)
    text, console = _task_runs_tab(prefect_ui, flow_run)
    assert "No task runs" in text, text
    assert any("Invalid TaskInputResponse" in m for m in console), console
