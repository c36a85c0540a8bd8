"""The one place that makes Prefect tasks from the project's plain step functions.

Every flow and every ``*_task`` attribute wraps its function here, so the same rules hold for
all of them: caching is off (steps pass live objects: configs, open runs, paths whose content
changes between nights) and a task with retries waits ``RETRY_DELAYS_S`` between attempts.
Prefect is imported on the first call, so importing a step module (the CLI, tests) does not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Seconds before the 1st, 2nd and 3rd retry of a task (server hiccups, S3 throttling).
RETRY_DELAYS_S = (10, 60, 300)


def as_task(fn: Callable[..., Any], name: str, retries: int = 0, **options: Any) -> Any:
    """``fn`` as a Prefect task named ``name`` (no caching; ``retries`` with ``RETRY_DELAYS_S``).

    The plain function stays reachable as ``.fn``, so tests call it without an engine.

    Example:
        >>> train = as_task(train_step, "train", retries=1)
        >>> train.fn is train_step
        True
    """
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    if not 0 <= retries <= len(RETRY_DELAYS_S):
        raise ValueError(f"task '{name}': retries must be 0..{len(RETRY_DELAYS_S)}, got {retries}")
    options.setdefault("task_run_name", name)  # readable run names in the UI: "train", not "train-2a2"
    return task(fn, name=name, retries=retries, retry_delay_seconds=list(RETRY_DELAYS_S[:retries]) or 0,
                cache_policy=NO_CACHE, **options)


def plain_copy(value: Any) -> Any:
    """A deep copy of ``value`` (the body of :func:`adopt_subflow_result`)."""
    import copy

    return copy.deepcopy(value)


def adopt_subflow_result(value: Any, name: str) -> Any:
    """A subflow's result handed on as the result of a task named ``name``.

    Prefect records a task input that came out of a subflow as a ``flow_run`` input, and its default
    UI cannot read that type: the parent flow run's Task Runs tab then says "No task runs" (console:
    "Invalid TaskInputResponse"). The copy task takes ``value`` quoted (no input recorded) and its
    result, whose parts Prefect links to this task run, is what later tasks receive: their inputs are
    plain ``task_run`` links every UI reads.

    Example:
        >>> chosen = adopt_subflow_result(compress_flow(...), "compress-result")  # doctest: +SKIP
    """
    from prefect.utilities.annotations import quote

    return as_task(plain_copy, name)(quote(value))
