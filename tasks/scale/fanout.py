"""The nightly's independent steps, one after another in this process (``runner: local``, the default) or
concurrently on Ray through prefect-ray's ``RayTaskRunner`` (``runner: ray``).

A step started here is a Prefect task either way: same name, same MLflow runs, same results; only where and
when it runs changes. On Ray each step is one Ray task with ``ray.worker_threads`` CPUs, its thread variables
set to that count before any library starts (``THREAD_ENV``), and the variables it needs to write where this
process writes: the MLflow tracking URI, the state dir and the worker's config. MLflow credentials travel only
to an embedded Ray on this machine; a cluster's workers hold their own (as ``damage predict --ray``).

Example:
    >>> with FanOut(cfg.runner == "ray", cfg.ray, paths.root) as fan:
    ...     sweep = fan.start(sweep_task, best, data_yaml, cfg.sweep)
    ...     issues = fan.start(issues_task, best, data_yaml, cfg.label_issues)
    ...     thresholds = sweep.result().thresholds
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from damage.tasks.scale.ray_runtime import S3_ENV, THREAD_ENV, connect, forwarded_env, resolve_address

if TYPE_CHECKING:
    from damage.tasks.core.config import RayConfig

# What a step on a Ray worker must see as this process does (paths and settings, no secrets)
SHARED_ENV = ("MLFLOW_TRACKING_URI", "DAMAGE_STATE_DIR", "YOLO_CONFIG_DIR", "DAMAGE_WORKER_CONFIG",
              "DAMAGE_REGISTRY_CONFIG", "DAMAGE_CONFIG", "DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY", "YOLO_OFFLINE",
              "YOLO_AUTOINSTALL", *S3_ENV)


class _Done:
    """A step that already ran in this process, with the future's ``result()``."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self) -> Any:
        return self.value


def step_env(threads: int, forward_secrets: bool) -> dict[str, str]:
    """The environment of a step on a Ray worker (see the module docstring)."""
    env = forwarded_env(SHARED_ENV, forward_secrets)
    env.update({k: str(threads) for k in THREAD_ENV})
    return env


class FanOut:
    """Starts steps: in this process at once (``enabled`` False), or as Ray tasks that run concurrently."""

    def __init__(self, enabled: bool, cfg: RayConfig, state_dir: str | os.PathLike | None = None) -> None:
        self.enabled, self.cfg, self.state_dir = enabled, cfg, state_dir
        self._runner: Any = None

    def __enter__(self) -> FanOut:
        if self.enabled:
            connect(self.cfg, Path(self.state_dir) if self.state_dir else None)  # fails fast on a bad address
            from prefect_ray import RayTaskRunner

            self._runner = RayTaskRunner().__enter__()  # Ray is up: the runner joins it and never stops it
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._runner is not None:
            self._runner.__exit__(*exc)
            self._runner = None

    def start(self, task: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``task(*args, **kwargs)``; returns something with ``.result()`` (raises the step's error)."""
        if self._runner is None:
            return _Done(task(*args, **kwargs))
        from prefect.utilities.callables import get_call_parameters
        from prefect_ray.context import remote_options

        threads = self.cfg.worker_threads
        env = step_env(threads, forward_secrets=resolve_address(self.cfg) is None)
        with remote_options(num_cpus=threads, runtime_env={"env_vars": env}):
            return self._runner.submit(task, parameters=get_call_parameters(task.fn, args, kwargs))
