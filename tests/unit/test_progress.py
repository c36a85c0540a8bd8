"""Progress bars draw only on an interactive terminal; outside a Prefect run nothing is sent."""

from __future__ import annotations

import io
import sys


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_quiet_when_stderr_is_not_a_terminal(capfd):
    from damage.tasks.core.progress import interactive, iterate

    assert not interactive()  # pytest captures stderr: not a TTY
    assert list(iterate(range(50), "unit-progress", "items")) == list(range(50))
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_bar_draws_on_a_terminal_unless_disabled(monkeypatch):
    from damage.tasks.core import progress

    tty = _TTY()
    monkeypatch.setattr(sys, "stderr", tty)
    assert progress.interactive()
    with progress.track("unit-progress", "items", 3) as bar:
        assert bar._bar is not None
        for _ in range(3):
            bar.advance()
        assert bar.done == 3
    assert bar._bar is None  # stopped
    monkeypatch.setenv("DAMAGE_PROGRESS", "0")
    assert not progress.interactive()
    with progress.track("unit-progress", "items", 3) as bar:
        assert bar._bar is None


def test_artifact_updates_once_per_chunk(monkeypatch):
    from damage.tasks.core import progress

    sent = []
    monkeypatch.setattr("damage.tasks.core.prefect_ui.Progress.update", lambda self, p: sent.append(round(p, 1)))
    with progress.track("unit-progress", "items", 100, artifact_every=32) as bar:
        for _ in range(100):
            bar.advance()
    assert sent == [32.0, 64.0, 96.0, 100.0]
