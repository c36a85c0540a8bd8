"""One configuration object, loaded from one commented YAML (``configs/default.yaml``).

Types and ranges live here; the YAML says what each key means. Unknown keys are an error
that names the key and the closest valid one. Nothing happens at import time.

Example:
    >>> cfg = load_config(overrides=["train.epochs=5"])
    >>> cfg.train.epochs
    5
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from damage.tasks.core.errors import DamageError
from damage.tasks.core.images import DEFAULT_MAX_PIXELS

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"
INIT_MODES = ("auto", "scratch", "production")  # train.init, besides a path to a .pt
CLASSES = ["vehicle", "dent", "scratch", "crack", "glass_shatter", "lamp_broken", "tire_flat"]


class ConfigError(DamageError, ValueError):
    """A configuration problem, phrased for a one-line CLI error (a ``DamageError``: callers catch one type)."""


def _check_model(value: str, key: str) -> str:
    """Model names are checked where the config is read (``damage.tasks.core.families`` lists the valid ones)."""
    from damage.tasks.core.families import check_model_name

    try:
        return check_model_name(value, key)
    except DamageError as e:
        raise ValueError(str(e)) from None


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SynthConfig(_Section):
    images: int = Field(240, ge=2)
    imgsz: int = Field(160, ge=32, le=4096)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0
    closeup_fraction: float = Field(0.0, ge=0, le=1)
    zoom: tuple[float, float] = (1.8, 2.8)
    balance: bool = True

    @model_validator(mode="after")
    def _zoom_range(self) -> SynthConfig:
        if not 1 <= self.zoom[0] <= self.zoom[1]:
            raise ValueError(f"zoom must be [min, max] with 1 <= min <= max, got {list(self.zoom)}")
        return self


class DataConfig(_Section):
    source: str = "synth"
    classes: list[str] | None = None
    synth: SynthConfig = SynthConfig()


class ValidateConfig(_Section):
    enabled: bool = True
    on_error: Literal["fail", "clean"] = "fail"
    min_width: int = Field(32, ge=1)
    min_height: int = Field(32, ge=1)
    blur_threshold: float = Field(15.0, ge=0)
    dark_threshold: float = Field(25.0, ge=0, le=255)
    imbalance_ratio: float = Field(20.0, ge=1)
    near_duplicate_distance: int = Field(4, ge=0, le=64)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    severity: dict[str, Literal["error", "warning"]] = {}
    workers: int = Field(0, ge=0)
    min_polygon_area: float = Field(1e-6, ge=0, lt=1)
    chunk_size: int = Field(32, ge=1)
    on_drift: Literal["warn", "fail"] = "warn"
    drift_reference: str = "auto"
    drift_max_share_change: float = Field(0.05, ge=0, le=1)
    drift_max_ks: float = Field(0.1, ge=0, le=1)
    drift_alpha: float = Field(0.001, gt=0, lt=1)
    drift_min_samples: int = Field(20, ge=1)


class TrainConfig(_Section):
    model: str = "n"
    weights: str | None = None
    epochs: int = Field(30, ge=1)
    time_min: float | None = Field(None, gt=0)
    imgsz: int = Field(160, ge=32)
    batch: int = Field(16, ge=1)
    nbs: int | None = Field(None, ge=1)
    val: bool = True
    optimizer: Literal["SGD", "Adam", "AdamW", "NAdam", "RAdam", "RMSProp", "auto"] = "SGD"
    lr0: float = Field(0.01, gt=0)
    lrf: float = Field(0.01, gt=0, le=1)
    cos_lr: bool = True
    warmup_epochs: float = Field(1.0, ge=0)
    warmup_bias_lr: float = Field(0.1, ge=0)
    box: float = Field(7.5, gt=0)
    cls: float = Field(0.5, gt=0)
    dfl: float = Field(1.5, gt=0)
    momentum: float = Field(0.937, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    patience: int = Field(50, ge=0)
    augment: Literal["default", "light"] = "default"
    freeze: int = Field(0, ge=0)
    finetune: bool = False
    finetune_lr_scale: float = Field(0.1, gt=0, le=1)
    finetune_guard: bool = True
    finetune_guard_tol: float = Field(0.0, ge=0, le=1)
    resume: str | None = None
    workers: int = Field(0, ge=0)
    device: str = "cpu"
    cache: bool | Literal["ram", "disk"] = False
    init: str = Field("auto", min_length=1)

    @field_validator("init")
    @classmethod
    def _init_mode(cls, v: str) -> str:
        if v not in INIT_MODES and not v.endswith(".pt"):
            raise ValueError(f"must be one of {', '.join(INIT_MODES)} or a path to a .pt checkpoint")
        return v

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        return _check_model(v, "train.model")


class EvaluateConfig(_Section):
    split: str = "val"
    conf: float = Field(0.001, ge=0, le=1)
    iou: float = Field(0.7, gt=0, le=1)
    max_det: int = Field(300, ge=1)


class SweepConfig(_Section):
    enabled: bool = True
    conf: list[float] = [0.30, 0.35, 0.40, 0.45, 0.50]
    iou: list[float] = [0.45, 0.50, 0.55, 0.60]
    objective: Literal["mask_f1", "fitness", "recall_at_precision", "damage_mae"] = "mask_f1"
    min_precision: float = Field(0.8, ge=0, le=1)
    split: str = "val"
    max_det: int = Field(300, ge=1)


class ExportConfig(_Section):
    opset: int = Field(13, ge=11, le=21)
    dynamic: bool = True
    simplify: bool = True
    imgsz: int = Field(0, ge=0)
    parity_atol: float = Field(1e-3, gt=0)
    parity_images: int = Field(4, ge=1)
    end2end: bool = False


class PredictorConfig(_Section):
    backend: Literal["auto", "onnxruntime", "openvino"] = "auto"
    threads: int = Field(0, ge=0)
    spinning: bool = True
    cache_optimized: bool = True
    openvino_precision: Literal["f32", "bf16"] = "f32"
    latency_runs: int = Field(10, ge=0)


class DistillConfig(_Section):
    student: str = "n"
    teacher: str | None = None
    dis: float = Field(6.0, ge=0)
    hinton: bool = True
    temperature: float = Field(4.0, gt=0)
    hinton_weight: float = Field(1.0, ge=0)
    epochs: int = Field(10, ge=1)
    compare_scratch: bool = True

    @field_validator("student")
    @classmethod
    def _known_model(cls, v: str) -> str:
        return _check_model(v, "compress.distill.student")


class PruneConfig(_Section):
    ratio: float = Field(0.3, gt=0, lt=1)
    finetune_epochs: int = Field(10, ge=0)
    sparsity: float = Field(0.5, gt=0, lt=1)
    scope: Literal["global", "layer"] = "global"
    importance: Literal["l1", "l2"] = "l2"


class QuantSetting(_Section):
    calibrate_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = True


class QuantizeConfig(_Section):
    calib_images: int = Field(64, ge=1)
    max_retries: int = Field(3, ge=0)
    nodes_per_retry: int = Field(8, ge=1)
    per_channel: bool = True
    calibrate_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    activation_symmetric: bool = False
    also_try: list[QuantSetting] = []
    sensitivity_images: int = Field(4, ge=1)
    also_parent: bool = True
    nncf_preset: Literal["performance", "mixed"] = "performance"
    qat_fallback: bool = True
    qat_max_float_share: float = Field(0.1, ge=0, le=1)
    qat_epochs: int = Field(3, ge=1)
    qat_lr_scale: float = Field(0.01, gt=0, le=1)


class CompressConfig(_Section):
    enabled: bool = False
    tolerance: float = Field(0.02, ge=0)
    class_tolerance: float | None = Field(0.03, ge=0)
    min_speedup: float = Field(1.1, ge=0)
    latency_budget_ms: float | None = None
    steps: list[Literal["distill", "prune", "unstructured", "int8-static", "int8-dynamic", "fp16", "int8-nncf",
                        "int8-qat"]] = [
        "prune",
        "int8-static",
    ]
    distill: DistillConfig = DistillConfig()
    prune: PruneConfig = PruneConfig()
    quantize: QuantizeConfig = QuantizeConfig()


class RegistryConfig(_Section):
    model_name: str = "damage-seg"
    tolerance: float = Field(0.01, ge=0)
    latency_budget_ms: float | None = None
    floor_mask_map: float = Field(0.05, ge=0, le=1)
    min_class_ap50: float | dict[str, float] = 0.1
    class_tolerance: float | None = Field(None, ge=0)

    @field_validator("min_class_ap50")
    @classmethod
    def _floors_in_range(cls, v: float | dict[str, float]) -> float | dict[str, float]:
        bad = [x for x in (v.values() if isinstance(v, dict) else [v]) if not 0 <= x <= 1]
        if bad:
            raise ValueError(f"every per-class floor must be in [0, 1], got {bad}")
        return v
    wait_for_approval: bool = False
    approval_timeout_s: int = Field(86400, ge=1)
    approval_poll_s: int = Field(10, ge=1)
    approvers: list[str] = []
    lock_timeout_s: float = Field(60.0, gt=0)


class ExplainConfig(_Section):
    enabled: bool = True
    samples: int = Field(4, ge=0)
    method: Literal["gradcam", "eigencam"] = "gradcam"
    layer: str | None = None
    conf: float = Field(0.25, ge=0, le=1)
    iou: float = Field(0.7, gt=0, le=1)
    max_instances: int = Field(20, ge=1)


class LabelIssuesConfig(_Section):
    enabled: bool = True
    splits: list[str] = ["train", "val"]
    conf_floor: float = Field(0.001, ge=0, le=1)
    min_conf: float = Field(0.25, ge=0, le=1)
    prior: float = Field(0.05, gt=0, lt=1)
    overlap_iou: float = Field(0.1, gt=0, le=1)
    match_iou: float = Field(0.5, gt=0, le=1)
    iou: float = Field(0.7, gt=0, le=1)
    max_det: int = Field(300, ge=1)
    flag_score: float = Field(0.5, ge=0, le=1)
    top_k: int = Field(24, ge=0)
    folds: int = Field(0, ge=0)
    fold_epochs: int = Field(3, ge=1)
    fold_start: Literal["trained", "scratch"] = "trained"

    @field_validator("folds")
    @classmethod
    def _folds(cls, v: int) -> int:
        if v == 1:
            raise ValueError("label_issues.folds: 0 (off) or at least 2")
        return v


class ScheduleConfig(_Section):
    cron: str = "0 2 * * *"
    timezone: str = "UTC"
    skip_unchanged: bool = True


class MlflowConfig(_Section):
    tracking_uri: str | None = None
    artifact_location: str | None = None
    experiment: str = "damage"
    system_metrics_interval_s: float = Field(10.0, ge=0)
    ui_url: str | None = None


class NotifyConfig(_Section):
    # Apprise URLs carry tokens: SecretStr keeps them out of to_dict() (params, hashes, logs).
    urls: list[SecretStr] = []
    events: list[Literal["failure", "approval", "promotion"]] = ["failure", "approval", "promotion"]
    timeout_s: float = Field(10.0, gt=0)


class Config(_Section):
    """The whole pipeline configuration (see ``configs/default.yaml`` for meanings)."""

    state_dir: str = ".state"
    seed: int = 0
    data: DataConfig = DataConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    sweep: SweepConfig = SweepConfig()
    export: ExportConfig = ExportConfig()
    predictor: PredictorConfig = PredictorConfig()
    compress: CompressConfig = CompressConfig()
    registry: RegistryConfig = RegistryConfig()
    explain: ExplainConfig = ExplainConfig()
    label_issues: LabelIssuesConfig = LabelIssuesConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    mlflow: MlflowConfig = MlflowConfig()
    notify: NotifyConfig = NotifyConfig()

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @property
    def imgsz(self) -> int:
        """The one image-size rule for a trained model: ``export.imgsz``, else ``train.imgsz``.

        Evaluation, the sweep, export, explain, the promotion gate and compression all use it, so
        a model is measured at the size it is exported and served at.
        """
        return self.export.imgsz or self.train.imgsz

    @property
    def validation(self) -> ValidateConfig:
        """The ``validate:`` section (``validate`` is a pydantic method name)."""
        return self.validate_

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with YAML key names, suitable for logging and hashing.

        URI values lose any ``user:password@`` part (``damage.tasks.core.secrets``): credentials never
        reach MLflow params, ``config/resolved.yaml`` or the config hash.
        """
        from damage.tasks.core.secrets import redact_config

        return redact_config(self.model_dump(by_alias=True, mode="json"))

    def hash(self) -> str:
        """Stable short hash of the resolved config (lineage, cache keys)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load the YAML config, apply ``key=value`` overrides and validate.

    Args:
        path: YAML file; None = ``configs/default.yaml`` of this checkout.
        overrides: ``dotted.key=value`` strings applied on top of the file.

    Raises:
        ConfigError: unreadable file, unknown key (with the closest valid key), or bad value.
    """
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(e, str(path))) from None


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
