"""Shared benchmark helpers (bench scripts run as plain scripts from the repo root)."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Ultralytics writes its settings file when it is first imported, before a bench can call
# configure_ultralytics: point it at the state dir (StatePaths.yolo_config), never the home dir.
os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(os.environ.get("DAMAGE_STATE_DIR") or ".state").resolve() / "ultralytics"))


def build_random_model(size: str, work: Path, imgsz: int, family: str = "yolov8",
                       end2end: bool = False) -> tuple[Path, Path]:
    """``{family}{size}-seg`` with random weights and our 7 classes, saved as .pt and exported to ONNX.

    ``end2end`` exports YOLO26's NMS-free head (``damage.tasks.export.onnx.export_onnx``).
    """
    import yaml
    from ultralytics import YOLO
    from ultralytics.nn.tasks import yaml_model_load

    from damage.tasks.core.config import CLASSES
    from damage.tasks.core.families import model_source
    from damage.tasks.export.onnx import export_onnx

    stem = f"{family}{size}-seg"
    e2e = "-e2e" if end2end else ""
    pt, onnx = work / f"{stem}-rand.pt", work / f"{stem}-rand-{imgsz}{e2e}.onnx"
    if not pt.exists():
        d = yaml_model_load(model_source(stem))
        d["nc"] = len(CLASSES)
        d.pop("yaml_file", None)
        y = work / f"{stem}-7.yaml"
        y.write_text(yaml.safe_dump(d))
        m = YOLO(str(y), task="segment")
        m.model.names = dict(enumerate(CLASSES))
        m.save(str(pt))
    if not onnx.exists():
        export_onnx(pt, onnx, imgsz, end2end=end2end)
    return pt, onnx


def synth_images(work: Path, n: int, prefix: str, seed: int, render_px: int,
                 size: tuple[int, int] | None = None, suffix: str = ".png") -> list[Path]:
    """``n`` synthetic scene images (cached in ``work``), rendered at ``render_px`` and resized to ``size``
    (width, height) when given: calibration sets and benchmark inputs."""
    import cv2
    import numpy as np

    from damage.tasks.data.synth import render_sample

    out = []
    for i in range(n):
        p = work / f"{prefix}{i}{suffix}"
        if not p.exists():
            im = render_sample(np.random.default_rng([seed, i]), render_px).image
            cv2.imwrite(str(p), im if size is None else cv2.resize(im, size, interpolation=cv2.INTER_LINEAR))
        out.append(p)
    return out


def static_int8(onnx: Path, work: Path, imgsz: int, calib: list[Path], method: str = "minmax",
                per_channel: bool = True) -> Path:
    """The pipeline's static INT8 QDQ file of ``onnx`` (``damage.tasks.export.quantize.quantize_onnx``), cached in
    ``work`` by model and setting; after changing ``quantize.py``, delete the cached files."""
    from damage.tasks.export.quantize import quantize_onnx

    int8 = work / f"{onnx.stem}.int8-{method}-{'pc' if per_channel else 'pt'}.onnx"
    if not int8.exists():
        quantize_onnx(onnx, int8, "int8-static", calib_images=calib, imgsz=imgsz, calibrate_method=method,
                      per_channel=per_channel)
    return int8


def announce_machine(threads: dict[str, int] | None = None) -> dict:
    """Print what this benchmark runs on (CPU, ISA, runtimes, threads) and return it for the JSON output.

    Call after the thread counts are set (torch's count is read when torch is imported).
    """
    from damage.tasks.core.machine import machine_info, machine_line

    info = machine_info(threads)
    print(machine_line(info), flush=True)
    return info


def write_json(path: Path | None, machine: dict, results: object) -> None:
    """``{"machine": ..., "results": ...}`` to ``path`` (atomic; nothing when ``path`` is None)."""
    if path is None:
        return
    from damage.tasks.core.atomic import atomic_write_json

    atomic_write_json(Path(path), {"machine": machine, "results": results})
    print(f"results: {path}")


def demo_inputs(root: Path, imgsz: int) -> tuple[Path, Path]:
    """Synthetic data and a randomly initialised yolov8n-seg with the dataset's classes: (model .pt, data.yaml)."""
    import torch
    from ultralytics.nn.tasks import SegmentationModel

    from damage.tasks.core.config import CLASSES
    from damage.tasks.data.synth import generate_dataset

    data = generate_dataset(root / "data", images=60, seed=0, imgsz=imgsz, val_fraction=0.4)
    torch.manual_seed(0)
    model = SegmentationModel("yolov8n-seg.yaml", nc=len(CLASSES), verbose=False)
    model.names = dict(enumerate(CLASSES))
    model.args = {"imgsz": imgsz, "task": "segment"}
    pt = root / "random_yolov8n_seg.pt"
    torch.save({"model": model, "train_args": {"imgsz": imgsz, "task": "segment"}, "epoch": -1}, pt)
    return pt, data


def add_model_data_args(ap: argparse.ArgumentParser) -> None:
    """The options of a benchmark that times one model on one dataset (or ``--demo`` inputs)."""
    ap.add_argument("--model", type=Path, help=".pt or .onnx")
    ap.add_argument("--data", type=Path, help="data.yaml")
    ap.add_argument("--imgsz", type=int, default=160)
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds (median reported)")
    ap.add_argument("--demo", action="store_true", help="synthetic data + random model")
    ap.add_argument("--state-dir", default="/tmp/damage-bench-state")


def model_and_data(ap: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[Path, Path, Any]:
    """Activate the state dir and return (model, data.yaml, state paths): the given ones or the demo's."""
    if not args.demo and not (args.model and args.data):
        ap.error("give --model and --data, or --demo")
    from damage.tasks.core.runtime import activate, configure_ultralytics

    paths = activate(args.state_dir)
    configure_ultralytics(paths)
    if args.demo:
        return (*demo_inputs(paths.root / "bench", args.imgsz), paths)
    return args.model, args.data, paths


def alternate(base: Callable[[], Any], other: Callable[[], Any], repeat: int) -> tuple[float, float, Any, Any]:
    """Time ``base`` and ``other`` alternately ``repeat`` times in this process.

    Returns:
        (median seconds of base, median seconds of other, base's last result, other's last result).
    """
    t_base, t_other, r_base, r_other = [], [], None, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        r_base = base()
        t_base.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        r_other = other()
        t_other.append(time.perf_counter() - t0)
    return statistics.median(t_base), statistics.median(t_other), r_base, r_other


def verdict(what: str, ratio: float, target: float, repeat: int) -> int:
    """Print ``ratio`` against its target; the exit status (0 = target met)."""
    print(f"ratio {what} = {ratio:.2f}x  (target <= {target:g}x: {'OK' if ratio <= target else 'MISSED'}); "
          f"median of {repeat}")
    return 0 if ratio <= target else 1
