"""One configuration object, loaded from one commented YAML (``configs/default.yaml``).

Types and ranges live here; the YAML says what each key means. Unknown keys are an error
that names the key and the closest valid one. Nothing happens at import time.

Example:
    >>> cfg = load_config(overrides=["train.epochs=5"])
    >>> cfg.train.epochs
    5
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
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
    tile_fraction: float = Field(0.0, ge=0, le=1)
    tile_scale: float = Field(4.0, ge=1, le=16)

    @model_validator(mode="after")
    def _zoom_range(self) -> SynthConfig:
        if not 1 <= self.zoom[0] <= self.zoom[1]:
            raise ValueError(f"zoom must be [min, max] with 1 <= min <= max, got {list(self.zoom)}")
        if self.closeup_fraction + self.tile_fraction > 1:
            raise ValueError(f"closeup_fraction + tile_fraction must be <= 1, got {self.closeup_fraction} + "
                             f"{self.tile_fraction}")
        return self


class DataConfig(_Section):
    source: str = "synth"
    classes: list[str] | None = None
    batches: list[str] = []
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
    channels_last: bool = False
    plots: bool = True
    init: str = Field("auto", min_length=1)

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, v: Any) -> Any:
        """``[0, 1]`` (YAML list) and ``0`` mean Ultralytics' ``"0,1"`` and ``"0"``."""
        if isinstance(v, (list, tuple)):
            if not v or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v):
                raise ValueError(f"train.device list must hold GPU indices (e.g. [0, 1]), got {list(v)}")
            return ",".join(str(d) for d in v)
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

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


class SliceSetting(_Section):
    size: int = Field(ge=32, le=4096)
    overlap: float = Field(0.2, gt=0, le=0.5)


def _slices_value(v: Any) -> Any:
    """YAML 1.1 reads a bare ``off`` as False (and ``on`` as True): both mean the words."""
    return {False: "off", True: "auto"}.get(v, v) if isinstance(v, bool) else v


Slices = Literal["off", "auto"] | SliceSetting


class ExtraSetConfig(_Section):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    source: str = "synth"
    split: str = "val"
    imgsz: int = Field(640, ge=32, le=4096)
    images: int = Field(40, ge=2)
    seed: int = Field(1034, ge=0)
    closeup_fraction: float = Field(0.0, ge=0, le=1)
    slices: Slices = "auto"
    compare_unsliced: bool = True
    max_det: int = Field(100, ge=1, le=1000)
    tune_split: str | None = None
    tune_images: int = Field(0, ge=0)

    @field_validator("slices", mode="before")
    @classmethod
    def _slices_words(cls, v: Any) -> Any:
        return _slices_value(v)

    @property
    def tuning_split(self) -> str | None:
        """The split the sliced confidence is chosen on: ``tune_split``, or a synth set's generated ``train``
        split when ``tune_images`` > 0; None: this set does not choose it."""
        if self.tune_split:
            return self.tune_split
        return "train" if self.source == "synth" and self.tune_images > 0 else None


class EvaluateConfig(_Section):
    split: str = "val"
    conf: float = Field(0.001, ge=0, le=1)
    iou: float = Field(0.7, gt=0, le=1)
    max_det: int = Field(300, ge=1)
    plots: bool = True
    extra_sets: list[ExtraSetConfig] = []

    @field_validator("extra_sets")
    @classmethod
    def _unique_names(cls, v: list[ExtraSetConfig]) -> list[ExtraSetConfig]:
        names = [s.name for s in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"extra set names must be unique, repeated: {dup}")
        tuning = [s.name for s in v if s.tuning_split]
        if len(tuning) > 1:
            raise ValueError(f"at most one extra set may choose the sliced confidence (the ONNX holds one "
                             f"damage.sliced_conf), these do: {tuning}")
        return v


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
    slices: Slices = "auto"

    @field_validator("slices", mode="before")
    @classmethod
    def _slices_words(cls, v: Any) -> Any:
        return _slices_value(v)

    @property
    def slices_value(self) -> str | dict[str, Any]:
        """``slices`` as plain data (``"off"``, ``"auto"`` or ``{"size", "overlap"}``): metadata, tags, cards."""
        return self.slices if isinstance(self.slices, str) else self.slices.model_dump()


class CollectConfig(_Section):
    enabled: bool = False
    inbox: str | None = None
    band: tuple[float, float] = (0.25, 0.5)
    disagreement: bool = True
    disagreement_iou: float = Field(0.5, ge=0, le=1)
    ignore_classes: list[str] = ["vehicle"]
    max_per_hour: int = Field(20, ge=0)
    retention_days: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _band_range(self) -> CollectConfig:
        if not 0 <= self.band[0] < self.band[1] <= 1:
            raise ValueError(f"band must be [low, high) with 0 <= low < high <= 1, got {list(self.band)}")
        return self


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


