"""Benchmark: the model families side by side (YOLOv8, YOLO11, YOLO26 segmentation), batch 1.

Prints the CPU (model name, ISA flags that matter for INT8: avx2, avx512*, vnni, amx) and the
thread counts, then one row per family: parameters, GFLOPs at ``--imgsz``, and milliseconds per
image (median over interleaved rounds) for

* ``pytorch``: the fused ``SegmentationModel`` forward (``torch.inference_mode``);
* ``ort fp32``: ``session.run`` of the exported ONNX (the pipeline's ``export_onnx``);
* ``best int8``: the faster of ``int8-static`` (QDQ, head decode kept float, calibrated on
  rendered synthetic images) and ``int8-dynamic`` (``damage.tasks.export.quantize``), and which one.

YOLO26 also gets a row for its end-to-end export (NMS-free one-to-one head, ``--no-end2end`` skips
it). Models are built from the Ultralytics YAMLs with random weights and our 7 classes (no
downloads); latency does not depend on the weights. Every model runs in the same process, in
interleaved rounds, so a noisy neighbour slows all of them alike; on a shared machine compare the
ratios, not the absolute figures.

Usage:
    python bench/bench_families.py [--families yolov8 yolo11 yolo26] [--size n] [--imgsz 640] [--rounds 10]
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

from bench.common import announce_machine, build_random_model, synth_images, write_json  # noqa: E402


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # threads stop spinning when a run returns, or they take the cores from the next model in the round
    so.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def prepare(family: str, size: str, work: Path, imgsz: int, calib: list[Path], threads: int,
            end2end: bool = False) -> dict:
    """Model files, params, GFLOPs and the runnable callables of one row."""
    import numpy as np
    import torch

    from damage.tasks.export.quantize import quantize_onnx
    from damage.tasks.training.prune import count_params, gflops, load_model

    pt, onnx = build_random_model(size, work, imgsz, family=family, end2end=end2end)
    net = load_model(pt)
    params, flops = count_params(net), gflops(net, imgsz)
    if end2end:
        net.end2end = True
    net = net.fuse().eval()
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    xt = torch.from_numpy(x)
    runs = {"pytorch": lambda: net(xt), "ort fp32": None}
    sess = {"ort fp32": _session(onnx, threads)}
    for mode in ("int8-static", "int8-dynamic"):
        q = onnx.with_name(f"{onnx.stem}-{mode}.onnx")
        if not q.exists():
            kw = {"calib_images": calib, "imgsz": imgsz} if mode == "int8-static" else {}
            quantize_onnx(onnx, q, mode, **kw)
        sess[mode] = _session(q, threads)
    for k, s in sess.items():
        name = s.get_inputs()[0].name
        runs[k] = (lambda s=s, name=name: s.run(None, {name: x}))
    label = f"{family}{size}-seg" + (" (end2end)" if end2end else "")
    return {"label": label, "params": params, "gflops": flops, "runs": runs}


def measure(rows: list[dict], rounds: int, warmup: int = 2) -> None:
    """Median ms of every callable of every row, rounds interleaved across rows."""
    import torch

    times: dict[tuple[int, str], list[float]] = {}
    with torch.inference_mode():
        for r in range(warmup + rounds):
            for i, row in enumerate(rows):
                for k, fn in row["runs"].items():
                    t0 = time.perf_counter()
                    fn()
                    if r >= warmup:
                        times.setdefault((i, k), []).append(time.perf_counter() - t0)
    for i, row in enumerate(rows):
        row["ms"] = {k: 1000 * statistics.median(times[(i, k)]) for k in row["runs"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=["yolov8", "yolo11", "yolo26"])
    ap.add_argument("--size", default="n", choices=["n", "s", "m", "l", "x"])
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calib", type=int, default=8, help="calibration images for int8-static")
    ap.add_argument("--no-end2end", action="store_true", help="skip YOLO26's end-to-end export row")
    ap.add_argument("--state-dir", default=os.environ.get("DAMAGE_STATE_DIR", "/tmp/damage-bench-state"))
    ap.add_argument("--json", type=Path, default=None, help="write machine + rows as JSON here")
    args = ap.parse_args()

    from damage.tasks.core.families import FAMILIES

    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown:
        ap.error(f"unknown family {', '.join(unknown)} (choose from {', '.join(FAMILIES)})")

    import onnxruntime as ort
    import torch

    from damage.tasks.core.runtime import activate, configure_ultralytics

    paths = activate(args.state_dir)
    configure_ultralytics(paths)  # torch on every core, like ORT below
    threads = os.cpu_count() or 1
    work = paths.cache / "bench_families"
    work.mkdir(parents=True, exist_ok=True)
    calib = synth_images(work, args.calib, "calib", 7, 320)
    machine = announce_machine({"ort_intra_op": threads})
    print(f"torch {torch.__version__} | onnxruntime {ort.__version__} | imgsz {args.imgsz}, batch 1, "
          f"{args.rounds} interleaved rounds, random-init weights, 7 classes")
    rows = []
    for fam in args.families:
        rows.append(prepare(fam, args.size, work, args.imgsz, calib, threads))
        if FAMILIES[fam].nms_free_head and not args.no_end2end:
            rows.append(prepare(fam, args.size, work, args.imgsz, calib, threads, end2end=True))
    measure(rows, args.rounds)
    head = f"{'model':<26}{'params':>9}{'GFLOPs':>8}{'pytorch':>10}{'ort fp32':>10}{'best int8':>11}  int8 mode"
    print(head)
    print("-" * len(head))
    for row in rows:
        ms = row["ms"]
        best = min(("int8-static", "int8-dynamic"), key=lambda k: ms[k])
        print(f"{row['label']:<26}{row['params'] / 1e6:>8.2f}M{row['gflops']:>8.1f}{ms['pytorch']:>8.1f}ms"
              f"{ms['ort fp32']:>8.1f}ms{ms[best]:>9.1f}ms  {best} (other {ms[[k for k in ('int8-static', 'int8-dynamic') if k != best][0]]:.1f} ms)")
    print("ms = median per image; on a shared machine the absolute figures move, compare within one run")
    write_json(args.json, machine, [{k: v for k, v in row.items() if k != "runs"} for row in rows])


if __name__ == "__main__":
    main()
