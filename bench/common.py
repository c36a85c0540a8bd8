"""Shared benchmark helpers (bench scripts run as plain scripts from the repo root)."""

from __future__ import annotations

from pathlib import Path


def build_random_model(size: str, work: Path, imgsz: int, family: str = "yolov8",
                       end2end: bool = False) -> tuple[Path, Path]:
    """``{family}{size}-seg`` with random weights and our 7 classes, saved as .pt and exported to ONNX.

    ``end2end`` exports YOLO26's NMS-free head (``tasks.export.onnx.export_onnx``).
    """
    import yaml
    from ultralytics import YOLO
    from ultralytics.nn.tasks import yaml_model_load

    from tasks.core.config import CLASSES
    from tasks.core.families import model_source
    from tasks.export.onnx import export_onnx

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


def announce_machine(threads: dict[str, int] | None = None) -> dict:
    """Print what this benchmark runs on (CPU, ISA, runtimes, threads) and return it for the JSON output.

    Call after the thread counts are set (torch's count is read when torch is imported).
    """
    from tasks.core.machine import machine_info, machine_line

    info = machine_info(threads)
    print(machine_line(info), flush=True)
    return info


def write_json(path: Path | None, machine: dict, results: object) -> None:
    """``{"machine": ..., "results": ...}`` to ``path`` (atomic; nothing when ``path`` is None)."""
    if path is None:
        return
    from tasks.core.atomic import atomic_write_json

    atomic_write_json(Path(path), {"machine": machine, "results": results})
    print(f"results: {path}")
