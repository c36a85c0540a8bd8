"""CLI output that reads on an 80-column terminal, and ``--json`` for scripts.

``fit_columns`` keeps the most important columns whole and drops the least important ones until
the table fits the terminal (a dropped column is named under the table); columns marked
``wrap`` (free text such as a reason) fold instead of being cut. ``json_output`` sends
everything the work prints to stderr so stdout carries only the JSON document.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from damage.tasks.core.jsonsafe import json_safe

JsonOpt_help = "Print one JSON document on stdout (machine-readable; everything else goes to stderr)."


@dataclass(frozen=True)
class Col:
    """One column: row key, header, priority (1 = always kept, higher = dropped first), alignment, wrap."""

    key: str
    header: str
    priority: int = 1
    justify: str = "left"
    wrap: bool = False
    min_width: int = 8  # a wrapping column keeps at least this many characters


_CELL_PAD = 3  # rich: one space each side + one border character per column


def fit_columns(cols: Sequence[Col], rows: Sequence[dict[str, str]], width: int) -> tuple[list[Col], list[Col]]:
    """(kept, dropped): drop the lowest-priority columns until the natural widths fit ``width``.

    Example:
        >>> kept, dropped = fit_columns([Col("a", "A"), Col("b", "B", priority=3)], [{"a": "x" * 70, "b": "y" * 20}], 80)
        >>> [c.key for c in kept], [c.key for c in dropped]
        (['a'], ['b'])
    """
    def need(c: Col) -> int:
        natural = max([len(c.header)] + [len(str(r.get(c.key, ""))) for r in rows])
        return (min(natural, c.min_width) if c.wrap else natural) + _CELL_PAD

    kept = list(cols)
    dropped: list[Col] = []
    while len(kept) > 1 and sum(need(c) for c in kept) + 1 > width:
        worst = max(kept, key=lambda c: (c.priority, -kept.index(c)))
        if worst.priority <= 1:
            break
        kept.remove(worst)
        dropped.append(worst)
    return kept, dropped


def print_table(console, title: str, cols: Sequence[Col], rows: Sequence[dict[str, str]]) -> None:
    """A rich table fitted to ``console.width`` (kept columns are never truncated to "versi…")."""
    from rich.table import Table

    kept, dropped = fit_columns(cols, rows, console.width)
    t = Table(title=title, title_justify="left")
    for c in kept:
        t.add_column(c.header, justify=c.justify, no_wrap=not c.wrap, overflow="fold" if c.wrap else "ellipsis",
                     min_width=c.min_width if c.wrap else len(c.header))
    for r in rows:
        t.add_row(*[str(r.get(c.key, "")) for c in kept])
    console.print(t)
    if dropped:
        console.print(f"(columns left out to fit {console.width} characters: "
                      f"{', '.join(c.header for c in dropped)}; widen the terminal or use --json)", highlight=False)


def clip_clauses(text: str, limit: int = 140, sep: str = "; ") -> str:
    """``text`` cut after the last whole ``sep``-clause that fits ``limit`` characters, saying how many
    clauses were left out (the full text is in ``--json``). Never cuts inside a word.

    Example:
        >>> clip_clauses("mask ok; dent ok; glass_shatter ok", 20)
        'mask ok; dent ok … (+1 more, see --json)'
    """
    parts = [p for p in text.split(sep) if p]
    if len(text) <= limit or len(parts) <= 1:
        return text
    kept: list[str] = []
    for p in parts:
        if kept and len(sep.join([*kept, p])) > limit:
            break
        kept.append(p)
    return sep.join(kept) + f" … (+{len(parts) - len(kept)} more, see --json)"


@contextmanager
def json_output(enabled: bool) -> Iterator[list]:
    """While the block runs, file descriptor 1 points at stderr (library prints included); at the
    end the value appended to the yielded list is printed as JSON on the real stdout."""
    box: list = []
    if not enabled:
        yield box
        return
    from contextlib import redirect_stdout

    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)  # library output written to the file descriptor (logging handlers holding stdout)
    try:
        with redirect_stdout(sys.stderr):  # and through sys.stdout (rich, print)
            yield box
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    if box:
        sys.stdout.write(json.dumps(json_safe(box[-1]), indent=2) + "\n")
        sys.stdout.flush()
