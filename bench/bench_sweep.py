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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_model_data_args, alternate, model_and_data, verdict  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_data_args(ap)
    ap.add_argument("--split", default="val")
    ap.add_argument("--json", type=Path, default=None, help="write machine + timings as JSON here")
    args = ap.parse_args(argv)
    model, data, paths = model_and_data(ap, args)
    from bench.common import announce_machine, write_json

    machine = announce_machine()
    from damage.tasks.evaluation.evaluate import collect, evaluate_model
    from damage.tasks.evaluation.sweep import DEFAULT_CONF_GRID, DEFAULT_IOU_GRID, sweep_thresholds

    n_points = len(DEFAULT_CONF_GRID) * len(DEFAULT_IOU_GRID)
    evaluate_model(model, data, args.split, args.imgsz)  # warm-up: imports, file cache, kernels
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (import time is not sweep time)

    out = paths.root / "bench" / "sweep"
    e, s, ev, sw = alternate(lambda: evaluate_model(model, data, args.split, args.imgsz),
                             lambda: sweep_thresholds(model, data, args.split, args.imgsz, out_dir=out),  # CSV + plots
                             args.repeat)
    col = collect(model, data, args.split, args.imgsz)
    dets = sum(len(s.conf) for s in col.map_scores[0.7]) / max(1, len(col.truths))
    print(f"model {model} ({ev.model_format}) | data {data} [{args.split}] | {int(ev.metrics['images'])} images "
          f"@ {ev.imgsz}px | {dets:.0f} detections/image at conf 0.001")
    print(f"one evaluation      : {e:7.2f} s  (inference {ev.metrics['speed/inference_ms']:.1f} ms/img, "
          f"post-process {ev.metrics['speed/postprocess_ms']:.1f} ms/img)")
    print(f"{n_points}-point sweep      : {s:7.2f} s  (chosen conf={sw.thresholds['conf']}, "
          f"iou={sw.thresholds['iou']})")
    print(f"naive sweep (est.)  : {n_points * e:7.2f} s  ({n_points} evaluations)")
    ratio = s / e
    write_json(args.json, machine, {"images": int(ev.metrics["images"]), "evaluation_s": e, "sweep_s": s,
                                    "points": n_points, "ratio": ratio, "repeat": args.repeat,
                                    "thresholds": sw.thresholds})
    return verdict("sweep / evaluation", ratio, 3, args.repeat)


if __name__ == "__main__":
    raise SystemExit(main())
