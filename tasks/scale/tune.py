"""``damage tune``: recipe and hyperparameter search on Ray Tune, with the pipeline's own steps.

Each trial is the project's training (``damage.tasks.training.train.train_model``), scored after every epoch
by the project's evaluator (``Evaluator.from_config``) or sweep (``sweep_thresholds``), and after the
last epoch by both on ``best.pt``. It reports the objective per epoch, so an ASHA scheduler stops
the bad trials early. The objective is the worst damage class's mask AP50 (maximised) by default, or
a sweep objective (``tune.objective``: ``damage_mae`` is minimised at the trial's operating point).

MLflow: one parent run for the search, one nested run per trial (its params, per-epoch and final
per-class metrics, and its state: ``finished``, ``stopped_early`` or ``failed``). The driver settles
every trial's run after the search (a trial stopped by ASHA is killed before it can say so itself).
The winner is written as a whole config file (``winner.yaml``) that ``damage run --config`` accepts.

Ultralytics' own ``model.tune(use_ray=True)`` is not used: it resets the callbacks, shuts Ray down,
and for segmentation has open bugs where every trial trains identically (ultralytics#23791, #23814).

The search space (``configs/tune.yaml``) maps dotted config keys to one sampler each::

    space:
      train.lr0: {loguniform: [0.0005, 0.005]}
      train.cls: {choice: [0.5, 1.0]}
      train.batch: {grid: [4, 8]}          # every value, times `tune.trials` samples of the rest
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from damage.tasks.core.config import CLASSES, Config, ConfigError
from damage.tasks.core.config_load import config_with, read_yaml_mapping
from damage.tasks.core.errors import DamageError

WORST_DAMAGE_AP50 = "worst_damage_mask_ap50"  # the default objective's name (tags, reports)
METRIC = "objective"  # the key every trial reports and ASHA reads
STATE_TAG = "damage.tune.state"
TRIAL_TAG = "damage.tune.trial_id"
STATES = ("finished", "stopped_early", "failed")
TRIAL_FILE = "trial.json"  # written by a trial that finished: its final figures
SEARCH_FILE = "search.json"  # the search's identity: parent run, objective, space (for a resume)
# the sampler table: YAML name -> (Ray Tune function name, how the YAML arguments are passed)
SAMPLERS: dict[str, tuple[str, str]] = {
    "choice": ("choice", "list"),
    "grid": ("grid_search", "list"),
    "uniform": ("uniform", "args"),
    "loguniform": ("loguniform", "args"),
    "randint": ("randint", "args"),
}


@dataclass(frozen=True)
class Dimension:
    """One searched config key: ``sampler`` (a key of ``SAMPLERS``) with its ``values`` / bounds."""

    key: str
    sampler: str
    values: list[Any]


def load_space(path: str | os.PathLike, base: Config) -> list[Dimension]:
    """Read and check a search-space YAML against the config it varies.

    Every key must be a config key, every sampler a row of ``SAMPLERS``, and every value (for
    bounds: both ends) must be valid for its key, so a typo fails before any trial starts.

    Raises:
        ConfigError: missing/invalid file, unknown key (with the closest valid one), bad sampler or value.
    """
    p = Path(path)
    space = read_yaml_mapping(p, "search space (tune.space)").get("space")
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{p}: expected a non-empty mapping 'space:' of config key -> {{sampler: values}}")
    dims = []
    base_dict = base.to_dict()
    for key, spec in space.items():
        if not (isinstance(spec, dict) and len(spec) == 1):
            raise ConfigError(f"{p}: space.{key}: expected one sampler, e.g. {{choice: [a, b]}}")
        sampler, values = next(iter(spec.items()))
        if sampler not in SAMPLERS:
            raise ConfigError(f"{p}: space.{key}: unknown sampler '{sampler}' (one of {', '.join(SAMPLERS)})")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{p}: space.{key}.{sampler}: expected a non-empty list")
        if SAMPLERS[sampler][1] == "args" and (len(values) != 2 or not values[0] < values[1]):
            raise ConfigError(f"{p}: space.{key}.{sampler}: expected [low, high] with low < high, got {values}")
        for v in values:  # each value (each bound) must be a valid setting of the key
            config_with(base_dict, {key: v}, f"{p}: space.{key}")
        dims.append(Dimension(str(key), sampler, values))
    return dims


def param_space(dims: list[Dimension]) -> dict[str, Any]:
    """Ray Tune's ``param_space`` for the dimensions (dotted keys kept as they are)."""
    from ray import tune

    out = {}
    for d in dims:
        fn, style = SAMPLERS[d.sampler]
        out[d.key] = getattr(tune, fn)(d.values) if style == "list" else getattr(tune, fn)(*d.values)
    return out


