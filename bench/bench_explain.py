"""Which explanation method points at the damage? Fidelity and cost per instance, method by method.

For each method (``damage.tasks.evaluation.cam_methods``: gradcam, hirescam, eigencam; each at the neck
layer of the instance's own stride) the same detections of one model are explained on two image
sets: the demo's explain samples (``pick_explain_samples`` of the val split, seed 0) and a fresh
synthetic set (a seed the model never saw). Per set and method it prints, over the *damage*
instances: the median heat inside the box and inside the mask (energy-based pointing game), the
share of instances with at least 5x the heat their box's area gets by chance, the share where
greying the map's hottest pixels drops the instance's score more than greying as many random ones
(deletion check), and milliseconds per instance (map + fidelity), all measured in one run. The
machine line comes first.

Usage (a trained model; ``--train-epochs`` trains one first with the demo recipe, e.g. on a GPU):

    python bench/bench_explain.py --model best.pt --data ds/data.yaml --imgsz 160
    python bench/bench_explain.py --train-epochs 60 --imgsz 160 --json explain.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import announce_machine, write_json  # noqa: E402

TARGET_MEDIAN, TARGET_LIFT5 = 0.5, 0.8  # issue 32: median heat in the damage box, share with 5x the box's share


def train_demo_model(work: Path, imgsz: int, epochs: int, device: str) -> tuple[Path, Path]:
    """The demo's data and recipe (configs/demo.yaml), ``epochs`` fixed instead of the time budget."""
    from damage.tasks.core.config_load import load_config
    from damage.tasks.data.synth import generate_dataset
    from damage.tasks.training.train import train_model

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"))
    s = cfg.data.synth
    data = generate_dataset(work / "demo-data", images=s.images, seed=cfg.seed, imgsz=imgsz,
                            val_fraction=s.val_fraction, closeup_fraction=s.closeup_fraction)
    tcfg = cfg.train.model_copy(update={"epochs": epochs, "time_min": None, "imgsz": imgsz, "device": device})
    res = train_model(data, tcfg, work / "runs", seed=cfg.seed, name="demo")
    return res.last, data


def measure(net, images: list[Path], method: str, imgsz: int, conf: float) -> tuple[list[dict], float]:
    """Fidelity rows of every detected instance, and ms per instance."""
    from damage.tasks.evaluation.explain import explain_image

    rows, t0 = [], time.perf_counter()
    for img in images:
        for e in explain_image(net, img, method, conf=conf, iou=0.7, imgsz=imgsz):
            rows.append({**e.fidelity, "class": e.name, "damage": e.name != "vehicle"})
    ms = 1e3 * (time.perf_counter() - t0) / max(1, len(rows))
    return rows, ms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="trained .pt (else --train-epochs)")
    ap.add_argument("--data", type=Path, help="its data.yaml (explain samples from the val split)")
    ap.add_argument("--train-epochs", type=int, default=0, help="train a demo-recipe model first")
    ap.add_argument("--device", default=os.environ.get("DAMAGE_BENCH_DEVICE", "cpu"))
    ap.add_argument("--imgsz", type=int, default=160)
    ap.add_argument("--samples", type=int, default=8, help="explain samples of the val split")
    ap.add_argument("--fresh", type=int, default=24, help="images of the fresh synthetic set")
    ap.add_argument("--conf", type=float, default=0.25)
    ap.add_argument("--methods", nargs="+", default=["gradcam", "hirescam", "eigencam"])
    ap.add_argument("--work", type=Path, default=Path(".state/bench-explain"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    machine = announce_machine()
    args.work.mkdir(parents=True, exist_ok=True)
    model, data = args.model, args.data
    if args.train_epochs:
        t = time.perf_counter()
        model, data = train_demo_model(args.work, args.imgsz, args.train_epochs, args.device)
        print(f"trained {args.train_epochs} epochs in {time.perf_counter() - t:.0f} s: {model}", flush=True)
    if model is None or data is None:
        ap.error("give --model and --data, or --train-epochs")
    from damage.tasks.data.synth import generate_dataset
    from damage.tasks.evaluation.explain import load_model, pick_explain_samples
    from damage.tasks.evaluation.fidelity import summarise

    fresh_yaml = generate_dataset(args.work / "fresh", images=args.fresh, seed=12345, imgsz=args.imgsz,
                                  val_fraction=0.5, closeup_fraction=0.65)
    from damage.tasks.data.dataset import split_images

    sets = {"demo explain samples": pick_explain_samples(data, args.samples, seed=0),
            "fresh synthetic set": split_images(fresh_yaml, "train") + split_images(fresh_yaml, "val")}
    net = load_model(model)
    results = []
    for set_name, images in sets.items():
        print(f"\n{set_name} ({len(images)} images):")
        print("| method | instances | median heat in box | median heat in mask | >= 5x box share | "
              "deletion > random | median deletion drop | ms/instance |")
        print("|---|---|---|---|---|---|---|---|")
        for method in args.methods:
            rows, ms = measure(net, images, method, args.imgsz, args.conf)
            dmg = summarise([r for r in rows if r["damage"]])
            results.append({"set": set_name, "method": method, "ms_per_instance": ms, **dmg,
                            "all": summarise(rows), "rows": rows})
            for label, f in (("damage", dmg), ("all classes", summarise(rows))):
                if not f:
                    print(f"| {method} | 0 {label} | | | | | | {ms:.0f} |")
                    continue
                ok = f["heat_in_box_median"] >= TARGET_MEDIAN and f["lift5_share"] >= TARGET_LIFT5
                print(f"| {method} | {int(f['instances'])} {label} | {f['heat_in_box_median']:.2f} | "
                      f"{f['heat_in_mask_median']:.2f} | {100 * f['lift5_share']:.0f} % | "
                      f"{100 * f.get('deletion_beats_random_share', float('nan')):.0f} % | "
                      f"{f.get('deletion_drop_median', float('nan')):.3f} | {ms:.0f} |"
                      + (" target met" if ok and label == "damage" else ""))
    best = max((r for r in results if r.get("instances")), default=None,
               key=lambda r: (r["lift5_share"], r["heat_in_box_median"]))
    if best:
        print(f"\nbest by share with 5x, then median heat in box: {best['method']} ({best['set']})")
    print("median ms per instance over sets: " + ", ".join(
        f"{m} {statistics.median([r['ms_per_instance'] for r in results if r['method'] == m]):.0f}"
        for m in args.methods))
    write_json(args.json, machine, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
