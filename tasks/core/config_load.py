"""Loading the one config: YAML file + ``key=value`` overrides -> a validated ``Config``, with errors that name the
key and the nearest valid one; and the registry section that belongs to the worker, not to a run's parameters.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from damage.tasks.core.config import DEFAULT_CONFIG, Config, ConfigError, RegistryConfig


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        keys.append(key)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _valid_keys(ann, key + ".")
    return keys


def _suggest(key: str) -> str:
    valid = _valid_keys(Config)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # try the last component alone: "trian.epochs" -> "train.epochs"
        leaf = key.split(".")[-1]
        close = [k for k in valid if k.split(".")[-1] == leaf][:1]
    return f" (did you mean '{close[0]}'?)" if close else ""


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"config key '{dotted}': '{p}' is not a section")
        cur = nxt
    cur[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """Parse ``a.b=value`` (value is YAML: ``5``, ``true``, ``[0.3, 0.4]``, ``null``)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value (e.g. train.epochs=5)")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _flatten_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _flatten_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]
    return out


def _format_error(err: ValidationError, source: str) -> str:
    msgs = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]).replace("validate_", "validate")
        if e["type"] == "extra_forbidden":
            inp = e.get("input")
            leaves = [f"{key}.{k}" for k in _flatten_keys(inp)] if isinstance(inp, dict) and inp else [key]
            msgs += [f"unknown config key '{k}'{_suggest(k)}" for k in leaves]
        else:
            msgs.append(f"config key '{key}': {e['msg']} (got {e.get('input')!r})")
    return f"{source}: " + "; ".join(msgs)


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty file: ``{}``); ConfigError naming ``path`` otherwise."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load the YAML config, apply ``key=value`` overrides and validate.

    Args:
        path: YAML file; None = ``configs/default.yaml`` of this checkout.
        overrides: ``dotted.key=value`` strings applied on top of the file.

    Raises:
        ConfigError: unreadable file, unknown key (with the closest valid key), or bad value.
    """
    path = Path(path) if path else DEFAULT_CONFIG
    raw = read_yaml_mapping(path, "config file")
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(e, str(path))) from None


def config_with(d: dict[str, Any], changes: dict[str, Any], source: str = "config") -> Config:
    """``d`` (``Config.to_dict()`` output) with dotted ``changes`` (``{"train.lr0": 0.002}``) applied, validated.

    Raises:
        ConfigError: an unknown key (with the closest valid one) or a bad value.
    """
    raw = json.loads(json.dumps(d))  # a deep copy; the input stays untouched
    for key, value in changes.items():
        _set_dotted(raw, key, value)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (flow parameters, checkpoints)."""
    try:
        return Config.model_validate(d)
    except ValidationError as e:
        raise ConfigError(_format_error(e, "config")) from None


# --- the registry section belongs to the worker, not to a run's parameters ------------------
# Flow runs started through the Prefect API carry parameters chosen by whoever starts them;
# the gate's thresholds and the approver list must not be among them. The worker process (the
# CLI, ``damage schedule``) pins its own ``registry:`` section in its environment; flows read it
# from there (or from the worker's config file) and refuse ``registry.*`` run overrides.
REGISTRY_ENV = "DAMAGE_REGISTRY_CONFIG"
CONFIG_ENV = "DAMAGE_CONFIG"


def is_registry_override(item: str) -> bool:
    """True for a ``registry.<key>=...`` (or ``registry=...``) override."""
    key = item.split("=", 1)[0].strip()
    return key == "registry" or key.startswith("registry.")


def without_registry_overrides(overrides: list[str] | None) -> list[str]:
    """``overrides`` minus the ``registry.*`` ones (the worker pins those with ``pin_worker_registry``)."""
    return [o for o in overrides or [] if not is_registry_override(o)]


def pin_worker_registry(cfg: Config) -> None:
    """Record this worker's ``registry:`` section in the environment (inherited by flow-run subprocesses)."""
    os.environ[REGISTRY_ENV] = json.dumps(cfg.registry.model_dump(mode="json"), sort_keys=True)


def worker_registry_config() -> RegistryConfig:
    """The worker's ``registry:`` section: pinned by ``pin_worker_registry``, else from the config
    file named by ``$DAMAGE_CONFIG``, else ``configs/default.yaml``. Never from run parameters.

    Raises:
        ConfigError: the pinned JSON or the config file is invalid.
    """
    raw = os.environ.get(REGISTRY_ENV)
    if raw:
        try:
            return RegistryConfig.model_validate(json.loads(raw))
        except (json.JSONDecodeError, ValidationError) as e:
            raise ConfigError(f"${REGISTRY_ENV}: not a valid registry section: {e}") from None
    return load_config(os.environ.get(CONFIG_ENV) or None).registry


def apply_worker_registry(cfg: Config, overrides: list[str] | None) -> Config:
    """Replace ``cfg.registry`` by the worker's; refuse run overrides of ``registry.*``.

    Raises:
        ConfigError: an override names a ``registry.*`` key.
    """
    bad = [o.split("=", 1)[0] for o in overrides or [] if is_registry_override(o)]
    if bad:
        raise ConfigError(f"config key '{bad[0]}' cannot be set by a run parameter: the gate thresholds and "
                          f"approvers come only from the worker's own config (its YAML or `--set` when the "
                          f"worker starts)")
    cfg.registry = worker_registry_config()
    return cfg
