"""Benchmark: label-issue mining on planted errors, beside cleanlab's ObjectLab, and its cost vs one evaluation.

Two measurements in one process:

1. **Precision at K on planted errors** (``--planted``, the default when ``--model`` is given without
   ``--data``): a fresh synthetic vehicle-damage set (``damage.tasks.evaluation.planted_errors``: close-ups and
   scenes as in the demo, its own seed) gets 5 % deleted / 5 % class-swapped / 5 % shifted+shrunk
   outlines / 2 % random square boxes, and is scored (a) by the project's miner and (b) by cleanlab's
   ``object_detection`` module (ObjectLab) on boxes derived from the same model's masks and the labels'
   polygons. Both rankings are judged by the same rule (``planted_errors.hits``); a shuffled ranking is
   the control. ObjectLab has three issue types; they map to the project's kinds as: overlooked ->
   ``missing_label``, swap -> ``wrong_class``, bad location -> ``bad_outline`` when a prediction of
   the label's class overlaps its box, else ``spurious_label`` (ObjectLab has no fourth type).
   Times: the project's mining end to end; ObjectLab's scoring alone (its predictions come from the
   same inference pass, timed separately and printed).
2. **Cost**: mining vs ``evaluate_model`` over the same images, alternating, median of ``--repeat``
   (target <= 1.3x).

Usage:
    .venv/bin/python bench/bench_label_issues.py --model best.pt [--images 160] [--seed 2929] [--imgsz 160]
    .venv/bin/python bench/bench_label_issues.py --model best.pt --data data.yaml   # cost only, your data
    .venv/bin/python bench/bench_label_issues.py --demo   # cost only: synthetic data + random yolov8n-seg

Use a model of realistic quality (mask mAP50 0.5-0.75 on the set; the demo's model is one): a random
model's figures say nothing. ObjectLab needs the ``bench`` extra (cleanlab).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_model_data_args, alternate, model_and_data, verdict  # noqa: E402

KIND_OF = {"overlooked": "missing_label", "swap": "wrong_class"}


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), 2)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], 1)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def objectlab_inputs(model: Path, data_yaml: Path, imgsz: int, splits: list[str], conf_floor: float = 0.001,
                     iou: float = 0.7, max_det: int = 300) -> tuple[list[dict], list[list[np.ndarray]], list[str], int]:
    """ObjectLab's labels and predictions (MMDetection layout: one (M, 5) array per class) in image
    pixels: label boxes around the label polygons, predicted boxes of the same model and NMS as mining."""
    from damage.tasks.evaluation.evaluate import load_split
    from damage.tasks.evaluation.label_issues import model_predictor
    from damage.tasks.evaluation.label_rows import Frame, rel_path

    predict, size, stride, names = model_predictor(model, data_yaml, imgsz, conf_floor, iou, max_det)
    labels, preds, images = [], [], []
    for split in splits:
        ds, data = load_split(data_yaml, split, size, stride)
        root = Path(data.get("path") or Path(data_yaml).parent).resolve()
        for idx in range(len(ds)):
            item = ds[idx]
            frame = Frame(item)
            h, w = frame.hw
            segs = ds.labels[idx]["segments"]
            boxes = np.array([[*(s * (w, h)).min(0), *(s * (w, h)).max(0)] for s in segs]).reshape(-1, 4)
            labels.append({"bboxes": boxes.astype(np.float32),
                           "labels": ds.labels[idx]["cls"].reshape(-1).astype(int)})
            p = predict(item)
            pb = frame.to_image(np.asarray(p.boxes, float).reshape(-1, 2, 2)).reshape(-1, 4)
            preds.append([np.c_[pb[p.cls == c], p.conf[p.cls == c]].astype(np.float32).reshape(-1, 5)
                          for c in range(len(names))])
            images.append(rel_path(item["im_file"], root))
    return labels, preds, images, len(names)


def objectlab_rows(labels: list[dict], preds: list[list[np.ndarray]], images: list[str]) -> list[dict[str, Any]]:
    """ObjectLab's three per-box scores as rows of the project's kinds, worst (lowest score) first."""
    from cleanlab.object_detection.rank import (
        compute_badloc_box_scores,
        compute_overlooked_box_scores,
        compute_swap_box_scores,
    )

    over = compute_overlooked_box_scores(labels=labels, predictions=preds)
    swap = compute_swap_box_scores(labels=labels, predictions=preds)
    badloc = compute_badloc_box_scores(labels=labels, predictions=preds)
    rows = []
    for i, image in enumerate(images):
        all_pred = np.concatenate([np.c_[p[:, :5], np.full(len(p), c)] for c, p in enumerate(preds[i])])
        for j, s in enumerate(over[i]):
            if not np.isnan(s):
                rows.append({"image": image, "annotation": -1, "kind": "missing_label", "score": 1 - float(s),
                             "pred_box": all_pred[j, :4].tolist()})
        lb, lc = labels[i]["bboxes"], labels[i]["labels"]
        ious = _box_iou(lb, all_pred[:, :4]) if len(all_pred) else np.zeros((len(lb), 0))
        for a in range(len(lb)):
            s_swap, s_bad = float(swap[i][a]), float(badloc[i][a])
            if s_swap <= s_bad:
                kind, s = "wrong_class", s_swap
            else:
                same = all_pred[:, 5] == lc[a] if len(all_pred) else np.zeros(0, bool)
                kind = "bad_outline" if (ious[a][same] > 0).any() else "spurious_label"
                s = s_bad
            rows.append({"image": image, "annotation": a, "kind": kind, "score": 1 - s})
    rows.sort(key=lambda r: -r["score"])
    return rows


def planted(args: argparse.Namespace, model: Path, paths: Any, machine: dict) -> int:
    from damage.tasks.core.config import LabelIssuesConfig
    from damage.tasks.evaluation.evaluate import evaluate_model
    from damage.tasks.evaluation.label_issues import mine_label_issues
    from damage.tasks.evaluation.planted_errors import (
        format_table,
        make_damage_set,
        plant_errors,
        precision_at_k,
        shuffled_control,
    )

    work = paths.root / "bench" / "label_issues_planted"
    shutil.rmtree(work, ignore_errors=True)
    data = make_damage_set(work / "set", images=args.images, seed=args.seed, imgsz=args.imgsz)
    truth = plant_errors(data, seed=args.seed + 1)
    counts = truth.counts()
    cfg = LabelIssuesConfig()
    splits = ["train", "val"]

    def evaluate() -> int:
        return sum(int(evaluate_model(model, data, s, args.imgsz).metrics["images"]) for s in splits)

    def mine():
        return mine_label_issues(data, cfg, model=model, imgsz=args.imgsz, out_dir=work / "out", trained_splits=())

    evaluate()  # warm-up: imports, file cache, Ultralytics label caches
    e, m, images, res = alternate(evaluate, mine, args.repeat)
    ours = precision_at_k(res.rows, truth)
    print(f"model {model} | planted set: {images} images @ {args.imgsz}px, {truth.annotations} annotations, "
          f"seed {args.seed} | planted {counts}")
    print(f"\nproject (label_issues, {m:.2f} s):")
    print(format_table(ours, counts, shuffled_control(res.rows, truth)))
    result = {"images": images, "planted": counts, "project": ours, "mining_s": m, "evaluation_s": e}
    try:
        import cleanlab  # noqa: F401
    except ImportError:
        print("\nObjectLab: cleanlab is not installed (the `bench` extra): skipped")
    else:
        t0 = time.perf_counter()
        labels, preds, names, _ = objectlab_inputs(model, data, args.imgsz, splits)
        t1 = time.perf_counter()
        ol_rows = objectlab_rows(labels, preds, names)
        t2 = time.perf_counter()
        theirs = precision_at_k(ol_rows, truth)
        print(f"\ncleanlab ObjectLab on boxes ({t2 - t1:.2f} s scoring; + {t1 - t0:.2f} s for the inference pass "
              f"that makes its inputs):")
        print(format_table(theirs, counts, shuffled_control(ol_rows, truth)))
        result.update(objectlab=theirs, objectlab_s=t2 - t1, objectlab_inputs_s=t1 - t0)
    print(f"\none evaluation (same images): {e:7.2f} s\nlabel-issue mining          : {m:7.2f} s")
    from bench.common import write_json

    write_json(args.json, machine, result)
    return verdict("mining / evaluation", m / e, 1.3, args.repeat)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_data_args(ap)
    ap.add_argument("--splits", nargs="+", default=["train", "val"])
    ap.add_argument("--images", type=int, default=160, help="planted set: images")
    ap.add_argument("--seed", type=int, default=2929, help="planted set: generator seed (errors: seed + 1)")
    ap.add_argument("--json", type=Path, default=None, help="write machine + results as JSON here")
    args = ap.parse_args(argv)
    from bench.common import announce_machine

    if args.model and not args.data and not args.demo:
        from damage.tasks.core.runtime import activate, configure_ultralytics

        paths = activate(args.state_dir)
        configure_ultralytics(paths)
        return planted(args, args.model, paths, announce_machine())
    model, data, paths = model_and_data(ap, args)
    machine = announce_machine()
    from bench.common import write_json
    from damage.tasks.core.config import LabelIssuesConfig
    from damage.tasks.evaluation.evaluate import evaluate_model
    from damage.tasks.evaluation.label_issues import mine_label_issues

    cfg = LabelIssuesConfig(splits=args.splits)
    out = paths.root / "bench" / "label_issues"

    def evaluate() -> int:
        return sum(int(evaluate_model(model, data, s, args.imgsz).metrics["images"]) for s in args.splits)

    def mine():
        return mine_label_issues(data, cfg, model=model, imgsz=args.imgsz, out_dir=out)

    evaluate()  # warm-up: imports, file cache, kernels, Ultralytics label caches
    mine()
    e, m, images, res = alternate(evaluate, mine, args.repeat)
    print(f"model {model} | data {data} [{', '.join(args.splits)}] | {images} images @ {args.imgsz}px")
    print(f"one evaluation (same images): {e:7.2f} s")
    print(f"label-issue mining          : {m:7.2f} s  ({len(res.rows)} rows; {res.summary_line()})")
    write_json(args.json, machine, {"images": images, "evaluation_s": e, "mining_s": m, "ratio": m / e,
                                    "repeat": args.repeat, "imgsz": args.imgsz, "splits": args.splits})
    return verdict("mining / evaluation", m / e, 1.3, args.repeat)


if __name__ == "__main__":
    raise SystemExit(main())