# ----------------------------------------------------------------------------- objective


def objective_mode(objective: str | None) -> tuple[str, bool]:
    """``(name, maximize)`` of ``tune.objective`` (None = the worst damage class's mask AP50).

    Raises:
        DamageError: not a sweep objective.
    """
    if objective is None:
        return WORST_DAMAGE_AP50, True
    from damage.tasks.evaluation.sweep import get_objective

    return objective, get_objective(objective).maximize


def worst_damage_ap50(metrics: dict[str, float], vehicle: str = CLASSES[0]) -> float:
    """The lowest mask AP50 among the damage classes that have labels (every class but ``vehicle``); 0 if none.

    Example:
        >>> worst_damage_ap50({"mask_ap50/vehicle": 0.9, "mask_ap50/dent": 0.4, "mask_ap50/scratch": 0.2})
        0.2
    """
    vals = [float(v) for k, v in metrics.items()
            if k.startswith("mask_ap50/") and k.split("/", 1)[1] != vehicle and v is not None and math.isfinite(v)]
    return min(vals) if vals else 0.0


def worst_value(maximize: bool) -> float:
    """The value reported when a model has no figure (no vehicle matched for ``damage_mae``): the worst possible."""
    return 0.0 if maximize else 100.0  # AP/F1/fitness/recall in [0, 1]; damage-% error in points


def score(model: Path, data_yaml: Path, cfg: Config, objective: str | None, final: bool = False
          ) -> tuple[float, dict[str, float]]:
    """The objective of ``model`` and the figures behind it, measured as the pipeline measures.

    Per epoch only what the objective needs runs (the evaluator, or the sweep); ``final`` runs
    both: the per-class metrics and the operating point of the trial's best weights.
    """
    from damage.tasks.evaluation.evaluate import Evaluator
    from damage.tasks.evaluation.sweep import damage_metrics, sweep_thresholds

    name, maximize = objective_mode(objective)
    figures: dict[str, float] = {}
    value: float | None = None
    if objective is None or final:
        res = Evaluator.from_config(cfg)(model, data_yaml)
        figures.update({k: float(v) for k, v in res.metrics.items() if v is not None})
        value = worst_damage_ap50(res.metrics)
        figures[WORST_DAMAGE_AP50] = value
    if objective is not None or final:
        s = cfg.sweep
        sw = sweep_thresholds(model, data_yaml, s.split, cfg.imgsz, s.conf, s.iou, objective or s.objective,
                              s.min_precision, None, s.max_det)
        th = sw.thresholds
        figures.update({"sweep/conf": th["conf"], "sweep/iou": th["iou"]})
        if sw.damage is not None:
            figures.update({k: float(v) for k, v in damage_metrics(sw.damage).items() if v is not None})
        if objective is not None:
            value = th["value"]
            figures[f"sweep/{name}"] = worst_value(maximize) if value is None else float(value)
    if value is None or not math.isfinite(value):
        value = worst_value(maximize)
    return float(value), figures


# ----------------------------------------------------------------------------- the trial (a Ray worker)


@dataclass(frozen=True)
class TrialSettings:
    """What every trial of one search shares (passed with ``tune.with_parameters``)."""

    base: dict[str, Any]
    data_yaml: str
    out_root: str
    parent_run_id: str
    tracking_uri: str
    objective: str | None
    threads: int


def _trial_run(c: Any, s: TrialSettings, trial_id: str, name: str) -> str:
    """The trial's nested MLflow run: the one it had before a resume, else a new one."""
    from damage.tasks.core import tracking

    exp = c.get_run(s.parent_run_id).info.experiment_id
    found = c.search_runs([exp], f"tags.`{TRIAL_TAG}` = '{trial_id}' AND tags.`mlflow.parentRunId` = "
                                 f"'{s.parent_run_id}'", max_results=1)
    if found:
        c.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    return tracking.start_run(c, exp, name, s.parent_run_id, {TRIAL_TAG: trial_id, "damage.step": "tune-trial"})


