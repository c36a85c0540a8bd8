"""Shared CLI plumbing: the root options, config loading, state activation, one-line errors, top-level runs.

The shared options (``--config``, ``--set``, ``--state-dir``) belong to the root command
(``shared_options``, the app's callback) and may stand anywhere on the line:
``damage run --set train.epochs=5`` and ``damage --set train.epochs=5 run`` are the same call
(``DamageGroup`` moves them in front of the sub-command before parsing). Commands read them
through ``setup()`` / ``shared()``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from typer._click import exceptions as click_exc  # Typer vendors click: its usage errors are these
from typer.core import TyperGroup

from damage.tasks.core.config import Config, ConfigError
from damage.tasks.core.config_load import load_config, pin_worker_registry
from damage.tasks.core.runtime import StatePaths, activate

console = Console()
err_console = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", exists=True, dir_okay=False,
                              help="YAML config (default: configs/default.yaml).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key, e.g. --set train.epochs=5 (repeatable)."),
]
StateOpt = Annotated[
    Path | None, typer.Option("--state-dir", help="State directory (overrides config and $DAMAGE_STATE_DIR).")
]
# The root's options and the spellings that take a value: hoisted in front of the sub-command.
SHARED_FLAGS = {"--config": "--config", "-c": "--config", "--set": "--set", "-s": "--set",
                "--state-dir": "--state-dir"}
# The tag that names what started a top-level MLflow run (nightly, evaluate, prune, ...).
ENTRY_TAG = "damage.flow"
_META_KEY = "damage.shared"


@dataclass
class SharedOptions:
    """The root options of this invocation."""

    config: Path | None = None
    sets: list[str] = field(default_factory=list)
    state_dir: Path | None = None


def hoist_shared(args: list[str]) -> list[str]:
    """Move the shared options (with their values) in front of everything else; ``--`` ends the scan.

    Example:
        >>> hoist_shared(["run", "--force", "--set", "a=1", "--state-dir=/s"])
        ['--set', 'a=1', '--state-dir', '/s', 'run', '--force']
    """
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            rest += args[i:]
            break
        name, eq, value = a.partition("=")
        if name in SHARED_FLAGS and (eq and name.startswith("--")):
            front += [SHARED_FLAGS[name], value]
            i += 1
            continue
        if a in SHARED_FLAGS and i + 1 < len(args):
            front += [SHARED_FLAGS[a], args[i + 1]]
            i += 2
            continue
        rest.append(a)
        i += 1
    return front + rest


class DamageGroup(TyperGroup):
    """The root command: shared options anywhere on the line, usage errors as one line (exit 2)."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_shared(args))

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_exc.NoArgsIsHelpError as e:
            e.show()
            sys.exit(e.exit_code)
        except click_exc.UsageError as e:  # BadParameter too: Typer's exists=True, choices, types
            err_console.print(f"[bold red]error:[/] {e.format_message()}", highlight=False, soft_wrap=True)
            sys.exit(e.exit_code)
        except click_exc.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except typer.Abort:  # typer 0.29 vendors click without `Abort` in its exceptions module (issue 31)
            err_console.print("aborted")
            sys.exit(1)
        except Exception as e:  # noqa: BLE001  anything unexpected: one line (the traceback with DAMAGE_DEBUG=1)
            import os

            from damage.tasks.core.errors import DamageError
            from damage.tasks.core.secrets import redact_text

            if os.environ.get("DAMAGE_DEBUG"):
                raise
            msg = redact_text(e) if isinstance(e, DamageError) else f"{type(e).__name__}: {redact_text(e)}"
            err_console.print(f"[bold red]error:[/] {msg} (DAMAGE_DEBUG=1 shows the traceback)", highlight=False,
                              soft_wrap=True)
            sys.exit(2 if isinstance(e, DamageError) else 1)
        sys.exit(rv if isinstance(rv, int) else 0)


def shared_options(
    ctx: typer.Context,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    state_dir: StateOpt = None,
) -> None:
    """Vehicle-damage segmentation model factory: data gate, training, sweeps, compression, ONNX, MLflow
    registry and Prefect nightly flows. --config, --set and --state-dir may stand before or after the command."""
    ctx.meta[_META_KEY] = SharedOptions(config, list(sets or []), state_dir)


def shared(ctx: typer.Context) -> SharedOptions:
    """The root options of the running command (``ctx.meta`` is shared by every nested context;
    defaults when the app has no ``shared_options`` callback)."""
    opts = ctx.meta.get(_META_KEY)
    return opts if isinstance(opts, SharedOptions) else SharedOptions()


