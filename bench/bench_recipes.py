"""Benchmark: training recipes for the demo, per-class mask AP50 against wall time, one table.

Each recipe is a row of ``RECIPES``: synthetic-data settings (``data.synth``), training settings
(``train``) and optionally a model YAML family. A run generates the dataset (cached per data
settings under ``--root``), trains with ``damage.tasks.training.train.train_model`` (the pipeline's own
trainer), then evaluates the last weights with the pipeline's evaluator (``evaluate_model``,
conf floor 0.001, the val split). It records training wall time, the 1-minute load average
sampled every 5 s during training (the machine may be shared), image passes per second, overall
mask mAP50 and every class's mask AP50, appends one JSON line per run to ``--out`` and prints the
table of every run in that file.

``--scale`` multiplies every recipe's epochs (0.4 = screening budget); ``--epochs E`` sets every
recipe's epochs to E times its ``epochs_scale`` (a recipe whose epoch costs more CPU, e.g. bigger
images, gets fewer at the same CPU budget); ``--curve K`` saves a checkpoint every K epochs and
evaluates each afterwards (the learning curve, outside the timed training). Each row also holds the
per-vehicle damage-percentage MAE at the operating point the demo's sweep would choose (its conf x
IoU grid, objective ``damage_mae``).

``--device 0 --jobs 8`` runs the recipes in parallel processes on a GPU: a wide search at a fixed
epoch count (the epochs a slow 2-core CPU gets in the demo's budget), whose winner is then confirmed
on the CPU. GPU wall times are not CPU wall times: compare recipes there by accuracy at equal epochs
(and equal CPU cost, through ``epochs_scale``), never by their times.

Usage:
    .venv/bin/python bench/bench_recipes.py --list
    .venv/bin/python bench/bench_recipes.py --recipe base --recipe adamw --scale 0.4
    .venv/bin/python bench/bench_recipes.py --recipe demo --curve 4
    .venv/bin/python bench/bench_recipes.py --table            # print the table of earlier runs
    python bench/bench_recipes.py --group search24 --epochs 24 --device 0 --jobs 8   # GPU search
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Shared by every recipe unless it overrides them. Screened on 2 CPU cores (see
# bench/learning_experiments.md for the measured table and why the demo recipe won).
BASE_SYNTH: dict[str, Any] = {"images": 400, "imgsz": 160, "val_fraction": 0.2, "seed": 0,
                              "closeup_fraction": 0.65, "zoom": [1.8, 2.8], "balance": True}
BASE_TRAIN: dict[str, Any] = {"model": "n", "epochs": 36, "imgsz": 160, "batch": 8, "nbs": 8, "val": False,
                              "optimizer": "AdamW", "lr0": 0.002, "lrf": 0.01, "cos_lr": True,
                              "warmup_epochs": 1.0, "augment": "light", "patience": 0, "cache": "ram"}

_SGD = {"optimizer": "SGD", "lr0": 0.01}
RECIPES: dict[str, dict[str, Any]] = {
    # v3 data (65 % close-ups, balanced), AdamW lr 0.002, nbs = batch = 8, no per-epoch val
    "base": {},
    # the recipe: SGD lr 0.01 (nbs 8), and the variants screened with it
    "sgd": {"train": _SGD},
    "sgd-nbs64": {"train": {**_SGD, "nbs": 64}},  # Ultralytics' default: one step per 8 batches of 8
    "sgd-scenes": {"synth": {"closeup_fraction": 0.0}, "train": _SGD},
    "sgd-closeup90": {"synth": {"closeup_fraction": 0.9}, "train": _SGD},
    "sgd-mosaic": {"train": {**_SGD, "augment": "default"}},
    # AdamW at a lower LR (Ultralytics' "auto" picks about 0.0009 for 7 classes)
    "adamw-lr1e-3": {"train": {"lr0": 0.001}},
    # whole scenes only (v2-like composition, balanced)
    "scenes": {"synth": {"closeup_fraction": 0.0}},
    # mostly close-ups
    "closeup90": {"synth": {"closeup_fraction": 0.9}},
    # half the batch: twice the optimiser steps per epoch at about the same CPU cost per image
    "batch4": {"train": {"batch": 4, "nbs": 4}},
    # stronger close-ups: damage about 1.3x larger in the frame (rendering costs ~1.7x)
    "zoom3": {"synth": {"zoom": [2.5, 3.5]}},
    # smaller images: 1.56x the epochs in the same wall time
    "px128": {"synth": {"imgsz": 128}, "train": {"imgsz": 128, "epochs": 56}},
    # half the images, twice the epochs (equal image passes)
    "half-data": {"synth": {"images": 200}, "train": {"epochs": 72}},
    # Ultralytics' default augmentation (mosaic) instead of the light profile
    "mosaic": {"train": {"augment": "default"}},
    # per-epoch validation on (what the old demo did): costs wall time, not accuracy
    "val-on": {"train": {"val": True}},
    # model families at the same data and recipe (issue 18 item 4)
    "yolo11n": {"family": "yolo11n-seg.yaml"},
    "yolo26n": {"family": "yolo26n-seg.yaml"},
    # the demo's recipe (configs/demo.yaml: batch 4, nbs 4, 30 epochs) per family; with --minutes M every
    # family trains for the same wall time (Ultralytics' time budget re-plans the epochs and the LR schedule)
    "demo-yolov8n": {"train": {"batch": 4, "nbs": 4, "epochs": 30}},
    "demo-yolo11n": {"family": "yolo11n-seg.yaml", "train": {"batch": 4, "nbs": 4, "epochs": 30}},
    "demo-yolo26n": {"family": "yolo26n-seg.yaml", "train": {"batch": 4, "nbs": 4, "epochs": 30}},
}

# The demo's recipe (configs/demo.yaml) and one change each: the search for the epochs a slow 2-core CPU
# gets in the demo's 11 training minutes (24-27 at 27 s per epoch). "args" are further Ultralytics train
# arguments; "epochs_scale" keeps the CPU cost equal where a change makes an epoch dearer or cheaper.
_DEMO: dict[str, Any] = {"batch": 4, "nbs": 4, "epochs": 24}
SEARCH: dict[str, dict[str, Any]] = {
    "d-base": {"train": _DEMO},
    "d-seed1": {"train": _DEMO, "seed": 1},
    "d-seed2": {"train": _DEMO, "seed": 2},
    "d-lr3e-3": {"train": {**_DEMO, "lr0": 0.003}},
    "d-lr5e-3": {"train": {**_DEMO, "lr0": 0.005}},
    "d-lrf0.1": {"train": {**_DEMO, "lrf": 0.1}},
    "d-nowarmup": {"train": {**_DEMO, "warmup_epochs": 0.0}},
    "d-b2": {"train": {**_DEMO, "batch": 2, "nbs": 2}},
    "d-b8": {"train": {**_DEMO, "batch": 8, "nbs": 8}},
    "d-cls1": {"train": {**_DEMO, "cls": 1.0}},
    "d-cls1-lrf0.1": {"train": {**_DEMO, "lrf": 0.1, "cls": 1.0}},
    "d-box10": {"train": {**_DEMO, "box": 10.0}},
    "d-copypaste": {"train": _DEMO, "args": {"copy_paste": 0.5}},
    "d-scale0.3": {"train": _DEMO, "args": {"scale": 0.3}},
    "d-mosaic0.3": {"train": _DEMO, "args": {"mosaic": 0.3}},
    "d-closeup85": {"train": _DEMO, "synth": {"closeup_fraction": 0.85}},
    "d-zoom3": {"train": _DEMO, "synth": {"zoom": [2.5, 3.5]}},
    "d-img300": {"train": _DEMO, "synth": {"images": 300}, "epochs_scale": 4 / 3},
    "d-img600": {"train": _DEMO, "synth": {"images": 600}, "epochs_scale": 2 / 3},
    "d-px192": {"train": {**_DEMO, "imgsz": 192}, "synth": {"imgsz": 192}, "epochs_scale": (160 / 192) ** 2},
}
RECIPES.update(SEARCH)
GROUPS: dict[str, list[str]] = {"search24": list(SEARCH)}


def _merge(recipe: dict[str, Any], scale: float,
           epochs: int | None = None) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    synth = {**BASE_SYNTH, **recipe.get("synth", {})}
    train = {**BASE_TRAIN, **recipe.get("train", {})}
    if epochs is not None:
        train["epochs"] = max(1, round(epochs * recipe.get("epochs_scale", 1.0)))
    else:
        train["epochs"] = max(1, round(train["epochs"] * scale))
    return synth, train, recipe.get("family")


def _family_yaml(name: str, work: Path) -> str:
    """A copy of Ultralytics' family YAML under its scaled name (the scale is read from the name)."""
    import yaml
    from ultralytics.nn.tasks import yaml_model_load

    d = yaml_model_load(name)  # resolves yolo11n-seg.yaml -> cfg/models/11/yolo11-seg.yaml, scale n
    d.pop("yaml_file", None)
    out = work / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(d, sort_keys=False))
    return str(out)


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process and its threads so far."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class _LoadSampler(threading.Thread):
    """Samples the 1-minute load average every ``period`` seconds until stopped."""

    def __init__(self, period: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.period, self.samples, self._stop_evt = period, [], threading.Event()

    def run(self) -> None:
        while not self._stop_evt.wait(self.period):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> float:
        self._stop_evt.set()
        self.join()
        return sum(self.samples) / len(self.samples) if self.samples else os.getloadavg()[0]


def dataset(root: Path, synth: dict[str, Any]) -> Path:
    """Generate (or reuse) the synthetic dataset for these data settings; returns its data.yaml."""
    from damage.tasks.core.config import DataConfig
    from damage.tasks.data.source import resolve_source

    cfg = DataConfig(source="synth", synth=synth)
    return resolve_source(cfg, root / "datasets", root / "cache")


def _demo_sweep() -> dict[str, Any]:
    """The demo's sweep grid and objective, read from configs/demo.yaml: the MAE a recipe's model gets there."""
    from damage.tasks.core.config import DEFAULT_CONFIG
    from damage.tasks.core.config_load import load_config

    sw = load_config(DEFAULT_CONFIG.parent / "demo.yaml").sweep
    return {"conf_grid": sw.conf, "iou_grid": sw.iou, "objective": sw.objective, "min_precision": sw.min_precision}


def run_recipe(name: str, root: Path, scale: float = 1.0, curve: int = 0, seed: int | None = None,
               minutes: float | None = None, epochs: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """Train and evaluate one recipe; returns its row (timings, load, per-class mask AP50, damage MAE)."""
    from damage.tasks.core.config import TrainConfig
    from damage.tasks.evaluation.evaluate import evaluate_model
    from damage.tasks.evaluation.sweep import sweep_thresholds
    from damage.tasks.training.train import train_model

    recipe = RECIPES[name]
    seed = recipe.get("seed", 0) if seed is None else seed
    synth, train, family = _merge(recipe, scale, epochs)
    train["device"] = device
    t0 = time.perf_counter()
    data_yaml = dataset(root, synth)
    data_s = time.perf_counter() - t0
    if family:
        train["model"] = _family_yaml(family, root / "families")
    if minutes:
        train["time_min"] = minutes  # equal wall time: overrides epochs
    cfg = TrainConfig(**train)
    extra = {**recipe.get("args", {}), **({"save_period": curve} if curve else {})}
    if device != "cpu":
        extra["amp"] = False  # FP32 as on the CPU (and no AMP check, which downloads a model)
    run_name = f"{name}-x{scale:g}-{int(time.time())}-{os.getpid()}"
    load = _LoadSampler()
    load.start()
    t0, cpu0 = time.perf_counter(), _cpu_s()
    res = train_model(data_yaml, cfg, root / "runs", seed=seed, name=run_name, extra_args=extra)
    train_s, cpu_s = time.perf_counter() - t0, _cpu_s() - cpu0
    mean_load = load.stop()
    n_train = len(list((data_yaml.parent / "images" / "train").iterdir()))
    ev = evaluate_model(res.last, data_yaml, split="val", imgsz=cfg.imgsz, conf=0.001)
    sw = sweep_thresholds(res.last, data_yaml, split="val", imgsz=cfg.imgsz, **_demo_sweep())
    row: dict[str, Any] = {
        "recipe": name, "scale": scale, "family": family or f"yolov8{train['model']}-seg.yaml",
        "synth": synth, "train": {k: v for k, v in train.items() if k != "model"},
        "args": recipe.get("args", {}), "seed": seed, "device": device,
        "damage_mae": None if sw.damage is None else round(sw.damage.mae, 3),
        "operating_point": {"conf": sw.best["conf"], "iou": sw.best["iou"]},
        "data_s": round(data_s, 1), "train_s": round(train_s, 1), "cpu_s": round(cpu_s, 1), "load1": round(mean_load, 2),
        "img_per_s": round(res.epochs_run * n_train / train_s, 2), "accumulate": res.accumulate,
        "epochs_run": res.epochs_run, "minutes": minutes,
        "mask_mAP50": round(ev.metrics["mask/mAP50"], 4), "box_mAP50": round(ev.metrics["box/mAP50"], 4),
        "class_mask_AP50": {r["class"]: (None if r["mask/AP50"] is None else round(r["mask/AP50"], 4))
                            for r in ev.per_class},
        "val_instances": {r["class"]: r["instances"] for r in ev.per_class},
        "history_loss": [round(h.get("train/seg_loss", float("nan")), 4) for h in res.history],
        "weights": str(res.last),
    }
    if curve:
        points = []
        for ck in sorted(res.last.parent.glob("epoch*.pt"), key=lambda p: int(p.stem[5:])):
            e = evaluate_model(ck, data_yaml, split="val", imgsz=cfg.imgsz, conf=0.001)
            points.append({"epoch": int(ck.stem[5:]) + 1, "mask_mAP50": round(e.metrics["mask/mAP50"], 4),
                           **{r["class"]: round(r["mask/AP50"] or 0.0, 3) for r in e.per_class}})
        row["curve"] = points
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: one line per run, every class's mask AP50."""
    from damage.tasks.core.config import CLASSES

    head = ["recipe", "optimiser lr0 batch/nbs imgsz", "close-up", "x", "epochs", "train s", "cpu s", "load1", "img/s", "acc", "mask mAP50", *CLASSES, "damage MAE"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cls = [("-" if r["class_mask_AP50"].get(c) is None else f"{r['class_mask_AP50'][c]:.3f}") for c in CLASSES]
        t = r["train"]
        opt = f"{t['optimizer']} {t['lr0']:g} b{t['batch']}/nbs{t['nbs']} {t['imgsz']}px"
        lines.append("| " + " | ".join([r["recipe"], opt, f"{r['synth']['closeup_fraction']:g}", f"{r['scale']:g}", str(r.get("epochs_run") or r["train"]["epochs"]),
                                        f"{r['train_s']:.0f}", f"{r.get('cpu_s', 0):.0f}", f"{r['load1']:.2f}", f"{r['img_per_s']:.1f}",
                                        str(r["accumulate"]), f"{r['mask_mAP50']:.3f}", *cls,
                                        "-" if r.get("damage_mae") is None else f"{r['damage_mae']:.2f}"]) + " |")
    return "\n".join(lines)


def _record(row: dict[str, Any], machine: Any, out: Path) -> None:
    row = {**row, "machine": machine}
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: row[k] for k in ("recipe", "seed", "epochs_run", "train_s", "mask_mAP50",
                                          "class_mask_AP50", "damage_mae")}), flush=True)


