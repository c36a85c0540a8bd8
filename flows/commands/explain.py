"""``damage explain``: Grad-CAM / EigenCAM heatmaps for every detected instance of an image."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, get_args

import typer

from damage.flows.common import console, fail, run_guarded, setup
from damage.tasks.core.config import ExplainConfig

# the choices of --method are the config's (ExplainConfig.method)
Method = Enum("Method", {m: m for m in get_args(ExplainConfig.model_fields["method"].annotation)}, type=str)


def explain(
    ctx: typer.Context,
    image: Annotated[Path, typer.Argument(exists=True, help="Image file, or a folder of images (each is explained).")],
    model: Annotated[Path, typer.Option("--model", "-m", exists=True, dir_okay=False,
                                        help="Segmentation model checkpoint (.pt).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: <out>/<image stem>/*.png + explanations.json.")],
    method: Annotated[Method | None, typer.Option("--method", help="gradcam, hirescam (per instance) or eigencam (default: explain.method).")] = None,
    layer: Annotated[str | None, typer.Option("--layer", help="Layer to explain, e.g. model.21 or 21 (default: the neck layer feeding the head at each instance's stride).")] = None,
    conf: Annotated[float | None, typer.Option("--conf", help="Confidence threshold of explained detections (default: explain.conf).")] = None,
    iou: Annotated[float | None, typer.Option("--iou", help="NMS IoU threshold (default: explain.iou).")] = None,
    imgsz: Annotated[int | None, typer.Option("--imgsz", help="Letterbox size (default: the model's training size).")] = None,
    max_instances: Annotated[int | None, typer.Option("--max-instances", help="Most instances explained per image (default: explain.max_instances).")] = None,
) -> None:
    """Explain what the model looked at: one heatmap overlay per detected instance and a grid per image."""
    cfg, _ = setup(ctx)
    e = cfg.explain
    method = method.value if method else e.method

    from damage.tasks.data.dataset import IMAGE_EXTS
    from damage.tasks.evaluation.explain import explain_to_dir

    images = sorted(p for p in image.iterdir() if p.suffix.lower() in IMAGE_EXTS) if image.is_dir() else [image]
    if not images:
        fail(f"{image}: no images ({', '.join(sorted(IMAGE_EXTS))}) in this folder")
    files = run_guarded(explain_to_dir, model, images, out, method=method, layer=layer or e.layer,
                        conf=e.conf if conf is None else conf, iou=e.iou if iou is None else iou, imgsz=imgsz,
                        max_instances=e.max_instances if max_instances is None else max_instances)
    _report(files)


def _report(files: list[Path]) -> None:
    import json

    for js in (f for f in files if f.name == "explanations.json"):
        info = json.loads(js.read_text())
        inst = info["instances"]
        console.print(f"{Path(info['image']).name}: {len(inst)} instance(s) explained with {info['method']}",
                      highlight=False, soft_wrap=True, markup=False)
        for k, i in enumerate(inst):
            console.print(f"  {k:02d} {i['class']:<14} score {i['score']:.2f}  layer {i['layer']} (stride {i['stride']})"
                          f"  heat in box {i['heat_in_box']:.0%} vs box area {i['box_area_share']:.0%}",
                          highlight=False, soft_wrap=True, markup=False)
        console.print(f"  grid: {js.parent / 'grid.png'}", highlight=False, soft_wrap=True, markup=False)
    pngs = [f for f in files if f.suffix == ".png"]
    out = files[0].parent.parent if files else None
    console.print(f"wrote {len(pngs)} PNG(s) under {out}", highlight=False, soft_wrap=True, markup=False)


def register(app: typer.Typer) -> None:
    """Add ``damage explain`` to the CLI."""
    app.command("explain")(explain)
