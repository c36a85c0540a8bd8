"""What a flow run may be given, and what only the worker decides.

A Prefect flow run's parameters come from whoever can reach the Prefect API, which has no login.
They are untrusted for anything that touches ``production``, credentials or code execution. So a
run gets its config from the **worker** (the process that executes it: its ``--config`` YAML and
``--set`` overrides, pinned in the environment by ``pin_worker_config``, or ``$DAMAGE_CONFIG``
for a pool worker) and may change only the keys of ``RUN_OVERRIDES``. Everything else (the
tracking URI, the evaluator and evaluation settings the gate uses, export settings, the registry
section, notification URLs, the state directory) is refused, naming the key.

Example:
    >>> check_run_overrides(["train.epochs=5"])
    >>> check_run_overrides(["mlflow.tracking_uri=http://x"])
    Traceback (most recent call last):
    ...
    damage.tasks.core.config.ConfigError: run parameter 'mlflow.tracking_uri' is not allowed: ...
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from damage.tasks.core.config import DEFAULT_CONFIG, Config, ConfigError
from damage.tasks.core.config_load import CONFIG_ENV, load_config, parse_override, worker_registry_config

# The one table of config keys a flow run may override (value: what it is for). The dataset,
# the model size and training knobs that change how long and how hard the run trains; none of
# them reaches the gate's evaluation (evaluate.*, export.*, the image size), the registry, MLflow,
# notifications or a file the pipeline would load as a checkpoint (train.init takes a mode only).
RUN_OVERRIDES: dict[str, str] = {
    "data.source": "the dataset (s3://..., a folder, a data.yaml, synth)",
    "train.model": "model size n|s|m|l|x (a family name; a .pt path is refused below)",
    "train.init": "auto | scratch | production (a checkpoint path only from the worker's config)",
    "train.epochs": "epochs",
    "train.time_min": "training time budget, minutes",
    "train.batch": "batch size",
    "train.patience": "early-stopping patience",
    "train.lr0": "initial learning rate",
    "train.lrf": "final learning-rate fraction",
    "train.augment": "default | light",
    "train.freeze": "layers to freeze",
    "train.finetune_lr_scale": "lr0 scale when fine-tuning",
    "seed": "random seed",
}
# Values that would load a file as a model: never from a run parameter.
_NO_PATHS = ("train.model", "train.init")
WORKER_ENV = "DAMAGE_WORKER_CONFIG"


def check_run_overrides(overrides: list[str] | None) -> None:
    """Refuse every override whose key is not in ``RUN_OVERRIDES`` (naming the key), and file paths.

    Raises:
        ConfigError: the first offending key, with the allowed list.
    """
    for item in overrides or []:
        key, value = parse_override(item)
        if key not in RUN_OVERRIDES:
            raise ConfigError(f"run parameter '{key}' is not allowed: a flow run may set only "
                              f"{', '.join(sorted(RUN_OVERRIDES))}; everything else (tracking URI, evaluator and "
                              f"evaluation settings, registry, notifications) comes from the worker's own config")
        if key in _NO_PATHS and isinstance(value, str) and (value.endswith((".pt", ".yaml")) or "/" in value):
            raise ConfigError(f"run parameter '{key}={value}' is not allowed: a run cannot name a file to load "
                              f"as a model; set it in the worker's config")


def pin_worker_config(config_path: str | Path | None, sets: list[str] | None) -> None:
    """Record this worker's config file and ``--set`` overrides in its environment (flow-run
    subprocesses inherit it); flows build their config from it, never from a parameter."""
    path = str(Path(config_path).resolve()) if config_path else None
    os.environ[WORKER_ENV] = json.dumps({"config": path, "sets": list(sets or [])})


def worker_source() -> tuple[Path, list[str]]:
    """(config file, overrides) of this worker: pinned, else ``$DAMAGE_CONFIG``, else the default YAML."""
    raw = os.environ.get(WORKER_ENV)
    if raw:
        try:
            d = json.loads(raw)
            return Path(d.get("config") or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG), list(d.get("sets") or [])
        except (json.JSONDecodeError, AttributeError, TypeError) as e:
            raise ConfigError(f"${WORKER_ENV}: not valid ({e})") from None
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG), []


def worker_config() -> Config:
    """The worker's own config (see ``worker_source``), registry section included."""
    path, sets = worker_source()
    cfg = load_config(path, sets)
    cfg.registry = worker_registry_config()
    return cfg


def run_config(config_path: str | None, overrides: list[str] | None) -> Config:
    """The config of one flow run: the worker's, plus the allowlisted ``overrides`` of the run.

    Args:
        config_path: the run's ``config_path`` parameter; accepted only when it names the worker's
            own file (old deployments pass it), refused otherwise.
        overrides: the run's ``key=value`` overrides (``RUN_OVERRIDES`` keys only).

    Raises:
        ConfigError: a refused key, or a config file other than the worker's.
    """
    path, sets = worker_source()
    if config_path and Path(config_path).resolve() != path.resolve():
        raise ConfigError(f"run parameter config_path '{config_path}' is not allowed: the config file is the "
                          f"worker's own ({path}); start the worker with --config to change it")
    check_run_overrides(overrides)
    cfg = load_config(path, [*sets, *(overrides or [])])
    cfg.registry = worker_registry_config()
    return cfg


def split_worker_sets(sets: list[str] | None) -> tuple[list[str], list[str]]:
    """``--set`` items split into (allowed as run parameters, worker-only: kept out of stored parameters)."""
    run, worker = [], []
    for item in sets or []:
        try:
            check_run_overrides([item])
            run.append(item)
        except ConfigError:
            worker.append(item)
    return run, worker
