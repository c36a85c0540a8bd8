"""Benchmark: a 20-point threshold sweep vs one evaluation, same model and data, one process.

The sweep runs the network once per image and re-applies NMS / thresholds per grid point, so
its cost should stay within 3x one evaluation (target). Both are timed end to end (model load,
data loading, inference, post-processing, metrics), alternating, and the median is reported.

Usage:
    .venv/bin/python bench/bench_sweep.py --model best.pt --data data.yaml [--imgsz 160] [--repeat 3]
    .venv/bin/python bench/bench_sweep.py --demo     # synthetic data + randomly initialised yolov8n-seg

``--demo`` needs no trained model, but an untrained model's post-processing load (hundreds of
low-score boxes per image) is not what a trained model produces: prefer a real model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _demo_inputs(root: Path, imgsz: int) -> tuple[Path, Path]:
    """Synthetic val data and a randomly initialised yolov8n-seg with the dataset's classes."""
    import torch
    from ultralytics.nn.tasks import SegmentationModel

    from tasks.core.config import CLASSES
    from tasks.data.synth import generate_dataset

    data = generate_dataset(root / "data", images=60, seed=0, imgsz=imgsz, val_fraction=0.4)
    torch.manual_seed(0)
    model = SegmentationModel("yolov8n-seg.yaml", nc=len(CLASSES), verbose=False)
    model.names = dict(enumerate(CLASSES))
    model.args = {"imgsz": imgsz, "task": "segment"}
    pt = root / "random_yolov8n_seg.pt"
    torch.save({"model": model, "train_args": {"imgsz": imgsz, "task": "segment"}, "epoch": -1}, pt)
    return pt, data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help=".pt or .onnx")
    ap.add_argument("--data", type=Path, help="data.yaml")
    ap.add_argument("--split", default="val")
    ap.add_argument("--imgsz", type=int, default=160)
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds (median reported)")
    ap.add_argument("--demo", action="store_true", help="synthetic data + random model")
    ap.add_argument("--state-dir", default="/tmp/damage-bench-state")
    ap.add_argument("--json", type=Path, default=None, help="write machine + timings as JSON here")
    args = ap.parse_args(argv)
    if not args.demo and not (args.model and args.data):
        ap.error("give --model and --data, or --demo")

    from tasks.core.runtime import activate, configure_ultralytics

    paths = activate(args.state_dir)
    configure_ultralytics(paths)
    from bench.common import announce_machine, write_json

    machine = announce_machine()
    from tasks.evaluation.evaluate import collect, evaluate_model
    from tasks.evaluation.sweep import DEFAULT_CONF_GRID, DEFAULT_IOU_GRID, sweep_thresholds

    model, data = (args.model, args.data) if not args.demo else _demo_inputs(paths.root / "bench", args.imgsz)
    n_points = len(DEFAULT_CONF_GRID) * len(DEFAULT_IOU_GRID)
    evaluate_model(model, data, args.split, args.imgsz)  # warm-up: imports, file cache, kernels
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (import time is not sweep time)

    out = paths.root / "bench" / "sweep"
    t_eval, t_sweep = [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        ev = evaluate_model(model, data, args.split, args.imgsz)
        t_eval.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sw = sweep_thresholds(model, data, args.split, args.imgsz, out_dir=out)  # CSV + 2 plots included
        t_sweep.append(time.perf_counter() - t0)
    col = collect(model, data, args.split, args.imgsz)
    dets = sum(len(s.conf) for s in col.map_scores[0.7]) / max(1, len(col.truths))
    e, s = statistics.median(t_eval), statistics.median(t_sweep)
    print(f"model {model} ({ev.model_format}) | data {data} [{args.split}] | {int(ev.metrics['images'])} images "
          f"@ {ev.imgsz}px | {dets:.0f} detections/image at conf 0.001")
    print(f"one evaluation      : {e:7.2f} s  (inference {ev.metrics['speed/inference_ms']:.1f} ms/img, "
          f"post-process {ev.metrics['speed/postprocess_ms']:.1f} ms/img)")
    print(f"{n_points}-point sweep      : {s:7.2f} s  (chosen conf={sw.thresholds['conf']}, "
          f"iou={sw.thresholds['iou']})")
    print(f"naive sweep (est.)  : {n_points * e:7.2f} s  ({n_points} evaluations)")
    ratio = s / e
    print(f"ratio sweep / evaluation = {ratio:.2f}x  (target <= 3x: {'OK' if ratio <= 3 else 'MISSED'}); "
          f"median of {args.repeat}")
    write_json(args.json, machine, {"images": int(ev.metrics["images"]), "evaluation_s": e, "sweep_s": s,
                                    "points": n_points, "ratio": ratio, "repeat": args.repeat,
                                    "thresholds": sw.thresholds})
    return 0 if ratio <= 3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
