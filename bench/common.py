"""Shared benchmark helpers (bench scripts run as plain scripts from the repo root)."""

from __future__ import annotations

from pathlib import Path


def build_random_model(size: str, work: Path, imgsz: int) -> tuple[Path, Path]:
    """YOLOv8-seg of ``size`` with random weights and our 7 classes, saved as .pt and exported to ONNX."""
    import yaml
    from ultralytics import YOLO
    from ultralytics.nn.tasks import yaml_model_load

    from tasks.core.config import CLASSES
    from tasks.export.onnx import export_onnx

    pt, onnx = work / f"yolov8{size}-seg-rand.pt", work / f"yolov8{size}-seg-rand-{imgsz}.onnx"
    if not pt.exists():
        d = yaml_model_load(f"yolov8{size}-seg.yaml")
        d["nc"] = len(CLASSES)
        d.pop("yaml_file", None)
        y = work / f"yolov8{size}-seg-7.yaml"
        y.write_text(yaml.safe_dump(d))
        m = YOLO(str(y), task="segment")
        m.model.names = dict(enumerate(CLASSES))
        m.save(str(pt))
    if not onnx.exists():
        export_onnx(pt, onnx, imgsz)
    return pt, onnx