# The compression steps, the one list of them: name -> kind. "pytorch" steps change the chain head's weights
# (each variant exported through the parity gate); "quantization" steps rewrite its ONNX file and come after
# them. What each does: tasks/export/chain_steps.py (STEP_RUNNERS, checked against this table by a test).
COMPRESS_STEPS: dict[str, str] = {
    "distill": "pytorch",
    "prune": "pytorch",
    "unstructured": "pytorch",
    "int8-static": "quantization",
    "int8-dynamic": "quantization",
    "fp16": "quantization",
    "int8-nncf": "quantization",
    "int8-qat": "quantization",
}


class CompressConfig(_Section):
    enabled: bool = False
    tolerance: float = Field(0.02, ge=0)
    class_tolerance: float | None = Field(0.03, ge=0)
    min_speedup: float = Field(1.1, ge=0)
    latency_budget_ms: float | None = None
    steps: list[Literal[tuple(COMPRESS_STEPS)]] = [  # type: ignore[valid-type]
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
    extra_min_class_ap50: dict[str, float | dict[str, float]] = {}

    @field_validator("min_class_ap50")
    @classmethod
    def _floors_in_range(cls, v: float | dict[str, float]) -> float | dict[str, float]:
        bad = [x for x in (v.values() if isinstance(v, dict) else [v]) if not 0 <= x <= 1]
        if bad:
            raise ValueError(f"every per-class floor must be in [0, 1], got {bad}")
        return v

    @field_validator("extra_min_class_ap50")
    @classmethod
    def _extra_floors_in_range(cls, v: dict[str, float | dict[str, float]]) -> dict[str, float | dict[str, float]]:
        for spec in v.values():
            cls._floors_in_range(spec)
        return v
    wait_for_approval: bool = False
    approval_timeout_s: int = Field(86400, ge=1)
    approval_poll_s: int = Field(10, ge=1)
    approvers: list[str] = []
    lock_timeout_s: float = Field(60.0, gt=0)


class ExplainConfig(_Section):
    enabled: bool = True
    samples: int = Field(4, ge=0)
    method: Literal["gradcam", "hirescam", "eigencam"] = "hirescam"
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
    events: list[Literal["failure", "approval", "promotion", "serving"]] = ["failure", "approval", "promotion",
                                                                            "serving"]
    timeout_s: float = Field(10.0, gt=0)


class CanaryConfig(_Section):
    model: str = "models:/damage-seg@staging"
    weight: float = Field(0.1, ge=0, le=1)


class ServingConfig(_Section):
    replicas: int = Field(1, ge=1, le=64)
    min_replicas: int | None = Field(None, ge=0, le=64)
    max_replicas: int | None = Field(None, ge=1, le=64)
    replica_cpus: float = Field(1.0, gt=0)
    threads: int = Field(1, ge=1)
    port: int = Field(8000, ge=1, le=65535)
    poll_s: float = Field(10.0, gt=0)
    window: int = Field(200, ge=1)
    window_min: float = Field(5.0, gt=0)
    monitor: bool = True
    canary: CanaryConfig | None = None
    shadow: str | None = None
    shadow_max_inflight: int = Field(2, ge=1)
    max_error_rate: float = Field(0.05, ge=0, le=1)
    collect: CollectConfig = CollectConfig()

    @model_validator(mode="after")
    def _replica_range(self) -> ServingConfig:
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("serving.min_replicas and serving.max_replicas go together (autoscaling), or neither")
        if self.min_replicas is not None and self.max_replicas < max(1, self.min_replicas):
            raise ValueError(f"serving.max_replicas ({self.max_replicas}) < serving.min_replicas ({self.min_replicas})")
        return self
class RayConfig(_Section):
    enabled: bool = False
    address: str | None = None
    num_cpus: int = Field(0, ge=0)
    num_gpus: float | None = Field(None, ge=0)
    worker_threads: int = Field(1, ge=1)
    workers: int = Field(0, ge=0)
    batch_size: int = Field(8, ge=1)
    connect_timeout_s: float = Field(30.0, gt=0)


class TuneConfig(_Section):
    space: str = "configs/tune.yaml"
    trials: int = Field(8, ge=1)
    objective: str | None = None
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    max_concurrent: int = Field(0, ge=0)
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)
    search_seed: int = 0
    max_failures: int = Field(0, ge=0)


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
    serving: ServingConfig = ServingConfig()
    compress: CompressConfig = CompressConfig()
    registry: RegistryConfig = RegistryConfig()
    explain: ExplainConfig = ExplainConfig()
    label_issues: LabelIssuesConfig = LabelIssuesConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    mlflow: MlflowConfig = MlflowConfig()
    notify: NotifyConfig = NotifyConfig()
    runner: Literal["local", "ray"] = "local"
    ray: RayConfig = RayConfig()
    tune: TuneConfig = TuneConfig()

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
