"""Benchmark: ONNX Runtime predictor vs Ultralytics PyTorch predict, n and s models at 640, batch 1.

Prints, per model, milliseconds per image (median over interleaved rounds, same images):

* ``ours e2e``: ``Predictor.predict(path)``: read, letterbox, session.run, NMS + masks at the
  original size + polygons + damage percentage;
* ``session.run``: the bare ONNX Runtime call on the same letterboxed input;
* ``post``: the predictor's post-processing alone, and its overhead relative to session.run;
* ``ultralytics``: ``YOLO(model.pt).predict(path, retina_masks=True)`` (masks at the original
  size, the comparable output) and with its default low-res masks.

Models are built from the YOLOv8-seg YAML with random weights (no downloads): latency does not
depend on the weights, but a random model scores every box far below 0.25, so each model is
run at a confidence chosen to leave about ``--instances`` detections per image (the same
threshold for both implementations) to make post-processing do real work.

Usage:
    python bench/bench_predictor.py [--sizes n s] [--imgsz 640] [--rounds 8] [--instances 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _build(size: str, work: Path, imgsz: int) -> tuple[Path, Path]:
    import yaml
    from ultralytics import YOLO
    from ultralytics.nn.tasks import yaml_model_load

    from tasks.config import CLASSES
    from tasks.export import export_onnx

    pt, onnx = work / f"yolov8{size}-seg-rand.pt", work / f"yolov8{size}-seg-rand-{imgsz}.onnx"
    if not pt.exists():
        d = yaml_model_load(f"yolov8{size}-seg.yaml")
        d["nc"] = len(CLASSES)
        d.pop("yaml_file", None)
        y = work / f"yolov8{size}-seg-7.yaml"
        y.write_text(yaml.safe_dump(d))
        m = YOLO(str(y), task="segment")
        m.model.names = dict(enumerate(CLASSES))
        m.save(str(pt))
    if not onnx.exists():
        export_onnx(pt, onnx, imgsz)
    return pt, onnx


def _images(work: Path, n: int) -> list[Path]:
    import cv2
    import numpy as np

    from tasks.synth import render_sample

    out = []
    for i in range(n):
        p = work / f"img{i}.jpg"
        if not p.exists():
            im = render_sample(np.random.default_rng([42, i]), 480).image
            cv2.imwrite(str(p), cv2.resize(im, (640, 480), interpolation=cv2.INTER_LINEAR))  # 4:3 photo
        out.append(p)
    return out


def _median_ms(xs: list[float]) -> float:
    return 1000 * statistics.median(xs)


def bench(size: str, work: Path, imgsz: int, rounds: int, n_inst: int, images: list[Path]) -> dict[str, float]:
    import cv2
    import numpy as np
    from ultralytics import YOLO

    from tasks.predictor import Predictor

    pt, onnx = _build(size, work, imgsz)
    pred = Predictor(onnx, iou=0.7)
    # confidence leaving ~n_inst candidates per image (random weights score far below 0.25)
    tops = []
    for p in images:
        det, _ = pred.infer(pred.preprocess([cv2.imread(str(p))]))
        s = np.sort(det[0, 4:4 + len(pred.names)].max(0))
        tops.append(s[-n_inst])
    conf = float(np.median(tops))
    pred.conf = conf
    ul = YOLO(str(pt), task="segment")
    kw = dict(conf=conf, iou=0.7, imgsz=imgsz, verbose=False, device="cpu")
    for p in images[:2]:  # warm up both
        pred.predict(p)
        ul.predict(str(p), retina_masks=True, **kw)
        ul.predict(str(p), **kw)
    t_ours, t_run, t_post, t_ul, t_ul_lo, n_ours, n_ul = [], [], [], [], [], [], []
    for _ in range(rounds):
        for p in images:
            t0 = time.perf_counter()
            r = pred.predict(p)[0]
            t_ours.append(time.perf_counter() - t0)
            t_post.append(pred.timings["postprocess"])
            n_ours.append(len(r.instances))
            batch = pred.preprocess([cv2.imread(str(p))])
            t0 = time.perf_counter()
            pred.infer(batch)
            t_run.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            u = ul.predict(str(p), retina_masks=True, **kw)[0]
            t_ul.append(time.perf_counter() - t0)
            n_ul.append(0 if u.boxes is None else len(u.boxes))
            t0 = time.perf_counter()
            ul.predict(str(p), **kw)
            t_ul_lo.append(time.perf_counter() - t0)
    res = {
        "ours_e2e_ms": _median_ms(t_ours),
        "session_run_ms": _median_ms(t_run),
        "post_ms": _median_ms(t_post),
        "ul_retina_ms": _median_ms(t_ul),
        "ul_default_ms": _median_ms(t_ul_lo),
        "conf": conf,
        "instances_ours": statistics.mean(n_ours),
        "instances_ul": statistics.mean(n_ul),
    }
    res["post_overhead_pct"] = 100 * res["post_ms"] / res["session_run_ms"]
    res["speedup_vs_ul_retina"] = res["ul_retina_ms"] / res["ours_e2e_ms"]
    res["speedup_vs_ul_default"] = res["ul_default_ms"] / res["ours_e2e_ms"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["n", "s"])
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--instances", type=int, default=20)
    ap.add_argument("--state-dir", default=os.environ.get("DAMAGE_STATE_DIR", "/tmp/damage-bench-state"))
    args = ap.parse_args()

    from tasks.runtime import activate, configure_ultralytics

    paths = activate(args.state_dir)
    configure_ultralytics(paths)  # torch on every core, like ORT's default here
    work = paths.cache / "bench_predictor"
    work.mkdir(parents=True, exist_ok=True)
    images = _images(work, args.images)
    print(f"cpu cores: {os.cpu_count()}, imgsz {args.imgsz}, batch 1, images 640x480, "
          f"{args.rounds} rounds x {len(images)} images, random-init weights")
    for size in args.sizes:
        r = bench(size, work, args.imgsz, args.rounds, args.instances, images)
        print(f"yolov8{size}-seg: conf {r['conf']:.3g} -> {r['instances_ours']:.1f} instances/image "
              f"(ultralytics {r['instances_ul']:.1f})")
        print(f"  ours e2e {r['ours_e2e_ms']:.1f} ms | session.run {r['session_run_ms']:.1f} ms | "
              f"post {r['post_ms']:.2f} ms = {r['post_overhead_pct']:.1f}% of session.run (target <= 15%)")
        print(f"  ultralytics predict {r['ul_retina_ms']:.1f} ms (retina_masks) / {r['ul_default_ms']:.1f} ms (default)"
              f" -> speedup {r['speedup_vs_ul_retina']:.2f}x / {r['speedup_vs_ul_default']:.2f}x (target >= 1.5x)")


if __name__ == "__main__":
    main()