def _worker(name: str, root: Path, kw: dict[str, Any], threads: int) -> dict[str, Any]:
    """One recipe in a fresh process: the pipeline's runtime set up, ``threads`` CPU threads."""
    # no oversubscription: configure_ultralytics (inside train_model) sets torch's threads from this
    os.environ["OMP_NUM_THREADS"] = os.environ["DAMAGE_TORCH_THREADS"] = str(threads)
    from damage.tasks.core.runtime import activate

    activate()
    return run_recipe(name, root, **kw)


def _run_parallel(names: list[str], root: Path, kw: dict[str, Any], jobs: int, machine: Any, out: Path) -> None:
    """Generate every distinct dataset first (one writer each), then train ``jobs`` recipes at once."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    seen: set[str] = set()
    for name in names:
        synth = _merge(RECIPES[name], kw["scale"], kw["epochs"])[0]
        key = json.dumps(synth, sort_keys=True)
        if key not in seen:
            seen.add(key)
            dataset(root, synth)
    threads = max(1, (os.cpu_count() or 2) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_worker, n, root, kw, threads): n for n in names}
        for fut in as_completed(futures):
            try:
                _record(fut.result(), machine, out)
            except Exception as e:  # one failed recipe must not lose the others' rows
                print(f"recipe {futures[fut]} failed: {type(e).__name__}: {e}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", action="append", default=[], help="recipe name (repeatable); see --list")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every recipe's epochs (screening)")
    ap.add_argument("--curve", type=int, default=0, help="evaluate a checkpoint every K epochs (learning curve)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="train every recipe for this wall time (train.time_min; overrides epochs and --scale)")
    ap.add_argument("--root", type=Path, default=None, help="work dir (default: $DAMAGE_STATE_DIR/bench_recipes)")
    ap.add_argument("--out", type=Path, default=None, help="JSON lines results file (default: ROOT/results.jsonl)")
    ap.add_argument("--group", action="append", default=[], help=f"a group of recipes: {', '.join(GROUPS)}")
    ap.add_argument("--epochs", type=int, default=None,
                    help="every recipe trains this many epochs x its epochs_scale (overrides --scale)")
    ap.add_argument("--seed", type=int, default=None, help="training seed (default: the recipe's, else 0)")
    ap.add_argument("--device", default="cpu", help="training device: cpu or a CUDA index such as 0")
    ap.add_argument("--jobs", type=int, default=1, help="recipes trained at once, each in its own process")
    ap.add_argument("--data-only", action="store_true", help="only generate the recipes' datasets")
    ap.add_argument("--list", action="store_true", help="list the recipes and exit")
    ap.add_argument("--table", action="store_true", help="print the table of the runs in --out and exit")
    args = ap.parse_args()
    if args.list:
        for name, r in RECIPES.items():
            print(f"{name:14s} {json.dumps(r)}")
        return
    from damage.tasks.core.runtime import activate

    paths = activate()
    from bench.common import announce_machine

    machine = announce_machine()
    root = (args.root or paths.root / "bench_recipes").resolve()
    out = args.out or root / "results.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    args.recipe += [r for g in args.group for r in GROUPS[g]]
    unknown = [r for r in args.recipe if r not in RECIPES]
    if unknown:
        sys.exit(f"unknown recipe(s) {unknown}; known: {', '.join(RECIPES)}")
    if args.data_only:
        for name in args.recipe:
            t0 = time.perf_counter()
            print(name, dataset(root, _merge(RECIPES[name], args.scale)[0]), f"{time.perf_counter() - t0:.1f}s")
        return
    kw = {"scale": args.scale, "curve": args.curve, "seed": args.seed, "minutes": args.minutes,
          "epochs": args.epochs, "device": args.device}
    if args.jobs <= 1:
        for name in args.recipe:
            _record(run_recipe(name, root, **kw), machine, out)
    else:
        _run_parallel(args.recipe, root, kw, args.jobs, machine, out)
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.is_file() else []
    print(table(rows))


if __name__ == "__main__":
    main()
