"""Benchmark: training recipes for the demo, per-class mask AP50 against wall time, one table.

Each recipe is a row of ``RECIPES``: synthetic-data settings (``data.synth``), training settings
(``train``) and optionally a model YAML family. A run generates the dataset (cached per data
settings under ``--root``), trains with ``tasks.training.train.train_model`` (the pipeline's own
trainer), then evaluates the last weights with the pipeline's evaluator (``evaluate_model``,
conf floor 0.001, the val split). It records training wall time, the 1-minute load average
sampled every 5 s during training (the machine may be shared), image passes per second, overall
mask mAP50 and every class's mask AP50, appends one JSON line per run to ``--out`` and prints the
table of every run in that file.

``--scale`` multiplies every recipe's epochs (0.4 = screening budget); ``--curve K`` saves a
checkpoint every K epochs and evaluates each afterwards (the learning curve, outside the timed
training).

Usage:
    .venv/bin/python bench/bench_recipes.py --list
    .venv/bin/python bench/bench_recipes.py --recipe base --recipe adamw --scale 0.4
    .venv/bin/python bench/bench_recipes.py --recipe demo --curve 4
    .venv/bin/python bench/bench_recipes.py --table            # print the table of earlier runs
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


def _merge(recipe: dict[str, Any], scale: float) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    synth = {**BASE_SYNTH, **recipe.get("synth", {})}
    train = {**BASE_TRAIN, **recipe.get("train", {})}
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
    from tasks.core.config import DataConfig
    from tasks.data.source import resolve_source

    cfg = DataConfig(source="synth", synth=synth)
    return resolve_source(cfg, root / "datasets", root / "cache")


def run_recipe(name: str, root: Path, scale: float = 1.0, curve: int = 0, seed: int = 0,
               minutes: float | None = None) -> dict[str, Any]:
    """Train and evaluate one recipe; returns its row (timings, load, per-class mask AP50)."""
    from tasks.core.config import TrainConfig
    from tasks.evaluation.evaluate import evaluate_model
    from tasks.training.train import train_model

    synth, train, family = _merge(RECIPES[name], scale)
    t0 = time.perf_counter()
    data_yaml = dataset(root, synth)
    data_s = time.perf_counter() - t0
    if family:
        train["model"] = _family_yaml(family, root / "families")
    if minutes:
        train["time_min"] = minutes  # equal wall time: overrides epochs
    cfg = TrainConfig(**train)
    extra = {"save_period": curve} if curve else {}
    run_name = f"{name}-x{scale:g}-{int(time.time())}"
    load = _LoadSampler()
    load.start()
    t0, cpu0 = time.perf_counter(), _cpu_s()
    res = train_model(data_yaml, cfg, root / "runs", seed=seed, name=run_name, extra_args=extra)
    train_s, cpu_s = time.perf_counter() - t0, _cpu_s() - cpu0
    mean_load = load.stop()
    n_train = len(list((data_yaml.parent / "images" / "train").iterdir()))
    ev = evaluate_model(res.last, data_yaml, split="val", imgsz=cfg.imgsz, conf=0.001)
    row: dict[str, Any] = {
        "recipe": name, "scale": scale, "family": family or f"yolov8{train['model']}-seg.yaml",
        "synth": synth, "train": {k: v for k, v in train.items() if k != "model"},
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
    from tasks.core.config import CLASSES

    head = ["recipe", "optimiser lr0 batch/nbs imgsz", "close-up", "x", "epochs", "train s", "cpu s", "load1", "img/s", "acc", "mask mAP50", *CLASSES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cls = [("-" if r["class_mask_AP50"].get(c) is None else f"{r['class_mask_AP50'][c]:.3f}") for c in CLASSES]
        t = r["train"]
        opt = f"{t['optimizer']} {t['lr0']:g} b{t['batch']}/nbs{t['nbs']} {t['imgsz']}px"
        lines.append("| " + " | ".join([r["recipe"], opt, f"{r['synth']['closeup_fraction']:g}", f"{r['scale']:g}", str(r.get("epochs_run") or r["train"]["epochs"]),
                                        f"{r['train_s']:.0f}", f"{r.get('cpu_s', 0):.0f}", f"{r['load1']:.2f}", f"{r['img_per_s']:.1f}",
                                        str(r["accumulate"]), f"{r['mask_mAP50']:.3f}", *cls]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", action="append", default=[], help="recipe name (repeatable); see --list")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every recipe's epochs (screening)")
    ap.add_argument("--curve", type=int, default=0, help="evaluate a checkpoint every K epochs (learning curve)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="train every recipe for this wall time (train.time_min; overrides epochs and --scale)")
    ap.add_argument("--root", type=Path, default=None, help="work dir (default: $DAMAGE_STATE_DIR/bench_recipes)")
    ap.add_argument("--out", type=Path, default=None, help="JSON lines results file (default: ROOT/results.jsonl)")
    ap.add_argument("--data-only", action="store_true", help="only generate the recipes' datasets")
    ap.add_argument("--list", action="store_true", help="list the recipes and exit")
    ap.add_argument("--table", action="store_true", help="print the table of the runs in --out and exit")
    args = ap.parse_args()
    if args.list:
        for name, r in RECIPES.items():
            print(f"{name:14s} {json.dumps(r)}")
        return
    from tasks.core.runtime import activate

    paths = activate()
    from bench.common import announce_machine

    machine = announce_machine()
    root = (args.root or paths.root / "bench_recipes").resolve()
    out = args.out or root / "results.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    unknown = [r for r in args.recipe if r not in RECIPES]
    if unknown:
        sys.exit(f"unknown recipe(s) {unknown}; known: {', '.join(RECIPES)}")
    if args.data_only:
        for name in args.recipe:
            t0 = time.perf_counter()
            print(name, dataset(root, _merge(RECIPES[name], args.scale)[0]), f"{time.perf_counter() - t0:.1f}s")
        return
    for name in args.recipe:
        row = {**run_recipe(name, root, args.scale, args.curve, minutes=args.minutes), "machine": machine}
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: row[k] for k in ("recipe", "train_s", "load1", "img_per_s", "mask_mAP50",
                                              "class_mask_AP50")}), flush=True)
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.is_file() else []
    print(table(rows))


if __name__ == "__main__":
    main()
