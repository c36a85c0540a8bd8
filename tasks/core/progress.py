"""Progress of long steps: a rich bar on an interactive terminal, a Prefect progress artifact
inside a flow run, silence otherwise.

The bar draws on stderr only when stderr is a terminal (logs, CI and pipes stay clean); the
Prefect artifact (``damage.tasks.core.prefect_ui.Progress``) is updated every ``artifact_every`` items
so a long scan does not make one API call per image.

Example:
    >>> with track("validate-scan", "scanning images", total=len(samples), artifact_every=32) as bar:
    ...     for s in samples:
    ...         bar.advance()
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


def interactive() -> bool:
    """True when a progress bar may draw: stderr is a TTY and ``DAMAGE_PROGRESS`` is not ``0``."""
    if os.environ.get("DAMAGE_PROGRESS", "").strip() == "0":
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Tracker:
    """Counts done items; drives the bar (if any) and the Prefect artifact (if in a run)."""

    def __init__(self, key: str, description: str, total: int, artifact_every: int = 1) -> None:
        from damage.tasks.core.prefect_ui import Progress

        self.total = max(0, int(total))
        self.done = 0
        self.every = max(1, int(artifact_every))
        self._artifact = Progress(key, description)
        self._bar = None
        self._task = None
        if interactive() and self.total:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(description, total=self.total)

    def advance(self, n: int = 1) -> None:
        before = self.done
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
        if self.total and (self.done // self.every != before // self.every or self.done >= self.total):
            self._artifact.update(100.0 * min(self.done, self.total) / self.total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


@contextmanager
def track(key: str, description: str, total: int, artifact_every: int = 1) -> Iterator[Tracker]:
    """A ``Tracker`` that is closed (bar removed) however the block ends."""
    t = Tracker(key, description, total, artifact_every)
    try:
        yield t
    finally:
        t.close()


def iterate(items, key: str, description: str, total: int | None = None, artifact_every: int = 1):
    """Yield ``items`` while a ``Tracker`` counts them (for loops whose body should stay as it is)."""
    n = total if total is not None else len(items)
    with track(key, description, n, artifact_every) as bar:
        for item in items:
            yield item
            bar.advance()
