"""``train.init`` against the registry: start the nightly training from ``production`` when it fits.

``resolve_init`` turns ``auto`` / ``production`` into a decision: the current ``production``
version's ``model.pt`` (downloaded through MLflow, never a guessed path) when its class list and
network match the config and dataset (``damage.tasks.training.init.checkpoint_mismatch``), else from
scratch with the reason (``auto``) or an ``InitError`` (``production``). ``scratch``, an explicit
``train.weights`` and a ``.pt`` path are decided without the registry
(``damage.tasks.training.init.decide_local``).
"""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from damage.model_registry.errors import RegistryError
from damage.model_registry.frozen import approved_file, fetch_approved
from damage.model_registry.registry import PRODUCTION, alias_version, get_client
from damage.tasks.core.config import TrainConfig
from damage.tasks.training.init import PRODUCTION as FROM_PRODUCTION
from damage.tasks.training.init import SCRATCH, InitDecision, InitError, checkpoint_mismatch, decide_local


def resolve_init(client: MlflowClient | str, model_name: str, cfg: TrainConfig, classes: list[str],
                 work_dir: str | Path) -> InitDecision:
    """Decide where training starts (see the module docstring).

    Args:
        client: client or tracking URI of the registry.
        model_name: registered model whose ``production`` version may be the start.
        cfg: the ``train:`` section (``init``, ``model``, ``weights``).
        classes: the dataset's class names in id order.
        work_dir: where production's ``model.pt`` is downloaded.

    Raises:
        InitError: ``train.init=production`` without a usable production version, or a ``.pt``
            path that is missing or does not fit.

    Example:
        >>> d = resolve_init("sqlite:///.state/mlflow.db", "damage-seg", TrainConfig(init="auto"),
        ...                  ["vehicle", "dent"], "/tmp/init")
        >>> d.source, d.reason
        ('scratch', "no 'production' version of 'damage-seg' yet: training from scratch")
    """
    local = decide_local(cfg, classes)
    if local is not None:
        return local
    strict = cfg.init == FROM_PRODUCTION

    def scratch(why: str) -> InitDecision:
        if strict:
            raise InitError(f"train.init=production: {why} (use train.init=auto to fall back to scratch)")
        return InitDecision(cfg.init, SCRATCH, None, f"{why}: training from scratch")

    c = get_client(client)
    version = alias_version(c, model_name, PRODUCTION)
    if version is None:
        return scratch(f"no '{PRODUCTION}' version of '{model_name}' yet")
    # the approved, hash-verified copy, never the version's own artifact.pt (the pipeline can replace that);
    # a production alias that moved outside approval, or a changed file, stops the run (ApprovalMismatch)
    local = fetch_approved(c, model_name, PRODUCTION, Path(work_dir) / f"v{version}")
    try:
        pt = approved_file(local, ".pt")
    except RegistryError as e:
        return scratch(f"production version {version} has no usable checkpoint ({e})")
    try:
        why = checkpoint_mismatch(pt, cfg.model, classes)
    except InitError as e:  # unreadable checkpoint: a reason to fall back, not to stop the night
        why = str(e)
    if why:
        return scratch(f"production version {version} does not fit: {why}")
    return InitDecision(cfg.init, FROM_PRODUCTION, pt,
                        f"fine-tuning from production version {version} of '{model_name}' "
                        f"(classes and network match; lr0 x {cfg.finetune_lr_scale:g}, no warmup)", version)
