"""Where a training epoch of the demo recipe spends its time: data loading + augmentation against forward +
backward + optimiser step, images per second, and the share of the CPU's FP32 peak it reaches (issue 34,
item 4: measure before tuning).

Prints the machine line, then one row per epoch: seconds, images/s, the share of the epoch spent waiting
for the next batch (the dataloader: decode or RAM cache, augmentation, collation; ``train.workers`` 0 =
in the training process) and in the step (forward, loss, backward, optimiser), and the achieved GFLOP/s
against the peak. The split comes from Ultralytics' ``on_train_batch_start``/``on_train_batch_end``
callbacks: the time from one batch's end to the next one's start is the loader's (the batch is fetched
before ``on_train_batch_start`` runs); from start to end the step's.

Training FLOPs are taken as 3x the forward FLOPs (backward ~2x forward), forward FLOPs from
Ultralytics' ``get_flops`` at the training size; the peak as physical cores x base or max clock x FP32
FLOPs per cycle (AVX-512: 64 = 2 FMA units x 16 lanes x 2; AVX2+FMA: 32), an upper bound (one FMA unit
on some AVX-512 parts halves it; clocks drop under AVX-512 load).

Usage (configs/demo.yaml's data and training recipe, 1 epoch by default):
    DAMAGE_TORCH_THREADS=2 python bench/profile_epoch.py [--epochs 1] [--images 400] [--workers 0]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import announce_machine  # noqa: E402


def fp32_peak_gflops(cores: int) -> tuple[float, str]:
    """Upper bound of FP32 GFLOP/s of ``cores`` cores from /proc/cpuinfo (flags and clock)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return float("nan"), "unknown CPU"
    flags = set(re.search(r"^flags\s*:\s*(.*)$", info, re.M).group(1).split()) if "flags" in info else set()
    per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 16
    mhz = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M)]
    ghz = max(mhz) / 1000 if mhz else float("nan")
    return cores * ghz * per_cycle, f"{cores} cores x {ghz:.2f} GHz x {per_cycle} FLOP/cycle"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--images", type=int, default=400, help="synthetic images (the demo: 400, 320 train)")
    ap.add_argument("--workers", type=int, default=None, help="dataloader workers (default: the demo's)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "damage-profile-epoch")
    ap.add_argument("--bf16", action="store_true",
                    help="CPU bfloat16 autocast around the training forward + loss (AVX512_BF16 / AMX)")
    ap.add_argument("--channels-last", action="store_true", help="model and input batch in channels-last")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: the demo's)")
    args = ap.parse_args()

    import torch

    threads = int(os.environ.get("DAMAGE_TORCH_THREADS", "0") or 0) or torch.get_num_threads()
    torch.set_num_threads(threads)
    machine = announce_machine({"torch": threads})
    from ultralytics import YOLO
    from ultralytics.utils.torch_utils import get_flops

    from damage.tasks.core.config_load import load_config
    from damage.tasks.core.families import model_source
    from damage.tasks.core.runtime import activate, configure_ultralytics
    from damage.tasks.data.synth import generate_dataset
    from damage.tasks.training.train import build_train_args, use_channels_last

    cfg = load_config(ROOT / "configs" / "demo.yaml")
    s = cfg.data.synth
    paths = activate(args.work / "state")
    configure_ultralytics(paths)
    data = args.work / f"synth-{args.images}-{s.imgsz}-{s.closeup_fraction}"
    data_yaml = data / "data.yaml" if (data / "data.yaml").is_file() else generate_dataset(
        data, images=args.images, seed=s.seed, imgsz=s.imgsz, val_fraction=s.val_fraction,
        closeup_fraction=s.closeup_fraction, zoom=s.zoom, balance=s.balance)
    tcfg = cfg.train.model_copy(update={"epochs": args.epochs, "time_min": None, "val": False,
                                        **({"workers": args.workers} if args.workers is not None else {}),
                                        **({"batch": args.batch, "nbs": args.batch} if args.batch else {})})
    kw = build_train_args(tcfg, data_yaml, args.work / "runs", "profile", cfg.seed)
    kw.update({"plots": False, "exist_ok": True})
    model = YOLO(model_source(tcfg.model), task="segment")
    marks: dict[str, list[float]] = {"start": [], "end": []}
    epochs: list[dict[str, float]] = []

    def batch_start(trainer):
        marks["start"].append(time.perf_counter())

    def batch_end(trainer):
        marks["end"].append(time.perf_counter())

    def epoch_start(trainer):
        marks["start"].clear()
        marks["end"].clear()
        marks["t0"] = [time.perf_counter()]

    def epoch_end(trainer):
        st, en, t0 = marks["start"], marks["end"], marks["t0"][0]
        load = (st[0] - t0) + sum(st[i] - en[i - 1] for i in range(1, len(st)))
        step = sum(e - b for b, e in zip(st, en, strict=False))
        total = en[-1] - t0
        n_img = len(trainer.train_loader.dataset)
        gflop_fwd = get_flops(trainer.model, trainer.args.imgsz)  # GFLOPs of one forward at the training size
        epochs.append({"seconds": total, "load": load, "step": step, "images": n_img, "batches": len(st),
                       "gflop_per_image_train": 3 * gflop_fwd})

    def train_start(trainer):
        """--channels-last: the project's own ``train.use_channels_last``; --bf16: autocast around the forward."""
        m = trainer.model
        if args.channels_last:
            use_channels_last(m)
        if args.bf16:
            forward = m.forward

            def bf16_forward(x, *a, **kw):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return forward(x, *a, **kw)

            m.forward = bf16_forward

    model.add_callback("on_train_start", train_start)
    for name, fn in (("on_train_batch_start", batch_start), ("on_train_batch_end", batch_end),
                     ("on_train_epoch_start", epoch_start), ("on_train_epoch_end", epoch_end)):
        model.add_callback(name, fn)
    model.train(**kw)

    peak, how = fp32_peak_gflops(os.cpu_count() if threads <= 0 else threads)
    print(f"recipe: configs/demo.yaml train (batch {tcfg.batch}, nbs {tcfg.nbs}, {tcfg.optimizer}, "
          f"augment {tcfg.augment}, cache {tcfg.cache}, workers {tcfg.workers}), {tcfg.imgsz} px, "
          f"torch threads {threads}, bf16 autocast {args.bf16}, channels-last {args.channels_last}; peak {peak:.0f} GFLOP/s ({how})")
    print(f"{'epoch':>5} {'s':>7} {'img/s':>7} {'loader %':>9} {'step %':>7} {'ms/batch load':>14} "
          f"{'ms/batch step':>14} {'GFLOP/s':>8} {'% of peak':>10}")
    for k, e in enumerate(epochs):
        ips = e["images"] / e["seconds"]
        gflops = ips * e["gflop_per_image_train"]
        print(f"{k:>5} {e['seconds']:>7.1f} {ips:>7.1f} {100 * e['load'] / e['seconds']:>8.1f}% "
              f"{100 * e['step'] / e['seconds']:>6.1f}% {1e3 * e['load'] / e['batches']:>14.1f} "
              f"{1e3 * e['step'] / e['batches']:>14.1f} {gflops:>8.1f} {100 * gflops / peak:>9.2f}%")
    print(f"train GFLOP per image (3x forward): {epochs[0]['gflop_per_image_train']:.3f}" if epochs else "no epoch")
    del machine
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