def fail(msg: str, code: int = 2) -> NoReturn:
    """Print a one-line error and exit non-zero."""
    err_console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def setup(ctx: typer.Context, extra_sets: list[str] | None = None,
          config: Path | None = None) -> tuple[Config, StatePaths]:
    """Load and validate the config (root options + ``extra_sets``), then activate the state dir.

    Args:
        ctx: the command's context (Typer passes it to a ``ctx: typer.Context`` parameter).
        extra_sets: ``key=value`` overrides the command adds after the user's ``--set`` ones.
        config: config file when the user gave none (``damage run --demo``).
    """
    opts = shared(ctx)
    overrides = [*opts.sets, *(extra_sets or [])]
    if opts.state_dir is not None:
        overrides.append(f"state_dir={opts.state_dir}")
    try:
        cfg = load_config(opts.config or config, overrides)
    except ConfigError as e:
        fail(str(e))
    pin_worker_registry(cfg)  # this process is the worker: flows it starts gate with its registry section
    from damage.tasks.core.run_params import pin_worker_config

    pin_worker_config(opts.config or config, overrides)  # ... and build their whole config from its own
    if opts.state_dir is not None:
        import os

        os.environ["DAMAGE_STATE_DIR"] = str(Path(opts.state_dir).resolve())
    paths = activate(cfg.state_dir, cfg.mlflow.tracking_uri)
    if cfg.mlflow.tracking_uri:  # activate moved any URI credentials into MLflow's env variables
        from damage.tasks.core.secrets import redact_uri

        cfg.mlflow.tracking_uri = redact_uri(cfg.mlflow.tracking_uri)
    return cfg, paths


def run_guarded(fn, *args, **kwargs):
    """Run ``fn``; turn known user-input errors into one-line messages with exit code 2."""
    from damage.tasks.core.errors import DamageError

    try:
        return fn(*args, **kwargs)
    except DamageError as e:  # ConfigError included
        fail(str(e))
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


def refuse_unsafe_model(model: Path) -> None:
    """Vet a ``.pt`` model file before anything is opened for it (an MLflow run, a Ray pass): an
    unsafe or unreadable checkpoint is a one-line error (exit 2) and leaves no run behind. The
    loaders vet it again where they read it."""
    if Path(model).suffix.lower() == ".pt":
        from damage.tasks.training.checkpoint import vet_checkpoint

        run_guarded(vet_checkpoint, model)


RayOpt = Annotated[bool | None, typer.Option(
    "--ray/--no-ray", help="Score the images on Ray workers (Ray Data; each worker loads the model once, "
    "ray.worker_threads threads; same results; default: ray.enabled). Needs the [ray] extra.")]


def ray_for(cfg: Config, paths: StatePaths, flag: bool | None):
    """The ``ray:`` section with Ray connected when ``--ray`` (or, unset, ``ray.enabled``) asks for it; else None.

    The one rule of the commands that take ``--ray``: an unreachable cluster or a missing extra is a
    one-line error (exit 2)."""
    if not (cfg.ray.enabled if flag is None else flag):
        return None
    from damage.tasks.scale.ray_runtime import connect

    run_guarded(connect, cfg.ray, paths.root)
    return cfg.ray


def ray_where(cfg: Config) -> str:
    """Where the work runs, for a command's summary line: ``N worker(s) x T thread(s)``."""
    from damage.tasks.scale.shards import plan_workers

    return f"{plan_workers(cfg.ray, 1 << 30)} worker(s) x {cfg.ray.worker_threads} thread(s)"


def open_top_level_run(cfg: Config, name: str, kind: str | None = None, params: dict | None = None):
    """Start a top-level MLflow run tagged ``ENTRY_TAG = kind`` (default ``name``); returns ``(run_id, client)``.

    The one place a command opens its own run (``top_level_run`` wraps it; ``damage tune`` keeps its run open
    across a resumed search).
    """
    from damage.tasks.core import tracking

    c = tracking.client(cfg.mlflow.tracking_uri)
    exp = tracking.ensure_experiment(c, cfg.mlflow.experiment, cfg.mlflow.artifact_location)
    run_id = tracking.start_run(c, exp, name, tags={ENTRY_TAG: kind or name})
    if params:
        tracking.log_params(c, run_id, params)
    return run_id, c


@contextmanager
def top_level_run(cfg: Config, name: str, kind: str | None = None) -> Iterator[tuple[str, str]]:
    """A top-level MLflow run for a stand-alone command; the step runs nest under it.

    Tagged ``ENTRY_TAG = kind`` (default ``name``), like the nightly flow's own run; FAILED when
    the body raises (or exits non-zero), FINISHED otherwise. Yields ``(run_id, tracking_uri)``.
    """
    from damage.tasks.core import tracking

    run_id, c = open_top_level_run(cfg, name, kind)
    ok = False
    try:
        yield run_id, c.tracking_uri
        ok = True
    finally:
        tracking.end_run(c, run_id, ok)
