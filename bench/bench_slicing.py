"""Benchmark: sliced inference (``predictor.slices``) against one whole-image pass and against its own passes
run one by one.

Prints the machine line, then per image size one row: tiles per image, ms per image of

* ``whole``: ``Predictor(slices="off").predict(image)``: one letterboxed pass (today's predictor);
* ``sliced``: ``Predictor(slices="auto"|{size, overlap}).predict(image)``: every tile and the downscaled whole
  image batched into as few ``session.run`` calls as the graph allows (``damage.tasks.serving.slicing``), each pass
  post-processed, merged across tiles at full resolution, damage computed once;
* ``one by one``: the same passes, each through ``Predictor.predict_arrays`` on its own (letterbox, one
  ``session.run`` of batch 1, post-processing), summed: what slicing costs without batching or merging.

and the ratios ``sliced / whole`` (what slicing costs) and ``sliced / one by one`` (target <= 1.2x: batching
and the merge must not cost more than a fifth on top of the passes themselves). The three are timed
interleaved in one process on the same images (median of ``--rounds``).

The default model is a yolov8n-seg with random weights (no downloads) exported at ``--imgsz``: its latency
is a trained model's, but it detects nothing, so the merge has nothing to join; ``--model`` times a trained
ONNX instead (the merge then works on real detections).

Usage:
    python bench/bench_slicing.py [--imgsz 160] [--sizes 640 1280] [--images 3] [--rounds 5]
        [--slices auto | --tile 320 --overlap 0.2] [--model model.onnx] [--conf 0.25] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import announce_machine, build_random_model, synth_images, write_json  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--imgsz", type=int, default=160, help="model input size (the demo trains at 160)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[640, 1280], help="square photo sides to time")
    ap.add_argument("--images", type=int, default=3, help="synthetic whole scenes per size")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--slices", default="auto", help="off|auto (ignored with --tile)")
    ap.add_argument("--tile", type=int, default=0, help="fixed tile size in pixels (0 = --slices)")
    ap.add_argument("--overlap", type=float, default=0.2)
    ap.add_argument("--model", type=Path, help="trained ONNX (default: random yolov8n-seg)")
    ap.add_argument("--conf", type=float, default=None, help="confidence (default: the model's)")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "damage-bench-slicing")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import cv2

    from damage.tasks.serving.predictor import Predictor
    from damage.tasks.serving.slicing import parse_slices, tile_windows

    machine = announce_machine({"ort_intra_op": args.threads})
    args.work.mkdir(parents=True, exist_ok=True)
    onnx = args.model or build_random_model("n", args.work, args.imgsz)[1]
    spec = parse_slices({"size": args.tile, "overlap": args.overlap} if args.tile else args.slices)
    whole = Predictor(onnx, conf=args.conf, threads=args.threads, slices="off")
    sliced = Predictor(onnx, conf=args.conf, threads=args.threads, slices=spec)
    imgsz = whole.imgsz
    print(f"model {Path(onnx).name} at {imgsz[0]}x{imgsz[1]}, dynamic batch {whole.dynamic_batch}, "
          f"slices {spec.to_value()}, conf {whole.conf:g}")
    print(f"{'photo':>7} {'tiles':>6} {'whole ms':>9} {'sliced ms':>10} {'one-by-one ms':>14} "
          f"{'sliced/whole':>13} {'sliced/1-by-1':>14} {'instances':>10}")
    rows, worst = [], 0.0
    for size in args.sizes:
        paths = synth_images(args.work, args.images, f"scene{size}_", 34, size)
        ims = [cv2.imread(str(p)) for p in paths]
        tiles = len(tile_windows(size, size, spec.tile_hw(imgsz), spec.overlap)) if spec.active(size, size, imgsz) else 0

        def one_by_one(im):
            h, w = im.shape[:2]
            if not spec.active(h, w, imgsz):
                return whole.predict_arrays([im], batch_size=1)
            for x0, y0, x1, y1 in tile_windows(h, w, spec.tile_hw(imgsz), spec.overlap):
                whole.predict_arrays([im[y0:y1, x0:x1]], batch_size=1)
            return whole.predict_arrays([im], batch_size=1)

        runs = {"whole": lambda im: whole.predict_arrays([im]), "sliced": lambda im: sliced.predict(im),
                "one_by_one": one_by_one}
        for f in runs.values():  # warm-up: sessions, resampling matrices
            f(ims[0])
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.rounds):
            for k, f in runs.items():  # interleaved: the three share the machine's state
                t0 = time.perf_counter()
                for im in ims:
                    f(im)
                times[k].append(1e3 * (time.perf_counter() - t0) / len(ims))
        ms = {k: statistics.median(v) for k, v in times.items()}
        n_inst = statistics.mean(len(sliced.predict(im)[0].instances) for im in ims)
        r_whole, r_sum = ms["sliced"] / ms["whole"], ms["sliced"] / ms["one_by_one"]
        worst = max(worst, r_sum)
        print(f"{size:>7} {tiles:>6} {ms['whole']:>9.1f} {ms['sliced']:>10.1f} {ms['one_by_one']:>14.1f} "
              f"{r_whole:>12.2f}x {r_sum:>13.2f}x {n_inst:>10.1f}", flush=True)
        rows.append({"photo_px": size, "tiles": tiles, "ms": ms, "sliced_vs_whole": r_whole,
                     "sliced_vs_one_by_one": r_sum, "instances": n_inst})
    print(f"sliced cost vs the sum of its passes run one by one: worst {worst:.2f}x "
          f"(target <= 1.2x: {'OK' if worst <= 1.2 else 'MISSED'}); median of {args.rounds} interleaved rounds")
    write_json(args.json, machine, rows)
    return 0 if worst <= 1.2 else 1


if __name__ == "__main__":
    raise SystemExit(main())
