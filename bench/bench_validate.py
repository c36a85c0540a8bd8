"""Benchmark: the data gate vs. merely decoding the same images with ``cv2.imread``.

Generates N 640x480 JPEGs (+ one polygon label each) under ``<state>/tmp/bench_validate``,
then on a warm page cache times

* baseline: ``cv2.imread`` of every image in one process;
* ``validate_dataset`` called in this process (first call: includes importing Great
  Expectations, which overlaps the scan) and again (warm);
* optionally ``--cold``: ``damage``-like cold start in a fresh interpreter (imports included).

and prints the ratios and images/second. ``--memory N`` validates N images in a fresh
interpreter and prints its peak RSS (parent and worker processes).

Usage:
    .venv/bin/python bench/bench_validate.py --images 2000 --cold
    .venv/bin/python bench/bench_validate.py --images 0 --memory 20000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TRI = "0.2 0.2 0.8 0.2 0.5 0.8"


def make_dataset(root: Path, n: int, seed: int = 0) -> Path:
    """N 640x480 photo-like JPEGs (smooth colour fields + texture), 80/20 train/val."""
    import cv2
    import numpy as np
    import yaml

    marker = root / ".bench.json"
    if marker.is_file() and json.loads(marker.read_text()).get("n") == n:
        return root
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        split = "val" if i % 5 == 0 else "train"
        low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = cv2.resize(low, (640, 480), interpolation=cv2.INTER_CUBIC)
        img = cv2.add(img, rng.integers(0, 24, (480, 640, 3), dtype=np.uint8))
        cv2.imwrite(str(root / "images" / split / f"{i:06d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        (root / "labels" / split / f"{i:06d}.txt").write_text(f"{i % 3} {TRI}\n")
    (root / "data.yaml").write_text(yaml.safe_dump({"train": "images/train", "val": "images/val",
                                                    "names": ["vehicle", "dent", "scratch"]}))
    marker.write_text(json.dumps({"n": n}))
    return root


def images_of(root: Path) -> list[str]:
    return sorted(str(p) for p in (root / "images").rglob("*.jpg"))


def time_imread(paths: list[str]) -> float:
    import cv2

    t = time.perf_counter()
    for p in paths:
        if cv2.imread(p) is None:
            raise RuntimeError(f"baseline could not read {p}")
    return time.perf_counter() - t


_CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from pathlib import Path
from damage.tasks.core.runtime import activate
activate(sys.argv[2])
from damage.tasks.core.config import ValidateConfig
from damage.tasks.validation.validate import validate_dataset
res = validate_dataset(Path(sys.argv[1]), ValidateConfig(workers=int(sys.argv[3])))
wall = time.perf_counter() - t0
print(json.dumps({"wall": wall, "timings": res.timings, "images": res.report["summary"]["images"],
                  "maxrss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "maxrss_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def run_child(root: Path, state: Path, workers: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(root), str(state), str(workers)], cwd=REPO,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000, help="images for the speed comparison (0 = skip)")
    ap.add_argument("--memory", type=int, default=0, help="images for the peak-memory run (0 = skip)")
    ap.add_argument("--workers", type=int, default=0, help="validate.workers (0 = all CPUs)")
    ap.add_argument("--cold", action="store_true", help="also time a cold start in a fresh interpreter")
    ap.add_argument("--state-dir", default=str(REPO / ".state" / "bench"), help="state dir")
    ap.add_argument("--json", type=Path, default=None, help="write machine + figures as JSON here")
    args = ap.parse_args()

    from damage.tasks.core.runtime import activate

    paths = activate(args.state_dir)
    from bench.common import announce_machine, write_json
    from damage.tasks.core.config import ValidateConfig
    from damage.tasks.validation.scanner import worker_count

    machine, results = announce_machine({"gate_workers": worker_count(args.workers)}), {}
    print(f"cpus used by the gate: {worker_count(args.workers)}")
    if args.images:
        root = make_dataset(paths.tmp / f"bench_validate_{args.images}", args.images)
        files = images_of(root)
        time_imread(files[:50])  # warm the page cache and cv2's lazy init
        for f in files:
            Path(f).read_bytes()
        base = results["imread_s"] = time_imread(files)
        print(f"baseline cv2.imread, 1 process: {base:.2f} s  ({len(files) / base:.0f} images/s)")
        from damage.tasks.validation.validate import validate_dataset

        cfg = ValidateConfig(workers=args.workers)
        for label in ("validate_dataset (first call, GE import included)", "validate_dataset (warm)"):
            t = time.perf_counter()
            res = validate_dataset(root, cfg)
            dt = time.perf_counter() - t
            results[label] = {"s": dt, "ratio": dt / base, "phases": res.timings, "passed": res.passed}
            print(f"{label}: {dt:.2f} s  ({len(files) / dt:.0f} images/s)  ratio {dt / base:.2f}  "
                  f"phases {res.timings}  passed={res.passed}")
        if args.cold:
            child = results["cold"] = run_child(root, Path(args.state_dir), args.workers)
            print(f"cold start in a fresh interpreter (imports included): {child['wall']:.2f} s  "
                  f"ratio {child['wall'] / base:.2f}  phases {child['timings']}")
    if args.memory:
        root = make_dataset(paths.tmp / f"bench_validate_{args.memory}", args.memory)
        child = results["memory"] = run_child(root, Path(args.state_dir), args.workers)
        print(f"peak memory at {child['images']} images: parent {child['maxrss_self_mb']:.0f} MB, "
              f"largest worker {child['maxrss_children_mb']:.0f} MB (ru_maxrss); wall {child['wall']:.1f} s")
    write_json(args.json, machine, results)


if __name__ == "__main__":
    main()
