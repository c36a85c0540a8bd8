"""``damage data synth`` and ``damage data import``: make or bring in a YOLO-seg dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.common import ConfigOpt, SetOpt, StateOpt, console, fail, setup

data_app = typer.Typer(help="Datasets: generate the built-in synthetic set or import YOLO-seg / COCO data.",
                       no_args_is_help=True)


def _parse_maps(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            fail(f"--map '{item}' must look like SRC=DST (e.g. --map 'glass shatter=glass_shatter', or SRC=- to drop)")
        k, v = item.split("=", 1)
        if not k.strip():
            fail(f"--map '{item}': empty source class name")
        out[k.strip()] = v.strip()
    return out


@data_app.command("synth")
def synth(
    out: Annotated[Path, typer.Argument(help="Output folder (created; an earlier synth output is replaced).")],
    images: Annotated[int | None, typer.Option("--images", "-n", help="Number of images (default: data.synth.images).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Generator seed (default: data.synth.seed).")] = None,
    imgsz: Annotated[int | None, typer.Option("--imgsz", help="Image side in pixels (default: data.synth.imgsz).")] = None,
    val_fraction: Annotated[float | None, typer.Option("--val-fraction", help="Share of val images (default: data.synth.val_fraction).")] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    state_dir: StateOpt = None,
) -> None:
    """Generate the built-in synthetic vehicle-damage dataset (deterministic by seed)."""
    cfg, _ = setup(config, sets, state_dir)
    s = cfg.data.synth
    images = s.images if images is None else images
    seed = s.seed if seed is None else seed
    imgsz = s.imgsz if imgsz is None else imgsz
    val_fraction = s.val_fraction if val_fraction is None else val_fraction
    if images < 2:
        fail(f"--images must be >= 2 (one train and one val image), got {images}")
    if imgsz < 32:
        fail(f"--imgsz must be >= 32, got {imgsz}")
    if not 0 < val_fraction < 1:
        fail(f"--val-fraction must be between 0 and 1, got {val_fraction}")

    import time

    from tasks.core.errors import DamageError
    from tasks.data.synth import generate_dataset

    t0 = time.perf_counter()
    try:
        data_yaml = generate_dataset(out, images=images, seed=seed, imgsz=imgsz, val_fraction=val_fraction,
                                     closeup_fraction=s.closeup_fraction, zoom=s.zoom, balance=s.balance)
    except DamageError as e:
        fail(str(e))
    root = data_yaml.parent
    n_train = len(list((root / "images" / "train").iterdir()))
    n_val = len(list((root / "images" / "val").iterdir()))
    console.print(f"wrote {images} synthetic images ({imgsz}px, seed {seed}) in {time.perf_counter() - t0:.1f}s: "
                  f"train={n_train} val={n_val}", highlight=False, soft_wrap=True)
    console.print(f"dataset: {root}", highlight=False, soft_wrap=True)
    console.print(f"data.yaml: {data_yaml}", highlight=False, soft_wrap=True)


@data_app.command("import")
def import_(
    src: Annotated[Path, typer.Argument(help="YOLO-seg folder (with data.yaml) or COCO instances JSON.")],
    out: Annotated[Path, typer.Argument(help="Output folder (must not exist or be empty).")],
    images_dir: Annotated[Path | None, typer.Option("--images-dir", help="COCO image folder (default: found beside the JSON).")] = None,
    maps: Annotated[list[str] | None, typer.Option("--map", "-m", help="Class mapping SRC=DST (repeatable; DST '-' drops SRC).")] = None,
    allow_unknown: Annotated[bool, typer.Option("--allow-unknown", help="Skip source classes with no target (listed) instead of failing.")] = False,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Share of val images when the import makes the split (COCO).")] = 0.2,
    seed: Annotated[int | None, typer.Option("--seed", help="Split seed (default: config seed).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output folder.")] = False,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    state_dir: StateOpt = None,
) -> None:
    """Import a YOLO-seg folder or COCO JSON (polygons, RLE) into the pipeline's YOLO-seg layout.

    Target classes are data.classes from the config (default: vehicle and CarDD's six damage
    types). Exit code 1 when source classes have no target and --allow-unknown is not given.
    """
    if not src.exists():
        fail(f"{src}: source not found")
    if images_dir is not None and not images_dir.is_dir():
        fail(f"{images_dir}: images folder not found")
    class_map = _parse_maps(maps)
    cfg, _ = setup(config, sets, state_dir)

    from tasks.core.errors import DamageError
    from tasks.data.dataset import UnknownClassesError, import_dataset

    try:
        report = import_dataset(src, out, class_map=class_map, classes=cfg.data.classes, val_fraction=val_fraction,
                                seed=cfg.seed if seed is None else seed, images_dir=images_dir,
                                allow_unknown=allow_unknown, overwrite=overwrite)
    except UnknownClassesError as e:
        fail(str(e), code=1)
    except DamageError as e:
        fail(str(e))
    for line in report.summary():
        console.print(line, highlight=False, soft_wrap=True, markup=False)


def register(app: typer.Typer) -> None:
    """Add the ``data`` command group to the ``damage`` CLI."""
    app.add_typer(data_app, name="data")
