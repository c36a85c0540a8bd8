"""Benchmark: compression speed-ups at 640 px, batch 1, every CPU core, ratios measured in one run.

Per model size (default n and s), built from the YOLOv8-seg YAML with 7 classes and random
weights (latency does not depend on weight values; nothing is downloaded):

* ``torch fp32``: PyTorch eager, Conv+BN fused (what Ultralytics predicts with), ``no_grad``;
* ``ort fp32``: the exported ONNX (``damage.tasks.export.onnx.export_onnx``, opset 13, dynamic, simplified);
* ``ort int8``: static INT8 QDQ (``damage.tasks.export.quantize.quantize_onnx``: every SiLU, Add, Concat, Split,
  MaxPool and Resize in int8, the prototype's ConvTranspose as an int8 1x1 Conv + DepthToSpace, head
  decode in float with the DFL Softmax on the innermost axis) calibrated on synthetic images, one row per
  ``--int8-settings`` entry (``method/granularity``, default ``minmax/per-channel``);
* ``ort pruned``: structured pruning at ``--ratio`` (``damage.tasks.training.prune.prune_structured``), exported
  (``--ratio 0`` skips it);
* ``--compare LABEL=PATH``: any further ONNX file in the same rounds (``{size}`` and ``{imgsz}`` in PATH
  are filled in), e.g. an INT8 file made by an older checkout of ``quantize.py``.

INT8 files are cached in the work folder by name: after changing ``quantize.py``, delete them (or pass
another ``--work``) and keep the old ones for ``--compare``.

Rounds are interleaved (every variant once per round) and the median is reported, so a load
change on a shared machine hits all variants alike. Printed ratios: torch fp32 / ort int8
(goal >= 2.5x for n, >= 3x for s) and ort fp32 / ort pruned (goal >= 1.3x).

With ``--demo-weights best.pt --data data.yaml`` it also reports mask mAP50 of the trained
model in FP32 ONNX vs INT8 (goal: drop <= 0.02), same evaluator (``damage.tasks.evaluation.evaluate``).

Usage:
    python bench/bench_compress.py [--sizes n s] [--imgsz 640 160] [--rounds 10] [--ratio 0.3]
        [--int8-settings minmax/per-channel entropy/per-tensor] [--compare "old int8=/tmp/{size}-{imgsz}.onnx"]
        [--demo-weights .state/.../best.pt --data .state/.../data.yaml] [--json out.json]
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

from bench.common import announce_machine, build_random_model, static_int8, synth_images, write_json  # noqa: E402


def _torch_runner(pt: Path, imgsz: int):
    import torch

    from damage.tasks.training.prune import load_model

    m = load_model(pt).fuse(verbose=False).eval()
    x = torch.rand(1, 3, imgsz, imgsz)

    def run():
        with torch.no_grad():
            m(x)

    return run


THREADS = os.cpu_count() or 1  # --threads overrides: torch and ORT always get the same count


def _ort_runner(onnx: Path, imgsz: int):
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    # as the predictor runs: threads stop spinning when a run returns. Left spinning, a session's threads
    # take the cores from the next variant in the interleaved round (measured: the same pruned n ONNX
    # at 52 ms right after the INT8 session, 34-42 ms in another order)
    so.add_session_config_entry("session.force_spinning_stop", "1")
    s = ort.InferenceSession(str(onnx), so, providers=["CPUExecutionProvider"])
    feed = {s.get_inputs()[0].name: np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)}
    return lambda: s.run(None, feed)


def _interleaved(runners: dict, rounds: int, warmup: int = 2) -> dict[str, float]:
    for r in runners.values():
        for _ in range(warmup):
            r()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for k, r in runners.items():
            t = time.perf_counter()
            r()
            times[k].append(time.perf_counter() - t)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def _setting(label: str) -> tuple[str, bool]:
    """``entropy/per-tensor`` -> (``entropy``, False)."""
    from damage.tasks.export.calibration import CALIBRATION_METHODS

    method, _, gran = label.partition("/")
    if method not in CALIBRATION_METHODS or gran not in ("per-channel", "per-tensor"):
        raise SystemExit(f"--int8-settings: '{label}' is not METHOD/per-channel|per-tensor "
                         f"(METHOD: {', '.join(CALIBRATION_METHODS)})")
    return method, gran == "per-channel"


def bench_size(size: str, work: Path, imgsz: int, rounds: int, ratio: float, calib: list[Path],
               settings: list[str], compare: dict[str, str]) -> dict[str, float]:
    """Median ms per variant of one model size at one image size, and the ratios against torch / ORT FP32."""
    import torch

    from damage.tasks.export.onnx import export_onnx
    from damage.tasks.training.prune import prune_structured

    torch.set_num_threads(THREADS)
    pt, onnx = build_random_model(size, work, imgsz)
    runners = {"torch fp32": _torch_runner(pt, imgsz), "ort fp32": _ort_runner(onnx, imgsz)}
    for label in settings:
        method, per_channel = _setting(label)
        runners[f"ort int8 {label}"] = _ort_runner(static_int8(onnx, work, imgsz, calib, method, per_channel), imgsz)
    for label, template in compare.items():
        runners[label] = _ort_runner(Path(template.format(size=size, imgsz=imgsz)), imgsz)
    if ratio > 0:
        pruned_pt = work / f"yolov8{size}-seg-rand-pruned{int(ratio * 100)}.pt"
        pruned_onnx = pruned_pt.with_suffix(f".{imgsz}.onnx")
        if not pruned_onnx.exists():
            _, rep = prune_structured(pt, pruned_pt, ratio, imgsz=imgsz)
            print(f"[{size}] pruned {ratio:.0%}: params {rep.params_before:,} -> {rep.params_after:,}, "
                  f"GFLOPs {rep.gflops_before:.1f} -> {rep.gflops_after:.1f}", flush=True)
            export_onnx(pruned_pt, pruned_onnx, imgsz)
        runners["ort pruned"] = _ort_runner(pruned_onnx, imgsz)
    ms = _interleaved(runners, rounds)
    for k in list(ms):
        if k not in ("torch fp32", "ort fp32"):
            ms[f"{k} speed-up vs torch"] = ms["torch fp32"] / ms[k]
            ms[f"{k} speed-up vs ort fp32"] = ms["ort fp32"] / ms[k]
    ms["ort fp32 speed-up vs torch"] = ms["torch fp32"] / ms["ort fp32"]
    return ms


def _print_rows(title: str, r: dict[str, float], size: str) -> None:
    """One line per variant: ms, x vs torch eager FP32, x vs ORT FP32 (goal for INT8: 2.5x n, 3x s vs torch)."""
    print(f"{title}  (INT8 goal vs torch: {'2.5' if size == 'n' else '3'}x; pruned vs ORT FP32: 1.3x)")
    for k, v in r.items():
        if "speed-up" in k:
            continue
        ratios = [f"{r[f'{k} speed-up vs {ref}']:5.2f}x vs {name}" for ref, name in (("torch", "torch"),
                  ("ort fp32", "ORT FP32")) if f"{k} speed-up vs {ref}" in r]
        print(f"  {k:<34}{v:8.1f} ms  " + "  ".join(ratios), flush=True)


def demo_accuracy(weights: Path, data: Path, work: Path, calib_n: int = 32) -> dict[str, float]:
    from damage.tasks.evaluation.evaluate import evaluate_model, open_model
    from damage.tasks.export.calibration import calibration_images
    from damage.tasks.export.onnx import export_onnx
    from damage.tasks.export.quantize import quantize_accuracy_aware

    imgsz = int(open_model(weights, data).imgsz)
    onnx = export_onnx(weights, work / "demo.onnx", imgsz)
    fm = evaluate_model(onnx, data, imgsz=imgsz).metrics
    res = quantize_accuracy_aware(onnx, work / "demo.int8.onnx", data, calibration_images(data, calib_n),
                                  tolerance=0.02, imgsz=imgsz, float_metrics=fm,
                                  evaluate_fn=lambda m: evaluate_model(m, data, imgsz=imgsz).metrics)
    return {"imgsz": imgsz, "fp32 mask mAP50": fm["mask/mAP50"], "int8 mask mAP50": res.metrics["mask/mAP50"],
            "delta": res.metrics["mask/mAP50"] - fm["mask/mAP50"], "float nodes added": len(res.attempts[-1].float_nodes)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["n", "s"])
    ap.add_argument("--imgsz", type=int, nargs="+", default=[640])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--ratio", type=float, default=0.3, help="structured pruning ratio (0: no pruned row)")
    ap.add_argument("--int8-settings", nargs="+", default=["minmax/per-channel"],
                    help="INT8 static rows: METHOD/per-channel|per-tensor, METHOD in minmax, entropy, percentile")
    ap.add_argument("--compare", nargs="*", default=[], metavar="LABEL=PATH",
                    help="further ONNX files in the same rounds; {size} and {imgsz} in PATH are filled in")
    ap.add_argument("--calib", type=int, default=8, help="calibration images (synthetic) for the latency models")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=None, help="threads for torch and ORT (default: every core)")
    ap.add_argument("--demo-weights", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write machine + figures as JSON here")
    args = ap.parse_args()

    global THREADS
    THREADS = args.threads or THREADS
    from damage.tasks.core.runtime import activate, configure_ultralytics

    paths = activate(os.environ.get("DAMAGE_STATE_DIR") or ROOT / ".state")
    configure_ultralytics(paths)
    work = args.work or paths.cache / "bench_compress"
    work.mkdir(parents=True, exist_ok=True)
    compare = dict(c.split("=", 1) for c in args.compare)
    import torch

    torch.set_num_threads(THREADS)  # configure_ultralytics set every core
    machine, results = announce_machine({"ort_intra_op": THREADS}), {}
    print(f"threads {THREADS}, imgsz {args.imgsz}, batch 1, rounds {args.rounds} (median, interleaved)")
    for imgsz in args.imgsz:
        calib = synth_images(work, args.calib, "calib", 7, imgsz, None, ".jpg")
        for size in args.sizes:
            r = results[f"{size}@{imgsz}"] = bench_size(size, work, imgsz, args.rounds, args.ratio, calib,
                                                        args.int8_settings, compare)
            _print_rows(f"yolov8{size}-seg @ {imgsz} px", r, size)
    if args.demo_weights and args.data:
        a = results["demo"] = demo_accuracy(args.demo_weights, args.data, work)
        print("demo model: " + "  ".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}"
                                        for k, v in a.items()))
    write_json(args.json, machine, results)


if __name__ == "__main__":
    main()
