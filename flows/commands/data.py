"""``damage data synth``, ``damage data import`` and ``damage data issues``: make or bring in a
YOLO-seg dataset, and rank its likely label errors with a trained model. The labelling loop:
``damage data label-export`` (inbox -> Label Studio tasks), ``damage data import EXPORT.json OUT --inbox``
(reviewed labels -> a batch for ``data.batches``) and ``damage data inbox-purge`` (retention)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from damage.flows.common import RayOpt, console, fail, ray_for, ray_where, setup

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
    ctx: typer.Context,
    out: Annotated[Path, typer.Argument(help="Output folder (created; an earlier synth output is replaced).")],
    images: Annotated[int | None, typer.Option("--images", "-n", min=2, help="Number of images, at least one train and one val (default: data.synth.images).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Generator seed (default: data.synth.seed).")] = None,
    imgsz: Annotated[int | None, typer.Option("--imgsz", min=32, help="Image side in pixels (default: data.synth.imgsz).")] = None,
    val_fraction: Annotated[float | None, typer.Option("--val-fraction", help="Share of val images (default: data.synth.val_fraction).")] = None,
    closeup_fraction: Annotated[float | None, typer.Option("--closeup-fraction", help="Share of close-up inspection views, 0-1 (default: data.synth.closeup_fraction; the demo uses 0.65).")] = None,
    zoom: Annotated[tuple[float, float] | None, typer.Option("--zoom", help="Close-up magnification range MIN MAX, both >= 1 (default: data.synth.zoom).")] = None,
    tile_fraction: Annotated[float | None, typer.Option("--tile-fraction", help="Share of tile-scale crops of high-resolution scenes, what sliced inference sees (default: data.synth.tile_fraction).")] = None,
    tile_scale: Annotated[float | None, typer.Option("--tile-scale", help="Scene size of the tile crops as a multiple of --imgsz (default: data.synth.tile_scale).")] = None,
    balance: Annotated[bool | None, typer.Option("--balance/--no-balance", help="Class-balanced damage counts (default: data.synth.balance).")] = None,
) -> None:
    """Generate the built-in synthetic vehicle-damage dataset (deterministic by seed).

    Every setting of the demo's data is an option (defaults from data.synth): the demo's set is
    `damage --config configs/demo.yaml data synth OUT`, or `damage data synth OUT -n 400 --closeup-fraction 0.65`;
    the whole-scene evaluation set of the demo is `damage data synth OUT -n 25 --imgsz 640 --seed 1034 --val-fraction 0.96`.
    """
    cfg, _ = setup(ctx)
    s = cfg.data.synth
    images = s.images if images is None else images
    seed = s.seed if seed is None else seed
    imgsz = s.imgsz if imgsz is None else imgsz
    val_fraction = s.val_fraction if val_fraction is None else val_fraction
    closeup_fraction = s.closeup_fraction if closeup_fraction is None else closeup_fraction
    zoom = s.zoom if zoom is None else zoom
    tile_fraction = s.tile_fraction if tile_fraction is None else tile_fraction
    tile_scale = s.tile_scale if tile_scale is None else tile_scale
    balance = s.balance if balance is None else balance
    if not 0 < val_fraction < 1:
        fail(f"--val-fraction must be between 0 and 1, got {val_fraction}")

    import time

    from damage.tasks.core.errors import DamageError
    from damage.tasks.data.synth import generate_dataset

    t0 = time.perf_counter()
    try:
        data_yaml = generate_dataset(out, images=images, seed=seed, imgsz=imgsz, val_fraction=val_fraction,
                                     closeup_fraction=closeup_fraction, zoom=tuple(zoom), balance=balance,
                                     tile_fraction=tile_fraction, tile_scale=tile_scale)
    except DamageError as e:
        fail(str(e))
    root = data_yaml.parent
    n_train = len(list((root / "images" / "train").iterdir()))
    n_val = len(list((root / "images" / "val").iterdir()))
    console.print(f"wrote {images} synthetic images ({imgsz}px, seed {seed}, close-ups {closeup_fraction:g}, zoom "
                  f"{zoom[0]:g}-{zoom[1]:g}, tiles {tile_fraction:g} x{tile_scale:g}) in {time.perf_counter() - t0:.1f}s: "
                  f"train={n_train} val={n_val}", highlight=False, soft_wrap=True)
    console.print(f"dataset: {root}", highlight=False, soft_wrap=True)
    console.print(f"data.yaml: {data_yaml}", highlight=False, soft_wrap=True)


@data_app.command("import")
def import_(
    ctx: typer.Context,
    src: Annotated[Path, typer.Argument(help="YOLO-seg folder (with data.yaml) or COCO instances JSON.")],
    out: Annotated[Path, typer.Argument(help="Output folder (must not exist or be empty); for a Label Studio export, the batches folder (each import adds one batch).")],
    images_dir: Annotated[Path | None, typer.Option("--images-dir", help="COCO image folder (default: found beside the JSON).")] = None,
    maps: Annotated[list[str] | None, typer.Option("--map", "-m", help="Class mapping SRC=DST (repeatable; DST '-' drops SRC).")] = None,
    allow_unknown: Annotated[bool, typer.Option("--allow-unknown", help="Skip source classes with no target (listed) instead of failing.")] = False,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Share of val images when the import makes the split (COCO).")] = 0.2,
    seed: Annotated[int | None, typer.Option("--seed", help="Split seed (default: config seed).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output folder.")] = False,
    inbox: Annotated[str | None, typer.Option("--inbox", help="Label Studio export: the inbox its tasks came from (folder or s3://; default: serving.collect.inbox).")] = None,
) -> None:
    """Import a YOLO-seg folder or COCO JSON (polygons, RLE) into the pipeline's YOLO-seg layout,
    or a Label Studio JSON export of inbox tasks as a new labelled batch under OUT (--inbox).

    Target classes are data.classes from the config (default: vehicle and CarDD's six damage
    types). Exit code 1 when source classes have no target and --allow-unknown is not given.
    """
    if not src.exists():
        fail(f"{src}: source not found")
    from damage.tasks.data.label_studio import is_label_studio_export

    if inbox is not None or is_label_studio_export(src):
        _import_label_studio(ctx, src, out, inbox)
        return
    if images_dir is not None and not images_dir.is_dir():
        fail(f"{images_dir}: images folder not found")
    class_map = _parse_maps(maps)
    cfg, _ = setup(ctx)

    from damage.tasks.core.errors import DamageError
    from damage.tasks.data.importer import UnknownClassesError, import_dataset

    try:
        report = import_dataset(src, out, class_map=class_map, classes=cfg.data.classes, val_fraction=val_fraction,
                                seed=cfg.seed if seed is None else seed, images_dir=images_dir,
                                allow_unknown=allow_unknown, overwrite=overwrite,
                                max_pixels=cfg.validation.max_pixels)
    except UnknownClassesError as e:
        fail(str(e), code=1)
    except DamageError as e:
        fail(str(e))
    for line in report.summary():
        console.print(line, highlight=False, soft_wrap=True, markup=False)


@data_app.command("issues")
def issues(
    ctx: typer.Context,
    data: Annotated[Path, typer.Argument(help="Dataset root or its data.yaml (YOLO-seg); only read.")],
    model: Annotated[Path, typer.Option("--model", "-m", help="Trained model (.pt or .onnx) to score the labels with.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for label_issues.csv and label_issues_top.png (default: <state>/reports/label_issues).")] = None,
    splits: Annotated[list[str] | None, typer.Option("--split", help="Split to score (repeatable; default: label_issues.splits).")] = None,
    trained_on: Annotated[list[str] | None, typer.Option("--trained-on", help="Split the model was trained on (repeatable; default: train); its rows are marked in_sample.")] = None,
    imgsz: Annotated[int | None, typer.Option("--imgsz", help="Letterbox size (default: the model's own).")] = None,
    top: Annotated[int, typer.Option("--top", help="Rows to print.")] = 10,
    folds: Annotated[int | None, typer.Option("--folds", min=0, help="K-fold out-of-sample scores for the train split (K >= 2 trainings, train: config section; default: label_issues.folds).")] = None,
    export: Annotated[str | None, typer.Option("--export", help="Also write the flagged rows as tasks for: label-studio (OUT/label-studio/tasks.json).")] = None,
    url_prefix: Annotated[str | None, typer.Option("--url-prefix", help="--export: image URL = PREFIX + the row's image path (default: Label Studio local-files URLs).")] = None,
    ray: RayOpt = None,
) -> None:
    """Rank likely label errors (missing label, wrong class, bad outline, spurious label) with one
    inference pass of a trained model. Nothing in the dataset is changed: a person decides."""
    cfg, paths = setup(ctx)
    if export not in (None, "label-studio"):
        fail(f"--export {export}: the one target is label-studio")
    if not data.exists():
        fail(f"{data}: dataset not found")
    if not model.is_file():
        fail(f"{model}: model file not found")
    from damage.tasks.core.errors import DamageError
    from damage.tasks.data.dataset import find_data_yaml
    from damage.tasks.evaluation.label_issues import kfold_label_issues, mine_label_issues

    li = cfg.label_issues.model_copy(update={"splits": splits}) if splits else cfg.label_issues
    if folds is not None:
        if folds == 1:
            fail("--folds: 0 (off) or at least 2")
        li = li.model_copy(update={"folds": folds})
    out = out or paths.reports / "label_issues"
    rcfg = ray_for(cfg, paths, ray)
    try:
        data_yaml = find_data_yaml(data) if data.is_dir() else data
        if li.folds >= 2:
            console.print(f"K-fold: {li.folds} fold models ({li.fold_start}) score the train split out of sample",
                          highlight=False, soft_wrap=True, markup=False)
            res = kfold_label_issues(data_yaml, li, model, cfg.train, out / "folds", imgsz=imgsz, out_dir=out,
                                     seed=cfg.seed, ray=rcfg)
        else:
            res = mine_label_issues(data_yaml, li, model=model, imgsz=imgsz, out_dir=out,
                                    trained_splits=tuple(trained_on or ("train",)), ray=rcfg)
    except DamageError as e:
        fail(str(e))
    for r in res.rows[:top]:
        console.print(f"#{r['rank']:<4} {r['score']:.2f} {r['kind']:<15} {r['image']} [{r['annotation']}]: "
                      f"{r['evidence']}", highlight=False, soft_wrap=True, markup=False)
    console.print(res.summary_line() + (f" (Ray: {ray_where(cfg)})" if rcfg else ""), highlight=False,
                  soft_wrap=True, markup=False)
    if res.in_sample_splits:
        console.print(f"note: the model trained on {', '.join(res.in_sample_splits)}; those rows (in_sample=true) "
                      "are biased towards their labels", highlight=False, soft_wrap=True, markup=False)
    console.print(f"overlay grid: {res.grid_path}", highlight=False, soft_wrap=True, markup=False)
    if export:
        from damage.tasks.data.label_studio import export_issue_rows

        try:
            tasks_json, n = export_issue_rows(res.rows, data_yaml, out / "label-studio", _classes(cfg),
                                              li.flag_score, cfg.validation.max_pixels,
                                              (lambda im: url_prefix + im) if url_prefix else None)
        except DamageError as e:
            fail(str(e))
        console.print(f"{n} Label Studio task(s) (rows scored >= {li.flag_score:g}) -> {tasks_json}",
                      highlight=False, soft_wrap=True, markup=False)


def _inbox_store(cfg, paths, inbox: str | None):
    from damage.tasks.data.blobstore import open_store

    return open_store(inbox or cfg.serving.collect.inbox, paths.root / "inbox")


def _classes(cfg) -> list[str]:
    from damage.tasks.core.config import CLASSES

    return list(cfg.data.classes or CLASSES)


def _import_label_studio(ctx: typer.Context, export: Path, out: Path, inbox: str | None) -> None:
    """A Label Studio JSON export -> a new batch under ``out`` (checked whole first; nothing half-imported)."""
    cfg, paths = setup(ctx)
    from damage.tasks.core.errors import DamageError
    from damage.tasks.data.label_studio import import_export

    store = _inbox_store(cfg, paths, inbox)
    try:
        res = import_export(export, store, out, _classes(cfg), max_pixels=cfg.validation.max_pixels)
    except DamageError as e:
        fail(str(e))
    console.print(res.summary(), highlight=False, soft_wrap=True, markup=False)
    if res.batch:
        console.print(f"train on it: add {out} to data.batches (e.g. --set 'data.batches=[\"{out}\"]')",
                      highlight=False, soft_wrap=True, markup=False)


@data_app.command("label-export")
def label_export(
    ctx: typer.Context,
    inbox: Annotated[str | None, typer.Argument(help="Inbox folder or s3://bucket/prefix (default: serving.collect.inbox).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for tasks.json and label_config.xml (default: <state>/label-studio).")] = None,
    url_prefix: Annotated[str | None, typer.Option("--url-prefix", help="Image URL = PREFIX + image key (default: s3:// URLs for an S3 inbox, Label Studio local-files URLs for a folder).")] = None,
) -> None:
    """Write the inbox as Label Studio tasks, each with the model's prediction as polygon pre-annotations."""
    cfg, paths = setup(ctx)
    from damage.tasks.core.errors import DamageError
    from damage.tasks.data.label_studio import export_inbox
    from damage.tasks.serving.inbox import Inbox

    store = _inbox_store(cfg, paths, inbox)
    out = out or paths.root / "label-studio"
    try:
        expired = Inbox(cfg.serving.collect, store).purge_expired()  # nothing past retention goes out
        if expired:
            console.print(f"purged {len(expired)} expired object(s) (serving.collect.retention_days)",
                          highlight=False, soft_wrap=True, markup=False)
        tasks_json, n = export_inbox(store, out, _classes(cfg),
                                     (lambda key: url_prefix + key) if url_prefix else None)
    except DamageError as e:
        fail(str(e))
    console.print(f"{n} task(s) from {store.uri} -> {tasks_json}\nlabelling config: {out / 'label_config.xml'} "
                  f"(import both into a Label Studio project; export its JSON and run `damage data import`)",
                  highlight=False, soft_wrap=True, markup=False)


@data_app.command("inbox-purge")
def inbox_purge(
    ctx: typer.Context,
    inbox: Annotated[str | None, typer.Argument(help="Inbox folder or s3://bucket/prefix (default: serving.collect.inbox).")] = None,
) -> None:
    """Delete inbox items older than serving.collect.retention_days (run it daily, e.g. from cron)."""
    cfg, paths = setup(ctx)
    from damage.tasks.serving.inbox import Inbox

    gone = Inbox(cfg.serving.collect, _inbox_store(cfg, paths, inbox)).purge_expired()
    console.print(f"deleted {len(gone)} object(s) older than {cfg.serving.collect.retention_days:g} days",
                  highlight=False, soft_wrap=True, markup=False)


def register(app: typer.Typer) -> None:
    """Add the ``data`` command group to the ``damage`` CLI."""
    app.add_typer(data_app, name="data")
