"""Benchmark: the predictor on ONNX Runtime and OpenVINO vs Ultralytics PyTorch predict, n and s at 640, batch 1.

Prints the machine (CPU model, AVX2/AVX-512/VNNI/AMX, runtime versions, threads), then per model
a table of milliseconds per image (median over interleaved rounds, same images), one row per
predictor runtime:

* ``e2e``: ``Predictor.predict(path)``: read, letterbox, session.run, NMS + masks at the
  original size + polygons + damage percentage;
* ``session.run``: the bare runtime call on the same letterboxed input;
* ``post``: the predictor's post-processing alone, and its overhead relative to session.run; the
  instance outlines (``Instance.polygon``) are traced on first read, outside ``predict``: the
  ``busy + polygons`` column adds that trace for a caller that writes the JSON or an overlay;
* ``--int8``: the same rows for the static INT8 file of the same model (the variant the nightly
  registers when it stays within tolerance), per runtime;
* ``x UL``: ``YOLO(model.pt).predict(path, retina_masks=True)`` (masks at the original size, the
  comparable output) divided by ``e2e``; also against its default low-res masks;
* ONNX Runtime session settings, each changed alone from the tuned ones (threads, spinning,
  graph optimisation level, the cached optimised graph), bare session.run.

Caveat of the interleaving: the runtimes' thread pools share two cores and may disturb each
other. The first 2-core run (2026-11-30) showed OpenVINO's e2e right after ORT's turn at 86 ms
against its own session.run of 45 ms a moment later, not yet explained (one suspect: ORT's worker
threads still spinning, ``session.intra_op.allow_spinning``; the predictor's sessions now stop
spinning when a run returns, ``session.force_spinning_stop``, but the variant sessions below
may not); the settings rows may share the effect. Compare runtimes by their session.run rows,
and read the settings rows as indicative.

Models are built from the YOLOv8-seg YAML with random weights (no downloads). Inference latency
does not depend on the weights, but a random model detects nothing (its head outputs are
constant), so both implementations run with zero detections; the post-processing cost with a
busy image is measured separately by feeding ``Predictor.postprocess`` synthetic raw outputs
(``--objects`` objects x 8 overlapping candidates, smoothed random prototypes) of the real
output shapes, and reported against the same ``session.run`` time.

Usage:
    python bench/bench_predictor.py [--sizes n s] [--imgsz 640] [--rounds 8] [--objects 20]
        [--backends onnxruntime openvino] [--ov-bf16] [--no-variants] [--int8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import build_random_model, static_int8, synth_images  # noqa: E402


def _median_ms(xs: list[float]) -> float:
    return 1000 * statistics.median(xs)


def synthetic_outputs(det_shape, proto_shape, n_objects: int, copies: int, nc: int, seed: int = 0):
    """Raw outputs with ``n_objects`` objects, each predicted by ``copies`` overlapping anchors.

    Random-init weights give no detections at all, so the post-processing cost is measured on
    these: NMS over ``n_objects * copies`` candidates, then ``n_objects`` masks decoded at the
    original size with polygons and the damage percentage, about what a busy photo produces.
    Prototypes are smoothed noise so masks have realistic, blob-like contours.
    """
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    det = np.zeros(det_shape[1:], np.float32)
    _, nm, mh, mw = proto_shape
    ih, iw = mh * 4, mw * 4
    anchors = rng.choice(det.shape[1], n_objects * copies, replace=False)
    for k in range(n_objects):
        cx, cy = rng.uniform(0.2 * iw, 0.8 * iw), rng.uniform(0.2 * ih, 0.8 * ih)
        w, h = rng.uniform(40, 0.6 * iw), rng.uniform(40, 0.6 * ih)
        cls = 0 if k % 4 == 0 else int(rng.integers(1, nc))  # some vehicles, mostly damage
        for j in range(copies):
            a = anchors[k * copies + j]
            det[:4, a] = [cx + rng.normal(0, 3), cy + rng.normal(0, 3), w * rng.uniform(0.95, 1.05),
                          h * rng.uniform(0.95, 1.05)]
            det[4 + cls, a] = rng.uniform(0.3, 0.95)
            det[4 + nc:, a] = rng.normal(0, 1, nm)
    proto = rng.normal(0, 1, (nm, mh, mw)).astype(np.float32)
    proto = np.stack([cv2.GaussianBlur(p, (0, 0), 3) * 3 for p in proto])
    return det, proto


def _timed(out: list[float], fn, *args):
    """``fn(*args)``, its wall time appended to ``out``."""
    t0 = time.perf_counter()
    r = fn(*args)
    out.append(time.perf_counter() - t0)
    return r


def _ort_variants(onnx: Path) -> dict[str, object]:
    """ONNX Runtime sessions that differ from the tuned one in one setting each (bare session.run timed)."""
    import onnxruntime as ort

    from damage.tasks.serving.backends import OnnxRuntime

    def untuned():  # the predictor's settings before tuning: every logical core, ORT's defaults otherwise
        so = ort.SessionOptions()
        so.intra_op_num_threads = os.cpu_count() or 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(str(onnx), so, providers=["CPUExecutionProvider"])
        return lambda x: sess.run(None, {sess.get_inputs()[0].name: x})

    def basic_opt():
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        from damage.tasks.serving.backends import physical_cores
        so.intra_op_num_threads = physical_cores()
        sess = ort.InferenceSession(str(onnx), so, providers=["CPUExecutionProvider"])
        return lambda x: sess.run(None, {sess.get_inputs()[0].name: x})

    return {"untuned (all logical cores, defaults)": untuned(),
            "no spinning": OnnxRuntime(onnx, spinning=False).run,
            "spinning not stopped after each run": OnnxRuntime(onnx, spin_stop=False).run,
            "graph opt basic only": basic_opt(),
            "tuned, no cached graph": OnnxRuntime(onnx, cache=False).run}


def bench(size: str, work: Path, imgsz: int, rounds: int, images: list[Path], n_objects: int,
          backends: list[str], ov_bf16: bool, variants: bool, int8: bool = False) -> dict[str, dict[str, float]]:
    """Interleaved rounds: every predictor and Ultralytics on the same images, one after the other."""
    import cv2
    from ultralytics import YOLO

    from damage.tasks.serving.predictor import Predictor

    pt, onnx = build_random_model(size, work, imgsz)
    preds = {b: Predictor(onnx, backend=b) for b in backends}  # conf/iou from metadata defaults (0.25 / 0.7)
    if ov_bf16 and "openvino" in backends:
        preds["openvino-bf16"] = Predictor(onnx, backend="openvino", openvino_precision="bf16")
    if int8:  # the registered variant is usually the INT8 one: the predictor serving it, same weights
        q = static_int8(onnx, work, imgsz, synth_images(work, 8, "calib", 7, imgsz, None, ".jpg"))
        preds.update({f"{b}-int8": Predictor(q, backend=b) for b in backends})
    extra = _ort_variants(onnx) if variants else {}
    first = next(iter(preds.values()))
    ul = YOLO(str(pt), task="segment")
    kw = dict(conf=first.conf, iou=first.iou, imgsz=imgsz, verbose=False, device="cpu")
    for p in images[:2]:  # warm up all
        for pred in preds.values():
            pred.predict(p)
        ul.predict(str(p), retina_masks=True, **kw)
        ul.predict(str(p), **kw)
    t: dict[str, dict[str, list[float]]] = {b: {"e2e": [], "run": [], "post": [], "busy": [], "poly": []} for b in preds}
    t_var: dict[str, list[float]] = {k: [] for k in extra}
    t_ul, t_ul_lo, n_syn = [], [], []
    for _ in range(rounds):
        for i, p in enumerate(images):
            im = cv2.imread(str(p))
            for b, pred in preds.items():
                _timed(t[b]["e2e"], pred.predict, p)
                t[b]["post"].append(pred.timings["postprocess"])
                batch = pred.preprocess([im])
                det, proto = _timed(t[b]["run"], pred.infer, batch)
                sdet, sproto = synthetic_outputs(det.shape, proto.shape, n_objects, 8, len(pred.names), seed=i)
                r = _timed(t[b]["busy"], pred.postprocess, sdet, sproto, im.shape[:2], batch.shape[2:])
                n_syn.append(len(r.instances))
                # the outlines (JSON output, overlays) are traced on first read, outside predict()
                _timed(t[b]["poly"], lambda r=r: [i.polygon for i in r.instances])
            for k, run in extra.items():
                _timed(t_var[k], run, batch)
            _timed(t_ul, partial(ul.predict, str(p), retina_masks=True, **kw))
            _timed(t_ul_lo, partial(ul.predict, str(p), **kw))
    ul_ms, ul_lo_ms = _median_ms(t_ul), _median_ms(t_ul_lo)
    res: dict[str, dict[str, float]] = {}
    for b, tt in t.items():
        r = {k: _median_ms(v) for k, v in tt.items()}
        r["post_pct"] = 100 * r["post"] / r["run"]
        r["busy_pct"] = 100 * r["busy"] / r["run"]
        r["busy_poly_pct"] = 100 * (r["busy"] + r["poly"]) / r["run"]
        r["e2e_busy"] = r["e2e"] - r["post"] + r["busy"]
        r["x_ul"] = ul_ms / r["e2e"]
        r["x_ul_busy"] = ul_ms / r["e2e_busy"]
        r["x_ul_default"] = ul_lo_ms / r["e2e"]
        res[b] = r
    res["_ul"] = {"retina": ul_ms, "default": ul_lo_ms, "busy_instances": statistics.mean(n_syn)}
    res["_variants"] = {k: _median_ms(v) for k, v in t_var.items()}
    return res


def print_table(size: str, res: dict[str, dict[str, float]], n_objects: int) -> None:
    ul = res["_ul"]
    print(f"yolov8{size}-seg: ultralytics predict {ul['retina']:.1f} ms (retina_masks) / {ul['default']:.1f} ms "
          f"(default masks); busy post = {ul['busy_instances']:.0f} instances from {n_objects * 8} NMS candidates")
    print("  | backend | e2e ms | session.run ms | post ms (busy) | post / session (busy) | busy + polygons "
          "| x UL retina (busy) | x UL default |")
    print("  |---|---|---|---|---|---|---|---|")
    for b, r in res.items():
        if b.startswith("_"):
            continue
        print(f"  | {b} | {r['e2e']:.1f} | {r['run']:.1f} | {r['post']:.2f} ({r['busy']:.2f}) | "
              f"{r['post_pct']:.1f}% ({r['busy_pct']:.1f}%) | {r['poly']:.2f} ms, {r['busy_poly_pct']:.1f}% | "
              f"{r['x_ul']:.2f}x ({r['x_ul_busy']:.2f}x) | "
              f"{r['x_ul_default']:.2f}x |")
    runs = [b for b in res if not b.startswith("_")]
    if len(runs) > 1:
        base = res[runs[0]]["run"]
        print("  session.run vs " + runs[0] + ": " + ", ".join(f"{b} {base / res[b]['run']:.2f}x" for b in runs[1:]))
    if res["_variants"]:
        tuned = res.get("onnxruntime", {}).get("run")
        print("  ONNX Runtime settings, bare session.run (tuned: " + (f"{tuned:.1f} ms" if tuned else "n/a") + "):")
        for k, v in res["_variants"].items():
            print(f"    {k}: {v:.1f} ms" + (f" (tuned is {v / tuned:.2f}x faster)" if tuned else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["n", "s"])
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--objects", type=int, default=20, help="objects in the synthetic post-processing load")
    ap.add_argument("--backends", nargs="+", default=["onnxruntime", "openvino"],
                    help="predictor runtimes to compare (openvino is skipped when not installed)")
    ap.add_argument("--ov-bf16", action="store_true", help="also OpenVINO at bf16 precision")
    ap.add_argument("--no-variants", action="store_true", help="skip the ONNX Runtime session-option variants")
    ap.add_argument("--int8", action="store_true", help="also the predictor on the static INT8 file of the same model")
    ap.add_argument("--state-dir", default=os.environ.get("DAMAGE_STATE_DIR", "/tmp/damage-bench-state"))
    ap.add_argument("--json", type=Path, default=None, help="write machine + figures as JSON here")
    args = ap.parse_args()

    from damage.tasks.core.runtime import activate, configure_ultralytics
    from damage.tasks.serving.backends import openvino_available

    paths = activate(args.state_dir)
    configure_ultralytics(paths)  # torch on every core, like the runtimes here
    work = paths.cache / "bench_predictor"
    work.mkdir(parents=True, exist_ok=True)
    images = synth_images(work, args.images, "img", 42, 480, (640, 480), ".jpg")  # 4:3 photos
    from bench.common import announce_machine, write_json

    backends = [b for b in args.backends if b != "openvino" or openvino_available()]
    machine, results = announce_machine(), {}
    print(f"imgsz {args.imgsz}, batch 1, images 640x480, {args.rounds} rounds x {len(images)} images, "
          f"random-init weights, medians; targets: e2e >= 1.5x UL retina, post <= 15% of session.run (n)")
    for size in args.sizes:
        res = results[size] = bench(size, work, args.imgsz, args.rounds, images, args.objects, backends,
                                    args.ov_bf16, not args.no_variants, args.int8)
        print_table(size, res, args.objects)
    write_json(args.json, machine, results)


if __name__ == "__main__":
    main()
