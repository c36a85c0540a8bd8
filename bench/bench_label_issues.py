"""Benchmark: label-issue mining vs one evaluation, same model, same images, one process.

Mining runs the network once per image and matches its predictions with the annotations, so it
should cost at most 1.3x one evaluation of the same images (target). Evaluation here is
``evaluate_model`` over each mined split (train and val by default: the same images), both
timed end to end (model load, data loading, inference, post-processing, scoring; mining also
writes its CSV and overlay grid), alternating, median reported.

Usage:
    .venv/bin/python bench/bench_label_issues.py --model best.pt --data data.yaml [--imgsz 160] [--repeat 3]
    .venv/bin/python bench/bench_label_issues.py --demo   # synthetic data + randomly initialised yolov8n-seg

``--demo`` needs no trained model; a random model's detections are not a trained model's, so
its figure says little about post-processing load: prefer a real model. ``--conf-floor`` sets
mining's confidence floor (default: label_issues.conf_floor = 0.05; evaluation always uses 0.001).
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
    ap.add_argument("--splits", nargs="+", default=["train", "val"])
    ap.add_argument("--conf-floor", type=float, default=None, help="mining confidence floor")
    ap.add_argument("--json", type=Path, default=None, help="write machine + timings as JSON here")
    args = ap.parse_args(argv)
    model, data, paths = model_and_data(ap, args)
    from bench.common import announce_machine, write_json

    machine = announce_machine()
    from damage.tasks.core.config import LabelIssuesConfig
    from damage.tasks.evaluation.evaluate import evaluate_model
    from damage.tasks.evaluation.label_issues import mine_label_issues

    cfg = LabelIssuesConfig(splits=args.splits)
    if args.conf_floor is not None:
        cfg = cfg.model_copy(update={"conf_floor": args.conf_floor})
    out = paths.root / "bench" / "label_issues"

    def evaluate() -> int:
        return sum(int(evaluate_model(model, data, s, args.imgsz).metrics["images"]) for s in args.splits)

    def mine():
        return mine_label_issues(data, cfg, model=model, imgsz=args.imgsz, out_dir=out)

    evaluate()  # warm-up: imports, file cache, kernels, Ultralytics label caches
    mine()
    e, m, images, res = alternate(evaluate, mine, args.repeat)
    print(f"model {model} | data {data} [{', '.join(args.splits)}] | {images} images @ {args.imgsz}px | "
          f"mining conf floor {cfg.conf_floor}")
    print(f"one evaluation (same images): {e:7.2f} s")
    print(f"label-issue mining          : {m:7.2f} s  ({len(res.rows)} rows; {res.summary_line()})")
    ratio = m / e
    write_json(args.json, machine, {"images": images, "evaluation_s": e, "mining_s": m, "ratio": ratio,
                                    "repeat": args.repeat, "imgsz": args.imgsz, "splits": args.splits})
    return verdict("mining / evaluation", ratio, 1.3, args.repeat)


if __name__ == "__main__":
    raise SystemExit(main())
