"""YOLO instance-segmentation training (YOLOv8, YOLO11, YOLO26: ``damage.tasks.core.families``) (Ultralytics), offline, on every CPU core.

``train_model`` is a plain typed function (callable in tests); ``flows`` wrap it as a Prefect
task. Per-epoch metrics reach MLflow through the ``on_epoch`` callback, because Ultralytics'
own MLflow callback is disabled (it would open competing runs).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from damage.tasks.core.config import TrainConfig
from damage.tasks.core.errors import DamageError, DatasetError
from damage.tasks.core.families import model_source
from damage.tasks.training.guard import ParentGuard

# Augmentation profiles: rows of Ultralytics train arguments. "light" is for small or
# fine-grained datasets where mosaic/mixup destroy context: flips and small rotations only.
AUGMENT_PROFILES: dict[str, dict[str, Any]] = {
    "default": {},
    "light": {
        "mosaic": 0.0,
        "mixup": 0.0,
        "copy_paste": 0.0,
        "close_mosaic": 0,
        "degrees": 5.0,
        "fliplr": 0.5,
        "flipud": 0.0,
        "scale": 0.1,
        "translate": 0.05,
        "shear": 0.0,
        "perspective": 0.0,
        "hsv_h": 0.01,
        "hsv_s": 0.3,
        "hsv_v": 0.2,
    },
}

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    """What a training run produced. Paths are absolute."""

    best: Path
    last: Path
    run_dir: Path
    metrics: dict[str, float]
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)
    args: dict[str, Any] = field(default_factory=dict)
    accumulate: int | None = None  # batches per optimiser step, read off the Ultralytics trainer
    guard: dict[str, Any] | None = None  # the parent guard's summary (damage.tasks.training.guard), fine-tunes only

    @property
    def results_csv(self) -> Path:
        return self.run_dir / "results.csv"


def build_train_args(cfg: TrainConfig, data_yaml: Path, project: Path, name: str, seed: int) -> dict[str, Any]:
    """Ultralytics ``train()`` keyword arguments for a config (pure function, tested)."""
    lr0 = cfg.lr0 * (cfg.finetune_lr_scale if cfg.finetune else 1.0)
    args: dict[str, Any] = {
        "data": str(data_yaml),
        "epochs": cfg.epochs,
        # a wall-time budget (hours in Ultralytics) overrides epochs; None/0 = train `epochs`
        "time": cfg.time_min / 60.0 if cfg.time_min else None,
        "imgsz": cfg.imgsz,
        "batch": cfg.batch,
        # nominal batch: null -> batch, i.e. one optimiser step per batch (Ultralytics' 64 would
        # accumulate 8 batches of 8 into one step: too few steps for a small dataset on CPU)
        "nbs": cfg.nbs if cfg.nbs is not None else cfg.batch,
        "optimizer": cfg.optimizer,
        "lr0": lr0,
        "lrf": cfg.lrf,
        "cos_lr": cfg.cos_lr,
        "warmup_epochs": cfg.warmup_epochs,
        "warmup_bias_lr": cfg.warmup_bias_lr,
        "box": cfg.box,
        "cls": cfg.cls,
        "dfl": cfg.dfl,
        "momentum": cfg.momentum,
        "weight_decay": cfg.weight_decay,
        "patience": cfg.patience if cfg.patience > 0 else 10**6,
        "workers": cfg.workers,
        "device": cfg.device,
        "cache": cfg.cache,
        "seed": seed,
        "deterministic": True,
        "project": str(project),
        "name": name,
        "exist_ok": True,
        "plots": cfg.plots,
        "val": cfg.val,
        "verbose": False,
        "amp": cfg.device != "cpu",
        # One mask per instance. Ultralytics' default overlap_mask=True merges the ground-truth
        # masks so smaller ones punch holes into larger ones: every damage would be cut out of its
        # vehicle, and damage-inside-vehicle percentages would collapse to ~0.
        "overlap_mask": False,
    }
    if cfg.freeze:
        args["freeze"] = cfg.freeze
    args.update(AUGMENT_PROFILES[cfg.augment])
    return args


_VALIDATED = "validated"  # marker key in train_model's per-epoch validation holder


def class_ap50(validator: Any) -> dict[str, float]:
    """Per-class mask AP50 of an Ultralytics segmentation validation: ``{"mask_ap50/<class>": ap}``.

    Only classes with labels in the validation split have an AP (Ultralytics' ``ap_class_index``);
    names as ``damage.tasks.evaluation.metrics.class_metrics`` writes them, so the per-epoch curve and the
    evaluator's figure share one MLflow key.
    """
    from damage.tasks.evaluation.metrics import class_metrics

    m = getattr(validator, "metrics", None)
    seg = getattr(m, "seg", None)
    if seg is None or not len(getattr(seg, "ap_class_index", [])):
        return {}
    names = m.names
    rows = [{"class": names[int(c)], "mask/AP50": float(seg.ap50[i])} for i, c in enumerate(seg.ap_class_index)]
    return class_metrics(rows)


def _read_history(results_csv: Path) -> list[dict[str, float]]:
    if not results_csv.is_file():
        return []
    with open(results_csv, newline="") as f:
        rows = []
        for row in csv.DictReader(f):
            clean = {}
            for k, v in row.items():
                try:
                    clean[k.strip()] = float(v)
                except (TypeError, ValueError):
                    continue
            rows.append(clean)
        return rows


def is_multi_gpu(device: str) -> bool:
    """``train.device`` names two or more GPUs (``"0,1"``): Ultralytics trains with DDP in a subprocess."""
    return len([d for d in str(device).split(",") if d.strip()]) > 1


def replay_epochs(history: list[dict[str, float]], planned: int, validated_every_epoch: bool,
                  ) -> list[tuple[int, dict[str, float]]]:
    """``(epoch, metrics)`` per row of ``results.csv``, as ``train_model``'s ``on_epoch`` reports them.

    Ultralytics' DDP subprocess drops callbacks added with ``add_callback`` (ultralytics#6168), so a
    multi-GPU training reports its epochs after the fact from the file rank 0 wrote: losses, learning
    rates, the epoch plan, and the validation figures of the epochs that validated (every epoch, or the last
    one with per-epoch validation off). The per-class mask AP50 of each epoch is not in the file: a DDP
    run has it for the final validation only. Values carry the file's 6 significant digits.
    """
    out = []
    for i, row in enumerate(history):
        raw = {k: v for k, v in row.items() if k not in ("epoch", "time")}
        validated = validated_every_epoch or i == len(history) - 1
        if not validated:
            raw = {k: v for k, v in raw.items() if not k.startswith(("metrics/", "val/"))}
        metrics = normalise_metrics(raw)
        metrics["epochs_planned"] = float(planned)
        out.append((int(row.get("epoch", i + 1)) - 1, metrics))
    return out


def normalise_metrics(raw: dict[str, Any]) -> dict[str, float]:
    """Ultralytics metric names -> ours: ``metrics/mAP50-95(M)`` -> ``mask/mAP50-95``."""
    out: dict[str, float] = {}
    for k, v in raw.items():
        try:
            fv = float(v)
        except (TypeError, ValueError):
            continue
        if math.isnan(fv):
            continue
        key = k.strip()
        if key.startswith("metrics/"):
            base = key[len("metrics/"):]
            kind = "mask" if base.endswith("(M)") else "box"
            base = base.replace("(M)", "").replace("(B)", "")
            base = {"precision": "precision", "recall": "recall"}.get(base, base)
            key = f"{kind}/{base}"
        key = key.replace("(", "_").replace(")", "")
        out[key] = fv
    return out


def _sized_for_dataset(src: str, data_yaml: Path, folder: Path) -> str:
    """The model YAML ``src`` with ``nc`` set to the dataset's class count (a copy in ``folder``); a .pt as is.

    Weights are loaded into the network built from ``src`` before the trainer re-builds it for the
    dataset. Built from the bare YAML it has the YAML's 80 classes, so a checkpoint with the
    dataset's 7 loses its classification output convolutions twice (80 != 7 on load, then the
    trainer re-heads 80 -> 7 with fresh ones): every fine-tune from production started with a
    random class head (measured: mask mAP50 0.762 -> 0.719 after one epoch at lr ~0). Same name
    stem, so Ultralytics still reads the scale (n/s/m/l/x) from the file name.
    """
    import yaml
    from ultralytics.nn.tasks import yaml_model_load

    from damage.tasks.core.atomic import atomic_write_text
    from damage.tasks.data.dataset import load_data_yaml

    if not src.endswith((".yaml", ".yml")):
        return src
    nc = len(load_data_yaml(data_yaml).names)
    d = yaml_model_load(src)
    if d.get("nc") == nc:
        return src
    d["nc"] = nc
    d.pop("yaml_file", None)
    out = Path(folder) / f"{Path(src).stem}-nc{nc}.yaml"
    atomic_write_text(out, yaml.safe_dump(d, sort_keys=False))
    return str(out)


def _resume_checkpoint(cfg: TrainConfig, project: Path, name: str) -> Path | None:
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        last = project / name / "weights" / "last.pt"
        return last if last.is_file() and _resumable(last) else None
    p = Path(cfg.resume).expanduser()
    if not p.is_file():
        raise DamageError(f"train.resume '{cfg.resume}': checkpoint not found")
    return p.resolve()


def _trim_results(ckpt: Path) -> None:
    """Cut results.csv back to the epochs the checkpoint holds.

    A run killed between writing results.csv and last.pt would otherwise repeat a row on resume.
    """
    from damage.tasks.training.checkpoint import load_checkpoint_dict

    csv_path = ckpt.parent.parent / "results.csv"
    if not csv_path.is_file():
        return
    epoch = int(load_checkpoint_dict(ckpt).get("epoch", -1))
    lines = csv_path.read_text().splitlines(keepends=True)
    keep = lines[: 1 + epoch + 1]  # header + epochs 0..epoch
    if len(keep) < len(lines):
        from damage.tasks.core.atomic import atomic_write_text

        atomic_write_text(csv_path, "".join(keep))


def _resumable(ckpt: Path) -> bool:
    """A last.pt of an unfinished run still holds its optimizer state (epoch >= 0)."""
    from damage.tasks.training.checkpoint import load_checkpoint_dict

    try:
        d = load_checkpoint_dict(ckpt)
    except Exception:
        return False
    return d.get("epoch", -1) >= 0 and d.get("optimizer") is not None


def train_model(
    data_yaml: str | Path,
    cfg: TrainConfig,
    out_dir: str | Path,
    seed: int = 0,
    name: str = "train",
    on_epoch: EpochCallback | None = None,
    trainer_cls: type | None = None,
    extra_args: dict[str, Any] | None = None,
    guard_eval: Callable[[Path], dict[str, float]] | None = None,
) -> TrainResult:
    """Train a YOLO-seg model (any family of ``damage.tasks.core.families``) and return its best/last checkpoints and metrics.

    Args:
        data_yaml: dataset's data.yaml (YOLO-seg layout).
        cfg: training section of the config (size or weights, LR schedule, augmentation...).
        out_dir: Ultralytics ``project`` directory; the run lands in ``out_dir/name``.
        seed: training seed (deterministic mode on).
        name: run folder name. With ``cfg.resume == "auto"`` an unfinished run there is resumed.
        on_epoch: called after every epoch with ``(epoch, metrics)``; metrics use our names
            (``train/box_loss``, ``lr/pg0``, ``mask/mAP50-95``, ``mask_ap50/<class>`` ...). The
            validation figures (mAP, per-class mask AP50) are there only for epochs that ran
            validation: with per-epoch validation off there is nothing to report until the last.
        trainer_cls: custom trainer (e.g. one whose ``get_model`` keeps a pruned architecture).
        extra_args: further Ultralytics train arguments (e.g. ``distill_model``); they win.
        guard_eval: ``checkpoint -> metrics`` of the fine-tune guard (``train.finetune_guard``, when
            training starts from ``train.weights`` in fine-tune mode): the gate's evaluator
            (``Evaluator.from_config(cfg).metrics_fn(data_yaml)``); required for a guarded fine-tune.

    Returns:
        TrainResult with absolute paths to best.pt and last.pt.

    Example:
        >>> res = train_model("ds/data.yaml", TrainConfig(model="n", epochs=1, imgsz=96), "runs")
        >>> res.best.name
        'best.pt'
    """
    from ultralytics import YOLO

    from damage.tasks.core.runtime import activate, configure_ultralytics

    device = str((extra_args or {}).get("device", cfg.device))
    ddp = is_multi_gpu(device)
    if ddp and (trainer_cls is not None or (cfg.finetune and cfg.finetune_guard and cfg.weights)):
        raise DamageError(f"train.device '{device}' trains with DDP in a subprocess, which drops this process's "
                          f"callbacks and trainer class: the fine-tune guard and custom trainers (pruning, "
                          f"distillation) need one device")
    data_yaml = Path(data_yaml).resolve()
    if not data_yaml.is_file():
        raise DatasetError(f"{data_yaml}: data.yaml not found")
    project = Path(out_dir).resolve()
    project.mkdir(parents=True, exist_ok=True)
    configure_ultralytics(activate())

    from damage.tasks.training.checkpoint import ultralytics_safe_load, vetted_model_path
    from damage.tasks.training.rng import private_augmentation_rngs

    resume_from = _resume_checkpoint(cfg, project, name)
    if resume_from is not None:
        _trim_results(resume_from)
        with ultralytics_safe_load():
            model = YOLO(vetted_model_path(resume_from))
        train_kwargs: dict[str, Any] = {"resume": True, "data": str(data_yaml)}
    else:
        src = model_source(cfg.model)
        if cfg.weights:
            w = Path(cfg.weights).expanduser()
            if not w.is_file():
                raise DamageError(f"train.weights '{cfg.weights}': file not found")
            with ultralytics_safe_load():  # train.init / train.weights: a file from the registry or S3
                model = YOLO(_sized_for_dataset(src, data_yaml, project), task="segment").load(vetted_model_path(w))
        elif cfg.finetune and not src.endswith(".pt"):
            raise DamageError("train.finetune needs train.weights or a .pt train.model to start from")
        else:
            with ultralytics_safe_load():
                model = YOLO(vetted_model_path(src) if src.endswith(".pt") and Path(src).is_file() else src,
                             task="segment")
        train_kwargs = build_train_args(cfg, data_yaml, project, name, seed)
    train_kwargs.update(extra_args or {})

    loop_done = [False]
    validated: dict[str, float] = {}  # filled by on_val_end: this epoch ran validation (per-class AP inside)

    def _val_end(validator) -> None:
        validated.clear()
        validated.update(class_ap50(validator))
        validated[_VALIDATED] = 1.0

    def _epoch_end(trainer) -> None:
        # Ultralytics fires this once more after the loop, for its final validation of best.pt
        # (at epoch + 1); those figures are TrainResult.metrics, so each epoch is reported once.
        if on_epoch is None or loop_done[0]:
            return
        loop_done[0] = bool(trainer.stop)
        metrics = {}
        metrics.update(normalise_metrics(trainer.label_loss_items(trainer.tloss, prefix="train")))
        metrics.update({(k if k.startswith("lr/") else f"lr/{k}"): float(v) for k, v in trainer.lr.items()})
        # with a wall-time budget (train.time_min) Ultralytics re-plans the epoch count after every epoch
        metrics["epochs_planned"] = float(trainer.epochs)
        # Validation metrics only for epochs that validated: with per-epoch validation off
        # (Ultralytics val=False) trainer.metrics still holds the last validation's figures.
        if validated.pop(_VALIDATED, None):
            metrics.update(normalise_metrics(trainer.metrics or {}))
            metrics.update(validated)
        validated.clear()
        if guard is not None and guard.last_figures:  # the guard's evaluator figures of this epoch's checkpoint
            metrics.update({k: float(v) for k, v in guard.last_figures.items()
                            if v is not None and math.isfinite(float(v))})
            guard.last_figures = {}
        on_epoch(int(trainer.epoch), metrics)

    model.add_callback("on_val_end", _val_end)

    accumulate: list[int] = []

    def _train_start(trainer) -> None:
        # the trainer's nominal accumulation (warmup ramps up to it from 1)
        accumulate.append(int(trainer.accumulate))
        if cfg.channels_last:
            use_channels_last(trainer.model)

    model.add_callback("on_train_start", _train_start)
    model.add_callback("on_fit_epoch_end", _epoch_end)
    guard = None
    if cfg.finetune and cfg.finetune_guard and cfg.weights:
        # best.pt = the fittest epoch that loses no class the parent had (damage.tasks.training.guard)
        if guard_eval is None:  # the guard scores as the gate does: its evaluator, never a default one
            raise DamageError("a guarded fine-tune (train.finetune_guard) needs guard_eval: "
                              "Evaluator.from_config(cfg).metrics_fn(data_yaml), the gate's evaluator")
        guard = ParentGuard(Path(cfg.weights), guard_eval, cfg.finetune_guard_tol)
        guard.attach(model)
    if trainer_cls is not None:
        train_kwargs["trainer"] = trainer_cls
    # augmentations draw from private generators: another thread's draws cannot shift them (rng.py)
    workers = int(train_kwargs.get("workers", cfg.workers))
    with private_augmentation_rngs(int(train_kwargs.get("seed", seed)), workers):
        model.train(**train_kwargs)

    trainer = model.trainer
    run_dir = Path(trainer.save_dir).resolve()
    best, last = run_dir / "weights" / "best.pt", run_dir / "weights" / "last.pt"
    if not best.is_file():  # training without validation improvements still leaves last.pt
        best = last
    history = _read_history(run_dir / "results.csv")
    if ddp and on_epoch is not None:  # the callbacks never ran: report the epochs from rank 0's results.csv
        for epoch, metrics in replay_epochs(history, int(train_kwargs.get("epochs") or cfg.epochs),
                                            bool(train_kwargs.get("val", True))):
            on_epoch(epoch, metrics)
    final = normalise_metrics(history[-1]) if history else {}
    # Ultralytics validates best.pt after training; its figures are the run's result.
    final.update(normalise_metrics(getattr(trainer, "metrics", {}) or {}))
    return TrainResult(
        best=best,
        last=last,
        run_dir=run_dir,
        metrics=final,
        epochs_run=len(history),
        history=history,
        args={k: v for k, v in train_kwargs.items() if k != "trainer"},
        accumulate=accumulate[0] if accumulate else None,
        guard=guard.state.summary() if guard is not None and guard.state is not None else None,
    )


DONE_MARKER = "{name}.done.json"


def finished_training(out_dir: Path, name: str = "train") -> TrainResult | None:
    """The result of a training run that completed in ``out_dir`` (its marker and best.pt exist)."""
    import json

    marker = Path(out_dir) / DONE_MARKER.format(name=name)
    try:
        d = json.loads(marker.read_text())
        res = TrainResult(best=Path(d["best"]), last=Path(d["last"]), run_dir=Path(d["run_dir"]),
                          metrics={k: float(v) for k, v in d["metrics"].items()}, epochs_run=int(d["epochs_run"]),
                          history=list(d.get("history", [])))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return res if res.best.is_file() else None


def _mark_finished(out_dir: Path, name: str, result: TrainResult) -> None:
    import json

    from damage.tasks.core.atomic import atomic_write_text

    atomic_write_text(Path(out_dir) / DONE_MARKER.format(name=name), json.dumps({
        "best": str(result.best), "last": str(result.last), "run_dir": str(result.run_dir),
        "metrics": result.metrics, "epochs_run": result.epochs_run, "history": result.history}, default=float))


def use_channels_last(model: Any) -> None:
    """Put a training model's weights, and every image batch its forward gets, in channels-last memory order
    (``train.channels_last``): the same FP32 maths, faster oneDNN convolutions on CPU. The training forward takes
    the batch dict (images under ``img``); inference calls with a tensor pass through unchanged."""
    import torch

    model.to(memory_format=torch.channels_last)
    forward = model.forward

    def forward_channels_last(x: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(x, dict) and isinstance(x.get("img"), torch.Tensor):
            x = {**x, "img": x["img"].contiguous(memory_format=torch.channels_last)}
        return forward(x, *args, **kwargs)

    model.forward = forward_channels_last


def epoch_line(epoch: int, total: int, previous_total: int | None, time_min: float | None,
               shown: dict[str, float]) -> str:
    """The per-epoch log line. Under a wall-time budget the total is Ultralytics' estimate, re-planned after
    every epoch; the line says so, and says when the estimate moved.

    Example:
        >>> epoch_line(1, 97, 36, 11, {"mask/mAP50": 0.5})
        'epoch 2/97 (re-planned from 36 epochs to fit the 11-minute budget): mask/mAP50 0.500'
        >>> epoch_line(0, 36, None, 11, {})
        'epoch 1/36 (estimated to fit the 11-minute budget; re-planned after each epoch): '
    """
    head = f"epoch {epoch + 1}/{total}"
    if time_min:
        if previous_total is None:
            head += f" (estimated to fit the {time_min:g}-minute budget; re-planned after each epoch)"
        elif previous_total != total:
            head += f" (re-planned from {previous_total} epochs to fit the {time_min:g}-minute budget)"
    return head + ": " + "  ".join(f"{k} {v:.3f}" for k, v in shown.items())


def train_step(data_yaml: Path, cfg: TrainConfig, out_dir: Path, parent_run_id: str, seed: int = 0,
               name: str = "train", full_config: dict[str, Any] | None = None,
               dataset_fingerprint: str | None = None, system_metrics_s: float = 0.0,
               dataset_source: str | None = None, reuse_finished: bool = False,
               evaluator: Any | None = None) -> TrainResult:
    """Train inside a nested MLflow run "train": params, per-epoch metrics, plots, weights.

    The nested run gets the training arguments as params, every epoch's losses, learning
    rates and box/mask P/R/mAP as metrics (step = epoch), and results.csv, the plots, best.pt
    and the resolved config as artifacts; the dataset as its input (digest = fingerprint) and
    system metrics every ``system_metrics_s`` seconds (0 = off). Inside a Prefect flow run, a
    progress artifact follows the epochs.

    With ``reuse_finished`` (the nightly flow, whose ``out_dir`` is keyed by data + config +
    code), a training that already completed in ``out_dir`` is not repeated: a retried flow run
    resumes after it (a finished ``last.pt`` has no optimiser state to resume from).

    ``evaluator`` (a ``damage.tasks.evaluation.evaluate.Evaluator``, the gate's) scores the epochs of a
    guarded fine-tune (``train.finetune_guard``); default: ``Evaluator`` at ``train.imgsz``.
    """
    from damage.tasks.core import tracking
    from damage.tasks.core.prefect_ui import Progress
    from damage.tasks.core.sysmetrics import system_metrics
    from damage.tasks.data.mlflow_input import log_dataset_input

    done = finished_training(out_dir, name) if reuse_finished else None
    if done is not None:
        with tracking.step_run(parent_run_id, name) as (c, run_id):
            tracking.set_tags(c, run_id, {"reused": "true", "best_weights": str(done.best)})
            tracking.log_metrics(c, run_id, {"epochs_run": done.epochs_run})
        print(f"training already finished for this pipeline key: reusing {done.best}")
        return done
    with tracking.step_run(parent_run_id, name) as (c, run_id):
        tracking.log_params(c, run_id, {"train": cfg.model_dump(), "seed": seed})
        dataset_fingerprint = log_dataset_input(c, run_id, data_yaml, dataset_fingerprint, "training",
                                                dataset_source)
        tracking.set_tags(c, run_id, {"dataset_fingerprint": dataset_fingerprint})
        progress = Progress(f"{name}-epochs", f"{name}: epochs done of {cfg.epochs}" if not cfg.time_min
                            else f"{name}: share of the {cfg.time_min:g}-minute training budget")

        planned = [None]  # the epoch count of the previous line: a change is a re-plan, said so

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            tracking.log_metrics(c, run_id, metrics, step=epoch)
            shown = {k: metrics[k] for k in ("train/seg_loss", "box/mAP50", "mask/mAP50", "mask/mAP50-95",
                                             "guard/mask_mAP50", "guard/worst_class_drop")
                     if k in metrics}
            total = int(metrics.get("epochs_planned") or cfg.epochs)
            print(epoch_line(epoch, total, planned[0], cfg.time_min, shown))
            planned[0] = total
            progress.update(min(100.0, 100.0 * (epoch + 1) / max(total, 1)))

        with system_metrics(run_id, system_metrics_s, c.tracking_uri):
            result = train_model(data_yaml, cfg, out_dir, seed=seed, name=name, on_epoch=on_epoch,
                                 guard_eval=evaluator.metrics_fn(data_yaml) if evaluator is not None else None)
        progress.update(100.0)
        # One-off figures stay out of the time-series charts: the best.pt validation is a JSON artifact
        # (its numbers are also the last points of the per-epoch series), the epoch count a tag.
        tracking.log_dict(c, run_id, {k: round(v, 6) for k, v in result.metrics.items()}, "results/final_metrics.json")
        tracking.set_tags(c, run_id, {"epochs_run": result.epochs_run})
        if result.accumulate is not None:
            tracking.set_tags(c, run_id, {"accumulate": result.accumulate})
        if result.guard is not None:
            tracking.set_tags(c, run_id, {k: str(v) for k, v in result.guard.items()})
            g = result.guard
            print(f"fine-tune guard: kept epoch {g['guard.chosen_epoch']} of {g['guard.epochs_judged']} "
                  f"({g['guard.qualified_epochs']} lost no class beyond {g['guard.tol']:g}); worst class change vs "
                  f"parent: {g['guard.chosen_worst_class']} {-g['guard.chosen_worst_drop']:+.3f}"
                  + ("" if g["guard.chosen_qualified"] else " - NO epoch kept every class: the gate will judge it"))
        for f in sorted(result.run_dir.glob("*")):
            if f.suffix in {".csv", ".png", ".jpg", ".yaml"} or f.name == "guard.json":
                tracking.log_artifact(c, run_id, f, "results")
        tracking.log_artifact(c, run_id, result.best, "weights")
        if full_config is not None:
            tracking.log_dict(c, run_id, full_config, "config/resolved.yaml")
        tracking.set_tags(c, run_id, {"best_weights": str(result.best)})
    _mark_finished(out_dir, name, result)
    return result
