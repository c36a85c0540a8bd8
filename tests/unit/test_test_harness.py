"""The suite's own harness (tests/conftest.py): nothing a test does in-process leaves the next tests a broken logger
or a fixed terminal width, whichever order the tests run in (pytest-xdist reorders them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

FIRST_IMPORTS_IN_A_CLIRUNNER = '''
import logging

import typer
from typer.testing import CliRunner

app = typer.Typer()


@app.command()
def first():
    import prefect.main  # noqa: F401  what the first Prefect flow or task of a session imports
    import damage.flows.common  # noqa: F401  the CLI's consoles


@app.command()
def second():
    pass


def test_1_a_cli_test_is_the_first_to_import_prefect_and_the_consoles():
    assert CliRunner().invoke(app, ["first"], env={"COLUMNS": "33"}).exit_code == 0


def test_2_prefect_logs_to_an_open_stream_and_tables_follow_the_terminal():
    from prefect.logging.handlers import PrefectConsoleHandler

    from damage.flows.common import console

    handlers = [h for name in [None, *logging.root.manager.loggerDict]
                for h in getattr(logging.getLogger(name), "handlers", []) if isinstance(h, PrefectConsoleHandler)]
    assert handlers
    assert not [h for h in handlers if h.stream.closed], "a Prefect console handler writes to a closed stream"
    assert console.width != 33, "the CLI console kept the width of the test that created it"
'''


def test_a_first_import_inside_clirunner_leaves_no_closed_log_stream_and_no_fixed_width(tmp_path):
    (tmp_path / "test_order.py").write_text(FIRST_IMPORTS_IN_A_CLIRUNNER)
    env = {**os.environ, "DAMAGE_TEST_STATE": str(tmp_path / "state"), "PYTHONPATH": str(REPO)}
    env.pop("COLUMNS", None)
    env.pop("PYTEST_XDIST_WORKER", None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                        "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_order.py")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "2 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