def run_trial(params: dict[str, Any], settings: TrialSettings) -> None:
    """One trial: train with ``params`` applied, report the objective per epoch, score the best weights.

    A trial restarted after a resume continues its own training (``train.resume: auto`` in its own
    folder) and logs into its own MLflow run.
    """
    from ray import tune

    from damage.tasks.core import tracking
    from damage.tasks.core.atomic import atomic_write_json
    from damage.tasks.core.runtime import activate, configure_ultralytics
    from damage.tasks.data.dataset import load_data_yaml
    from damage.tasks.scale.ray_runtime import apply_worker_threads
    from damage.tasks.training.init import apply, offline_decision
    from damage.tasks.training.train import train_model

    apply_worker_threads(settings.threads)
    configure_ultralytics(activate())  # the worker's Ultralytics: state dir, its MLflow callback off
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    c = tracking.client(settings.tracking_uri)
    run_id = _trial_run(c, settings, trial_id, ctx.get_trial_name())
    tracking.log_params(c, run_id, {**params, "trial_id": trial_id})
    state, status = "failed", "FAILED"
    try:
        cfg = config_with(settings.base, {**params, "train.resume": "auto"}, f"trial {trial_id}")
        data_yaml = Path(settings.data_yaml)
        out = Path(settings.out_root) / "trials" / trial_id
        train_cfg = apply(cfg.train, offline_decision(cfg.train, load_data_yaml(data_yaml).names))
        last = out / "train" / "weights" / "last.pt"

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            value, figures = score(last, data_yaml, cfg, settings.objective)
            tracking.log_metrics(c, run_id, {**metrics, **figures, METRIC: value}, step=epoch)
            tune.report({METRIC: value, "epoch": epoch + 1, "final": 0})

        res = train_model(data_yaml, train_cfg, out, seed=cfg.seed, on_epoch=on_epoch)
        value, figures = score(res.best, data_yaml, cfg, settings.objective, final=True)
        final = {**figures, METRIC: value, "epochs_run": res.epochs_run}
        tracking.log_metrics(c, run_id, final, step=res.epochs_run)
        atomic_write_json(out / TRIAL_FILE, {"trial_id": trial_id, "run_id": run_id, "params": params,
                                             "best": str(res.best), **final})
        state, status = "finished", "FINISHED"
        tune.report({METRIC: value, "epoch": res.epochs_run, "final": 1})
    except SystemExit:  # Tune stops a trial by exiting its thread at a report (ASHA)
        # a stop at the final report comes after the trial finished, and the driver counts it finished
        # (_trial_rows): the same state here, since this write may land after the driver's (settle_runs)
        if state != "finished":
            state, status = "stopped_early", "KILLED"
        raise
    finally:
        tracking.set_tags(c, run_id, {STATE_TAG: state})
        c.set_terminated(run_id, status)


# ----------------------------------------------------------------------------- the search (the driver)


@dataclass
class SearchResult:
    """What a search produced: every trial's row, the winner and the files written."""

    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    objective: str
    maximize: bool
    winner_path: Path | None
    out_dir: Path
    parent_run_id: str
    counts: dict[str, int] = field(default_factory=dict)


def trial_dirname(trial: Any) -> str:
    """Tune's folder of a trial: its id (the trial's training folder and MLflow tag use the same id)."""
    return str(trial.trial_id)


def _trial_rows(grid: Any, out_root: Path) -> list[dict[str, Any]]:
    rows = []
    for r in grid:
        tid = Path(r.path).name  # trial_dirname
        final_file = out_root / "trials" / tid / TRIAL_FILE
        done = json.loads(final_file.read_text()) if final_file.is_file() else None
        if r.error is not None:
            state = "failed"
        elif done is not None and (r.metrics or {}).get("final") == 1:
            state = "finished"
        else:
            state = "stopped_early"
        rows.append({"trial_id": tid, "state": state, "params": dict(r.config or {}),
                     METRIC: (done or {}).get(METRIC, (r.metrics or {}).get(METRIC)),
                     "epochs": (r.metrics or {}).get("epoch"), "error": None if r.error is None else str(r.error)[:500],
                     "run_id": (done or {}).get("run_id")})
    return sorted(rows, key=lambda row: str(row["trial_id"]))


