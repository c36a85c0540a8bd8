"""Where a training run's weights start (``train.init``): the rules, without the registry.

``train.init`` is ``auto`` | ``scratch`` | ``production`` | a path to a ``.pt``. The registry
side (which version is ``production``, fetching its ``model.pt`` through MLflow) lives in
``damage.model_registry.init``; this module decides whether a checkpoint can start training for the
configured architecture and dataset, and what the fine-tune settings are.

A checkpoint fits when its class names equal the dataset's (same names, same order: a class id
means the same thing on both sides) and its network has exactly the parameter and buffer
shapes of the model ``train.model`` builds for that many classes. Anything else (another
size, a pruned variant, a changed class list) would be loaded only partly by Ultralytics'
shape-matching transfer, silently; so it is refused with the first difference as the reason.

Starting from weights uses fine-tune settings (``finetune_config``): lr0 times
``train.finetune_lr_scale`` and no warmup. Ultralytics' warmup starts the bias learning rate
at ``warmup_bias_lr`` (0.1, 100x a fine-tune lr0 of 0.001) and momentum at 0.8, then ramps them
over ``warmup_epochs``; that suits random weights and would shake production's biases loose in
the first epoch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from damage.tasks.core.config import TrainConfig
from damage.tasks.core.errors import DamageError

SCRATCH, PRODUCTION, PATH = "scratch", "production", "path"


class InitError(DamageError):
    """``train.init`` cannot be honoured (no production version, a checkpoint that does not fit)."""


@dataclass(frozen=True)
class InitDecision:
    """Where training starts and why.

    Attributes:
        requested: ``train.init`` as configured.
        source: ``scratch`` | ``production`` | ``path``.
        weights: checkpoint training starts from (None from scratch).
        reason: one sentence for the log, the ``train.init_reason`` tag and the summary.
        parent_version: the registry version whose weights were used (``production`` only).
    """

    requested: str
    source: str
    weights: Path | None
    reason: str
    parent_version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weights"] = str(self.weights) if self.weights else None
        return d


def _load_model(pt: Path):
    from damage.tasks.training.checkpoint import UnreadableCheckpoint, load_checkpoint_dict

    # Vetted + weights_only (the registry's artifact.pt and S3-synced files are not trusted code). A file that
    # names code outside the allowlist raises UnsafeCheckpoint, not an InitError: the run stops, no fallback.
    try:
        ckpt = load_checkpoint_dict(pt)
    except UnreadableCheckpoint as e:  # garbage, not a pickle that was refused: a reason to fall back
        raise InitError(f"{pt}: cannot read the checkpoint: {e}") from None
    model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
    if model is None or not hasattr(model, "state_dict"):
        raise InitError(f"{pt}: not an Ultralytics checkpoint (no model inside)")
    return model


def _names(model) -> list[str]:
    names = getattr(model, "names", None) or {}
    return [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)


def _target_shapes(model_spec: str, nc: int) -> dict[str, tuple[int, ...]]:
    """Parameter/buffer shapes of the network ``train.model`` builds for ``nc`` classes."""
    from damage.tasks.training.train import model_source

    src = model_source(model_spec)
    if src.endswith(".pt"):
        net = _load_model(Path(src))
        if len(_names(net)) != nc:  # a .pt train.model is re-headed for the dataset by Ultralytics
            from ultralytics.nn.tasks import SegmentationModel

            net = SegmentationModel(net.yaml, nc=nc, verbose=False)
    else:
        from ultralytics.nn.tasks import SegmentationModel

        net = SegmentationModel(src, nc=nc, verbose=False)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def checkpoint_mismatch(pt: str | Path, model_spec: str, classes: list[str]) -> str | None:
    """Why the checkpoint cannot start training ``model_spec`` on ``classes``; None when it fits.

    Args:
        pt: Ultralytics checkpoint.
        model_spec: ``train.model`` (``n|s|m|l|x`` or a .yaml/.pt path).
        classes: the dataset's class names in id order.
    """
    net = _load_model(Path(pt))
    have = _names(net)
    if have != list(classes):
        return f"its classes {have} differ from the dataset's {list(classes)}"
    want = _target_shapes(model_spec, len(classes))
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        return (f"its network differs from train.model '{model_spec}' "
                f"({len(missing)} tensors missing, {len(extra)} extra, e.g. {(missing or extra)[0]})")
    diff = [k for k in want if want[k] != got[k]]
    if diff:
        return (f"its network differs from train.model '{model_spec}' in {len(diff)} tensor shapes "
                f"(e.g. {diff[0]}: {got[diff[0]]} vs {want[diff[0]]}; another size or a pruned model)")
    return None


def finetune_config(cfg: TrainConfig, weights: str | Path) -> TrainConfig:
    """``cfg`` set to start from ``weights`` with fine-tune settings (see the module docstring).

    Example:
        >>> c = finetune_config(TrainConfig(lr0=0.01, finetune_lr_scale=0.1), "prod.pt")
        >>> (c.weights, c.finetune, c.warmup_epochs)
        ('prod.pt', True, 0.0)
    """
    return cfg.model_copy(update={"weights": str(weights), "finetune": True, "warmup_epochs": 0.0})


def decide_local(cfg: TrainConfig, classes: list[str]) -> InitDecision | None:
    """The decisions that need no registry: ``scratch``, an explicit ``train.weights``, a ``.pt`` path.

    Returns None for ``auto`` and ``production`` (the registry decides those).

    Raises:
        InitError: a ``.pt`` path that does not exist or does not fit.
    """
    if cfg.init == SCRATCH:
        return InitDecision(cfg.init, SCRATCH, None, "train.init=scratch: training from scratch")
    if cfg.weights:  # the user's own weights win over auto/production
        return InitDecision(cfg.init, PATH, Path(cfg.weights), f"train.weights is set: starting from {cfg.weights}")
    if cfg.init.endswith(".pt"):
        p = Path(cfg.init).expanduser()
        if not p.is_file():
            raise InitError(f"train.init '{cfg.init}': checkpoint not found")
        why = checkpoint_mismatch(p, cfg.model, classes)
        if why:
            raise InitError(f"train.init '{cfg.init}': cannot start from it: {why}")
        return InitDecision(cfg.init, PATH, p.resolve(), f"train.init is a checkpoint: fine-tuning from {p}")
    return None


def offline_decision(cfg: TrainConfig, classes: list[str]) -> InitDecision:
    """For training without the registry (``damage train``): ``auto`` means scratch, ``production`` is an error.

    Raises:
        InitError: ``train.init=production``, or a ``.pt`` path that is missing or does not fit.
    """
    d = decide_local(cfg, classes)
    if d is not None:
        return d
    if cfg.init == PRODUCTION:
        raise InitError("train.init=production needs the model registry: use `damage run`, or "
                        "train.init=auto|scratch|<path.pt> with `damage train`")
    return InitDecision(cfg.init, SCRATCH, None, "train.init=auto without the registry (damage train): "
                                                 "training from scratch")


def apply(cfg: TrainConfig, decision: InitDecision) -> TrainConfig:
    """The training config for a decision: fine-tune settings when starting from weights."""
    if decision.weights is None:
        return cfg.model_copy(update={"weights": None})
    if decision.source == PATH and cfg.weights and Path(cfg.weights) == decision.weights:
        return cfg  # explicit train.weights: the user's finetune/LR settings stand
    return finetune_config(cfg, decision.weights)
