"""Benchmark: ``damage tune`` with its trials side by side against the same trials one after another.

Prints the machine line, then for each mode the wall time of the whole search and the machine's CPU
utilisation over it (busy share of all cores, from ``psutil.cpu_times``):

* ``sequential``: ``tune.max_concurrent=1``, each trial with every core (``tune.cpus_per_trial`` = the cores);
* ``concurrent``: ``tune.max_concurrent=0``, ``tune.cpus_per_trial=1``: as many trials at once as cores.

Both modes run the same trials: the demo recipe (``configs/demo.yaml``) on its synthetic data, ``--epochs``
epochs, the same ``tune.search_seed`` (so the same sampled settings), and no early stopping (the ASHA grace
period is the whole run), so the two searches do the same work. Each search is a ``damage tune`` subprocess
with its own state dir (SQLite MLflow, embedded Ray with ``ray.num_cpus`` = the cores). The modes alternate
over ``--rounds`` rounds; the ratio is the median of the per-round ratios.

Goal (issue 27): report the ratio and utilisation for 4 trials at 2 epochs with 1 CPU each on this machine;
when a GPU machine is lent, 8 trials at 0.25 GPU each must be >= 3x faster than sequential
(``--gpus-per-trial 0.25 --trials 8``).

    flock /tmp/cpu.lock .venv/bin/python bench/bench_tune.py --trials 4 --epochs 2 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _busy(before, after) -> float:
    """Busy share of all cores between two ``psutil.cpu_times()`` samples."""
    total = sum(after) - sum(before)
    idle = (after.idle - before.idle) + (getattr(after, "iowait", 0.0) - getattr(before, "iowait", 0.0))
    return 1.0 - idle / total if total > 0 else float("nan")


def run_search(mode: str, data_yaml: Path, work: Path, args: argparse.Namespace, cores: int) -> dict:
    import psutil

    sets = {"train.epochs": args.epochs, "train.time_min": "null", "tune.trials": args.trials,
            "tune.search_seed": 0, "tune.grace_period": args.epochs + 1, "ray.num_cpus": cores,
            "tune.gpus_per_trial": args.gpus_per_trial,
            "tune.max_concurrent": 1 if mode == "sequential" else 0,
            "tune.cpus_per_trial": cores if mode == "sequential" else 1}
    if args.gpus_per_trial:
        sets["ray.num_gpus"] = 1
    # short: Ray's socket paths under <state>/ray must stay within AF_UNIX's 107 bytes
    state = Path(tempfile.mkdtemp(prefix=mode[:3], dir=work))
    cmd = [sys.executable, "-m", "damage.flows.cli", "--config", str(REPO / "configs" / "demo.yaml"),
           "--state-dir", str(state)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    cmd += ["tune", str(data_yaml), "--out", str(state / "tune")]
    c0, t0 = psutil.cpu_times(), time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall, busy = time.perf_counter() - t0, _busy(c0, psutil.cpu_times())
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-3000:] + r.stderr[-3000:])
        raise SystemExit(f"{mode} search failed (exit {r.returncode})")
    trials = _trials(state)
    return {"wall_s": wall, "cpu_busy": busy, "trials": trials}


def _trials(state: Path) -> list[dict]:
    """The search's trial runs from its MLflow store: state, the sampled params, the objective."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{next(state.rglob('mlflow.db'))}")
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()],
                         filter_string="tags.`damage.tune.state` != ''")
    return sorted(({"state": r.data.tags["damage.tune.state"],
                    "params": {k: v for k, v in r.data.params.items() if k.startswith(("train.", "sweep."))},
                    "objective": r.data.metrics.get("objective")} for r in runs),
                  key=lambda t: json.dumps(t["params"], sort_keys=True))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--gpus-per-trial", type=float, default=0.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from bench.common import announce_machine, write_json

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    machine = announce_machine({"sequential_trial": cores, "concurrent_trial": 1})
    from damage.tasks.core.config import Config
    from damage.tasks.core.config_load import load_config
    from damage.tasks.data.synth import generate_dataset

    demo: Config = load_config(REPO / "configs" / "demo.yaml")
    work = Path(tempfile.mkdtemp(prefix="bt"))
    s = demo.data.synth
    data_yaml = generate_dataset(work / "data", images=s.images, seed=demo.seed, imgsz=demo.train.imgsz,
                                 closeup_fraction=s.closeup_fraction)
    rounds = []
    for r in range(args.rounds):
        seq = run_search("sequential", data_yaml, work, args, cores)
        con = run_search("concurrent", data_yaml, work, args, cores)
        if [t["params"] for t in seq["trials"]] != [t["params"] for t in con["trials"]]:
            raise SystemExit("the two searches sampled different trials: the comparison would be unfair")
        ratio = seq["wall_s"] / con["wall_s"]
        rounds.append({"sequential": seq, "concurrent": con, "ratio": ratio})
        print(f"round {r + 1}: sequential {seq['wall_s']:.0f} s (CPU busy {seq['cpu_busy']:.0%}), "
              f"concurrent {con['wall_s']:.0f} s (CPU busy {con['cpu_busy']:.0%}), "
              f"sequential/concurrent {ratio:.2f}x; trial states {[t['state'] for t in con['trials']]}", flush=True)
    med = statistics.median(x["ratio"] for x in rounds)
    print(f"\n{args.trials} trials x {args.epochs} epochs of the demo recipe on {cores} cores: concurrent "
          f"(1 CPU per trial) is {med:.2f}x the speed of sequential ({cores} CPUs per trial)")
    write_json(args.json, machine, {"args": {k: str(v) for k, v in vars(args).items()}, "rounds": rounds,
                                    "ratio": med})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