def choose_best(rows: list[dict[str, Any]], maximize: bool) -> dict[str, Any] | None:
    """The finished trial with the best final objective (ties: the lower trial id); None if none finished.

    Example:
        >>> choose_best([{"state": "finished", "trial_id": "a", "objective": 0.2},
        ...              {"state": "stopped_early", "trial_id": "b", "objective": 0.9}], True)["trial_id"]
        'a'
    """
    done = [r for r in rows if r["state"] == "finished" and r[METRIC] is not None]
    if not done:
        return None
    sign = 1.0 if maximize else -1.0
    return min(done, key=lambda r: (-sign * float(r[METRIC]), str(r["trial_id"])))


def settle_runs(c: Any, parent_run_id: str, rows: list[dict[str, Any]]) -> dict[str, int]:
    """Give every trial's nested run its final state; a trial that crashed before opening one gets one.

    A trial ASHA stopped was killed mid-report and a crashed worker may never have closed its run:
    the driver, which saw the outcome, writes it. Returns the count per state.
    """
    from damage.tasks.core import tracking

    exp = c.get_run(parent_run_id).info.experiment_id
    runs = {r.data.tags.get(TRIAL_TAG): r for r in c.search_runs(
        [exp], f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=5000)}
    status = {"finished": "FINISHED", "stopped_early": "KILLED", "failed": "FAILED"}
    counts = dict.fromkeys(STATES, 0)
    for row in rows:
        run = runs.get(str(row["trial_id"]))
        run_id = run.info.run_id if run is not None else tracking.start_run(
            c, exp, f"trial-{row['trial_id']}", parent_run_id, {TRIAL_TAG: str(row["trial_id"])})
        row["run_id"] = run_id
        tags = {STATE_TAG: row["state"]}
        if row["error"]:
            tags["damage.tune.error"] = row["error"]
        tracking.set_tags(c, run_id, tags)
        c.set_terminated(run_id, status[row["state"]])
        counts[row["state"]] += 1
    return counts


def write_winner(base: dict[str, Any], params: dict[str, Any], path: Path, note: str) -> Path:
    """The base config with the winner's ``params`` applied, as a YAML that ``damage run --config`` reads.

    Secrets never reach the file: ``notify.urls`` is emptied (``Config.to_dict`` masks them) and is
    set again by the file the team deploys with.
    """
    from damage.tasks.core.atomic import atomic_write_text

    cfg = config_with(base, params, "winner")
    d = cfg.to_dict()
    d["notify"]["urls"] = []
    text = "".join(f"# {line}\n" for line in note.splitlines()) + yaml.safe_dump(d, sort_keys=False)
    atomic_write_text(path, text)
    return path


def resolve_space(path: str) -> Path:
    """``tune.space``: as given (absolute, or relative to the working directory), else in this checkout."""
    from damage.tasks.core.config import DEFAULT_CONFIG

    p = Path(path).expanduser()
    if p.is_file() or p.is_absolute():
        return p
    return DEFAULT_CONFIG.parents[1] / p


def save_search(out_dir: Path, parent_run_id: str, data_yaml: Path) -> None:
    """Record which MLflow run and dataset a search in ``out_dir`` belongs to (read by ``--resume``)."""
    from damage.tasks.core.atomic import atomic_write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / SEARCH_FILE, {"parent_run_id": parent_run_id, "data_yaml": str(data_yaml)})


def load_search(out_dir: Path) -> dict[str, str]:
    """The record ``save_search`` wrote.

    Raises:
        DamageError: no search was started in ``out_dir``.
    """
    p = Path(out_dir) / SEARCH_FILE
    try:
        d = json.loads(p.read_text())
        return {"parent_run_id": str(d["parent_run_id"]), "data_yaml": str(d["data_yaml"])}
    except (OSError, ValueError, KeyError, TypeError):
        raise DamageError(f"{p}: no search to resume here (missing or unreadable; start one without --resume)") from None


