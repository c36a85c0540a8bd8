"""Shared CLI plumbing: config loading, state activation, one-line errors."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from tasks.core.config import Config, ConfigError, load_config, pin_worker_registry
from tasks.core.runtime import StatePaths, activate

console = Console()
err_console = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config (default: configs/default.yaml).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key, e.g. --set train.epochs=5 (repeatable)."),
]
StateOpt = Annotated[
    Path | None, typer.Option("--state-dir", help="State directory (overrides config and $DAMAGE_STATE_DIR).")
]


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def fail(msg: str, code: int = 2) -> NoReturn:
    """Print a one-line error and exit non-zero."""
    err_console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def setup(config: Path | None = None, sets: list[str] | None = None,
          state_dir: Path | None = None) -> tuple[Config, StatePaths]:
    """Load and validate the config, then activate the state dir (env vars, Ultralytics settings)."""
    overrides = list(sets or [])
    if state_dir is not None:
        overrides.append(f"state_dir={state_dir}")
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        fail(str(e))
    pin_worker_registry(cfg)  # this process is the worker: flows it starts gate with its registry section
    if state_dir is not None:
        import os

        os.environ["DAMAGE_STATE_DIR"] = str(Path(state_dir).resolve())
    paths = activate(cfg.state_dir, cfg.mlflow.tracking_uri)
    if cfg.mlflow.tracking_uri:  # activate moved any URI credentials into MLflow's env variables
        from tasks.core.secrets import redact_uri

        cfg.mlflow.tracking_uri = redact_uri(cfg.mlflow.tracking_uri)
    return cfg, paths


def run_guarded(fn, *args, **kwargs):
    """Run ``fn``; turn known user-input errors into one-line messages with exit code 2."""
    from tasks.core.errors import DamageError

    try:
        return fn(*args, **kwargs)
    except (DamageError, ConfigError, UsageError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
