"""Per-view mask/box AP50 of a trained model on a synthetic val split: close-up views vs whole scenes.

The synthetic generator decides each image's view from ``(seed, index)`` only, so the split can be
cut after the fact. Each part is validated with Ultralytics' validator (conf 0.001, the standard
floor), which tells whether a class's AP is held back by the small damage of whole scenes or by
the close-ups themselves (bench/learning_experiments.md, session 4).

Usage:
    python bench/bench_views.py STATE/datasets/synth-g7-.../ path/to/best.pt [--imgsz 160]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", type=Path, help="a synthetic dataset folder (holds .synth.json)")
    ap.add_argument("weights", type=Path, help="trained .pt")
    ap.add_argument("--imgsz", type=int, default=160)
    args = ap.parse_args()

    from damage.tasks.core.runtime import activate, configure_ultralytics

    configure_ultralytics(activate())
    from ultralytics import YOLO

    from damage.tasks.data.synth import SYNTH_MARKER

    ds = args.dataset.resolve()
    marker = json.loads((ds / SYNTH_MARKER).read_text())
    views = np.random.default_rng([marker["seed"], 104729]).random(marker["images"]) < marker["closeup_fraction"]
    names = yaml.safe_load((ds / "data.yaml").read_text())["names"]
    model = YOLO(str(args.weights))
    with tempfile.TemporaryDirectory() as tmp:
        for closeup in (True, False):
            imgs = [str(p) for p in sorted((ds / "images" / "val").glob("*.png"))
                    if views[int(p.stem.split("_")[1])] == closeup]
            if not imgs:
                continue
            lst = Path(tmp) / f"{closeup}.txt"
            lst.write_text("\n".join(imgs) + "\n")
            y = Path(tmp) / f"{closeup}.yaml"
            y.write_text(yaml.safe_dump({"path": str(ds), "train": str(lst), "val": str(lst), "names": names}))
            r = model.val(data=str(y), imgsz=args.imgsz, batch=16, conf=0.001, plots=False, verbose=False,
                          project=tmp, name=str(closeup), exist_ok=True)
            idx = [int(c) for c in r.ap_class_index]
            view = "close-up" if closeup else "scene"
            print(f"{view:8s} {len(imgs):3d} images  mask AP50 "
                  + " ".join(f"{names[c]} {r.seg.ap50[i]:.3f}" for i, c in enumerate(idx)))
            print(f"{'':8s} {'':10s}  box AP50  "
                  + " ".join(f"{names[c]} {r.box.ap50[i]:.3f}" for i, c in enumerate(idx)))


if __name__ == "__main__":
    main()