def trial_settings_for(cfg: Config, data_yaml: Path, out_dir: Path, parent_run_id: str, tracking_uri: str,
                       threads: int) -> TrialSettings:
    """The settings every trial of a search shares."""
    return TrialSettings(cfg.to_dict(), str(Path(data_yaml).resolve()), str(out_dir.resolve()), parent_run_id,
                         tracking_uri, cfg.tune.objective, threads)


def run_search(cfg: Config, data_yaml: Path, out_dir: Path, parent_run_id: str, tracking_uri: str,
               space: list[Dimension] | None = None, resume: bool = False,
               trial_fn: Callable[..., None] = run_trial) -> SearchResult:
    """Run (or resume) the search on the connected Ray cluster; settle the MLflow runs; write the winner.

    Args:
        cfg: the whole config (``tune:`` for the search, everything else for the trials).
        data_yaml: the dataset every trial trains and is scored on.
        out_dir: the search's folder (Tune's experiment, the trials' training folders, ``winner.yaml``).
        parent_run_id: the search's MLflow run; each trial nests under it.
        tracking_uri: MLflow tracking URI the trials log to.
        space: the dimensions (None = read ``cfg.tune.space``).
        resume: continue the search in ``out_dir`` (Tune's restore: finished trials stay, the rest run).
        trial_fn: the trainable (tests inject one).

    Raises:
        DamageError: nothing to resume in ``out_dir``, or a bad space.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    t = cfg.tune
    name, maximize = objective_mode(t.objective)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = max(1, int(t.cpus_per_trial))
    settings = trial_settings_for(cfg, data_yaml, out_dir, parent_run_id, tracking_uri, threads)
    trainable = tune.with_resources(tune.with_parameters(trial_fn, settings=settings),
                                    {"cpu": t.cpus_per_trial, "gpu": t.gpus_per_trial})
    exp_path = out_dir / "search"
    if resume:
        if not tune.Tuner.can_restore(str(exp_path)):
            raise DamageError(f"{exp_path}: no search to resume here (start one with `damage tune` first)")
        tuner = tune.Tuner.restore(str(exp_path), trainable, resume_unfinished=True, resume_errored=False)
    else:
        dims = space if space is not None else load_space(resolve_space(t.space), cfg)
        # each trial reports once per epoch and once more for the best weights
        asha = ASHAScheduler(time_attr="training_iteration", max_t=cfg.train.epochs + 1,
                             grace_period=t.grace_period, reduction_factor=t.reduction_factor)
        tuner = tune.Tuner(
            trainable, param_space=param_space(dims),
            tune_config=tune.TuneConfig(metric=METRIC, mode="max" if maximize else "min", scheduler=asha,
                                        num_samples=t.trials, max_concurrent_trials=t.max_concurrent or None,
                                        search_alg=BasicVariantGenerator(random_state=t.search_seed),
                                        trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(name="search", storage_path=str(out_dir), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=t.max_failures,
                                                                        fail_fast=False)))
    grid = tuner.fit()
    from damage.tasks.core import tracking

    rows = _trial_rows(grid, out_dir)
    c = tracking.client(tracking_uri)
    counts = settle_runs(c, parent_run_id, rows)
    best = choose_best(rows, maximize)
    winner = None
    if best is not None:
        note = (f"damage tune: winner {best['trial_id']} ({name} = {best[METRIC]:.4f}) of {len(rows)} trials, "
                f"MLflow parent run {parent_run_id}\nsearched: " + json.dumps(best["params"]))
        winner = write_winner(settings.base, best["params"], out_dir / "winner.yaml", note)
        tracking.log_params(c, parent_run_id, {f"best.{k}": v for k, v in best["params"].items()})
        tracking.log_metrics(c, parent_run_id, {f"best/{name}": best[METRIC]})
        tracking.set_tags(c, parent_run_id, {"damage.tune.best_trial": best["trial_id"],
                                             "damage.tune.best_run": best["run_id"]})
        tracking.log_artifact(c, parent_run_id, winner)
    tracking.log_metrics(c, parent_run_id, {f"trials/{k}": v for k, v in counts.items()})
    tracking.log_dict(c, parent_run_id, rows, "trials.json")
    return SearchResult(rows, best, name, maximize, winner, out_dir, parent_run_id, counts)
