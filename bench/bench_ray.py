"""Benchmark: batch inference over N images, the single-process predictor against Ray Data workers.

Prints the machine line, then images per second of:

* ``single``: one process, the predictor with ``--single-threads`` threads (``damage predict`` without --ray);
* ``ray``: ``damage.tasks.scale.batch.predict_on_ray`` with ``--workers`` workers of ``--worker-threads``
  thread(s) each (``damage predict --ray``), on an embedded Ray started once before the rounds.

Both read the same PNG files and return the same per-image documents (no overlays, nothing written: the
benchmark measures reading, decoding and inference). The two alternate in ``--rounds`` rounds, so a slower
minute of a shared machine falls on both, and the ratio is the median of the per-round ratios.

Goal (issue 27): on a 2-core machine, ``ray`` with 2 workers x 1 thread >= 0.9x ``single`` with 2 threads
(Ray's overhead <= 10 %); with 16 cores, 16 workers >= 6x one worker (``--workers 1`` run as the baseline).

    flock /tmp/cpu.lock .venv/bin/python bench/bench_ray.py --images 500 --image-px 640 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--image-px", type=int, default=640)
    ap.add_argument("--imgsz", type=int, default=640, help="the model's input size")
    ap.add_argument("--model-size", default="n")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--worker-threads", type=int, default=1)
    ap.add_argument("--single-threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("DAMAGE_TORCH_THREADS", "1")
    from bench.common import announce_machine, build_random_model, synth_images, write_json

    machine = announce_machine({"single": args.single_threads, "ray_worker": args.worker_threads})
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    _, onnx = build_random_model(args.model_size, work, args.imgsz)
    images = [str(p) for p in synth_images(work, args.images, "img", 7, args.image_px)]

    import ray

    from damage.tasks.core.config import RayConfig
    from damage.tasks.scale.batch import PredictorSettings, build_predictor, predict_on_ray
    from damage.tasks.serving.one_image import predict_source

    ray.init(num_cpus=max(args.workers * args.worker_threads, 1), include_dashboard=False, log_to_driver=False,
             configure_logging=False, _temp_dir=str(work / "ray"))
    settings = PredictorSettings()
    cfg = RayConfig(workers=args.workers, worker_threads=args.worker_threads, batch_size=args.batch_size)
    pred = build_predictor(onnx, settings, args.single_threads)

    def single() -> int:
        return sum(1 for s in images if predict_source(pred, s, "m", overlay=False)[0])

    def on_ray() -> int:
        return sum(1 for _ in predict_on_ray(onnx, images, settings, cfg, model_label="m", overlay=False))

    single_ips, ray_ips, ratios = [], [], []
    for r in range(args.rounds):
        t0 = time.perf_counter()
        assert single() == len(images)
        t1 = time.perf_counter()
        assert on_ray() == len(images)
        t2 = time.perf_counter()
        s, y = len(images) / (t1 - t0), len(images) / (t2 - t1)
        single_ips.append(s)
        ray_ips.append(y)
        ratios.append(y / s)
        print(f"round {r + 1}: single {s:.1f} img/s, ray {y:.1f} img/s, ratio {y / s:.2f}", flush=True)
    ray.shutdown()
    med = statistics.median(ratios)
    print(f"\n{len(images)} images at {args.image_px} px, model {args.model_size} at {args.imgsz}: "
          f"single ({args.single_threads} threads) {statistics.median(single_ips):.1f} img/s, "
          f"ray ({args.workers} x {args.worker_threads} thread) {statistics.median(ray_ips):.1f} img/s, "
          f"ratio {med:.2f} (goal >= 0.90 on 2 cores)")
    write_json(args.json, machine, {"args": {k: str(v) for k, v in vars(args).items()}, "single_ips": single_ips,
                                    "ray_ips": ray_ips, "ratios": ratios, "ratio": med})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
