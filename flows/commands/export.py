"""``damage export`` (ONNX + parity gate) and ``damage predict`` (ONNX Runtime, JSON + overlay per image)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from damage.flows.common import console, err_console, fail, ray_for, ray_where, run_guarded, setup


def _checkpoint_imgsz(weights: Path) -> int | None:
    """The image size the checkpoint was trained at (its saved train args), if any."""
    try:
        from damage.tasks.training.checkpoint import load_checkpoint_dict

        sz = (load_checkpoint_dict(weights).get("train_args") or {}).get("imgsz")
        return int(sz if isinstance(sz, int) else max(sz)) if sz else None
    except Exception:
        return None


def export_cmd(
    ctx: typer.Context,
    weights: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Trained Ultralytics checkpoint (.pt).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="ONNX file to write (default: beside the .pt).")] = None,
    imgsz: Annotated[int | None, typer.Option("--imgsz", help="Input size (default: export.imgsz, else the checkpoint's train size).")] = None,
    opset: Annotated[int | None, typer.Option("--opset", help="ONNX opset (default: export.opset; 12 works for FP32).")] = None,
    dynamic: Annotated[bool | None, typer.Option("--dynamic/--no-dynamic", help="Dynamic batch and image size (default: export.dynamic).")] = None,
    simplify: Annotated[bool | None, typer.Option("--simplify/--no-simplify", help="Simplify with onnxslim (default: export.simplify).")] = None,
    conf: Annotated[float | None, typer.Option("--conf", help="Operating confidence to store in the metadata.")] = None,
    iou: Annotated[float | None, typer.Option("--iou", help="Operating NMS IoU to store in the metadata.")] = None,
    images: Annotated[list[Path] | None, typer.Option("--image", help="Parity-gate image (repeatable; default: generated images).")] = None,
) -> None:
    """Export a checkpoint to ONNX with metadata, then run the PyTorch-vs-ONNX-Runtime parity gate."""
    cfg, paths = setup(ctx)
    from damage.tasks.core.runtime import configure_ultralytics

    configure_ultralytics(paths)
    from damage.tasks.export.onnx import export_onnx, parity_check, read_onnx_metadata, record_backend_latency

    e = cfg.export
    size = imgsz or e.imgsz or _checkpoint_imgsz(weights) or cfg.train.imgsz
    target = (out or weights.with_suffix(".onnx")).resolve()
    meta: dict[str, Any] = {"source_weights": str(weights.resolve())}
    if conf is not None:
        meta["conf"] = conf
    if iou is not None:
        meta["iou"] = iou
    opset_ = opset or e.opset
    run_guarded(export_onnx, weights, target, size, opset_, e.dynamic if dynamic is None else dynamic,
                e.simplify if simplify is None else simplify, meta)
    console.print(f"exported {weights} -> {target} (imgsz {size}, opset {opset_}, "
                  f"{target.stat().st_size / 2**20:.1f} MB)", highlight=False, soft_wrap=True)
    res = run_guarded(parity_check, weights, target, list(images) if images else e.parity_images, size, e.parity_atol)
    f = res.figures
    console.print(f"parity gate passed on {res.images} image(s), atol {res.atol:g}: detections max abs "
                  f"{f['det_max_abs']:.3g} (mean {f['det_mean_abs']:.3g}; boxes {f['box_max_abs_px']:.3g} px, scores "
                  f"{f['score_max_abs']:.3g}), prototypes max abs {f['proto_max_abs']:.3g} (mean {f['proto_mean_abs']:.3g})",
                  highlight=False, soft_wrap=True)
    choice = run_guarded(record_backend_latency, target, size, cfg.predictor.latency_runs,
                         cfg.predictor.openvino_precision)
    if choice:
        lat = ", ".join(f"{k} {v:.1f} ms" for k, v in choice["backend_latency_ms"].items())
        console.print(f"runtimes on this machine ({choice['backend_cpu']}): {lat} -> predictor.backend auto = "
                      f"{choice['preferred_backend']}", highlight=False, soft_wrap=True)
    md = read_onnx_metadata(target)
    console.print(f"metadata: names={md.get('names')} imgsz={md.get('imgsz')} stride={md.get('stride')} "
                  f"conf={md.get('conf')} iou={md.get('iou')}", highlight=False, soft_wrap=True)


RESERVED_NAMES = {"index"}  # index.json is the run's own listing


def _out_names(images: list[str], out: Path | None = None) -> dict[str, str]:
    """NAME for each image: its stem, or stem_ext where two images share a stem; then ``_1``,
    ``_2``... until it is unique ignoring case (case-insensitive file systems), is not a reserved
    name (``index``) and its ``NAME.json``/``NAME.png`` in ``out`` is not one of the inputs. So no
    output ever overwrites another output or an input image."""
    from pathlib import PurePosixPath

    from damage.tasks.serving.one_image import is_s3

    stems: dict[str, int] = {}
    paths = {s: PurePosixPath(s[5:]) if is_s3(s) else Path(s) for s in images}
    for p in paths.values():
        stems[p.stem.lower()] = stems.get(p.stem.lower(), 0) + 1
    inputs = {p.resolve() for p in paths.values() if isinstance(p, Path)}
    taken = set(RESERVED_NAMES)
    names: dict[str, str] = {}
    for s, p in paths.items():
        base = p.stem if stems[p.stem.lower()] == 1 else f"{p.stem}_{p.suffix.lstrip('.')}"
        name, k = base, 0
        while name.lower() in taken or (out is not None and any(
                (out / f"{name}{ext}").resolve() in inputs for ext in (".json", ".png"))):
            k += 1
            name = f"{base}_{k}"
        taken.add(name.lower())
        names[s] = name
    return names


def _model_file(model: str, state_root: Path, notify=None) -> Path:
    """A local ``.onnx``, or the hash-verified approved copy of a ``models:/`` URI (``fetch_approved_uri``)."""
    if model.startswith("models:/"):
        from damage.model_registry.frozen import approved_file, fetch_approved_uri
        from damage.tasks.core import tracking

        local = run_guarded(fetch_approved_uri, tracking.client(), model, Path(state_root) / "approved" / "predict",
                            notify)
        return run_guarded(approved_file, local, ".onnx")
    p = Path(model)
    if not p.is_file():
        fail(f"{p}: model file not found")
    return p
def _slices_option(value: str | None) -> str | dict | None:
    """``--slices``: ``off``, ``auto`` or ``SIZE[:OVERLAP]`` as the predictor's setting (None: not given)."""
    if value is None or value.strip().lower() in ("off", "auto"):
        return value and value.strip().lower()
    size, _, overlap = value.partition(":")
    try:
        return {"size": int(size), **({"overlap": float(overlap)} if overlap else {})}
    except ValueError:
        fail(f"--slices must be off, auto or SIZE[:OVERLAP] (e.g. 640:0.2), got {value!r}")


def predict_cmd(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="An image, a folder of images, or s3://bucket/prefix (read in place, "
                                          "never copied first).")],
    model: Annotated[str, typer.Option("--model", "-m", help="Exported model (.onnx), or models:/NAME@production | "
                                       "models:/NAME/VERSION (the approved copy, hash-verified).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for NAME.json and NAME.png.")],
    conf: Annotated[float | None, typer.Option("--conf", help="Confidence threshold (default: the model's metadata).")] = None,
    iou: Annotated[float | None, typer.Option("--iou", help="NMS IoU threshold (default: the model's metadata).")] = None,
    overlay: Annotated[bool, typer.Option("--overlay/--no-overlay", help="Write NAME.png overlays.")] = True,
    backend: Annotated[str | None, typer.Option("--backend", help="Runtime: auto|onnxruntime|openvino (default: predictor.backend; auto = the faster one measured at export).")] = None,
    collect: Annotated[bool, typer.Option("--collect", help="Keep the images the model is unsure about in the labelling inbox (serving.collect rules, inbox and cap).")] = False,
    slices: Annotated[str | None, typer.Option("--slices", help="Sliced inference of large photos: off|auto|SIZE[:OVERLAP] tiles in pixels (default: the model's damage.slices metadata, else predictor.slices).")] = None,
    ray: Annotated[bool | None, typer.Option("--ray/--no-ray", help="Shard the images over Ray workers (Ray Data; each worker loads the model once, ray.worker_threads threads; default: ray.enabled). Needs the [ray] extra.")] = None,
) -> None:
    """Segment damage with ONNX Runtime or OpenVINO; per image write NAME.json (instances, per-vehicle damage %) and NAME.png."""
    cfg, paths = setup(ctx)
    from damage.tasks.core.notify import send
    from damage.tasks.data.dataset import IMAGE_EXTS
    from damage.tasks.scale.batch import PredictorSettings, build_predictor
    from damage.tasks.serving.one_image import list_sources

    use_ray = cfg.ray.enabled if ray is None else ray
    if use_ray and collect:
        fail("--collect needs the image bytes in this process: run it without --ray")
    model = _model_file(model, paths.root, lambda msg: send(cfg.notify, "failure", f"refused {model}", msg))
    images = run_guarded(list_sources, source, IMAGE_EXTS)
    if not images:
        fail(f"{source}: no images (extensions: jpg, jpeg, png, bmp, tif, tiff, webp)")
    pc = cfg.predictor
    settings = PredictorSettings(
        conf=conf, iou=iou, backend=backend or pc.backend, slices=_slices_option(slices),
        config_slices=pc.slices_value if slices is None else None,
        kwargs={"spinning": pc.spinning, "cache_optimized": pc.cache_optimized,
                "openvino_precision": pc.openvino_precision})
    # the predictor of this process: the run's summary line, and the work itself without --ray
    pred = run_guarded(build_predictor, model, settings, pc.threads or None)
    out.mkdir(parents=True, exist_ok=True)
    names = _out_names(images, out)
    inbox = None
    if collect:  # --collect is the opt-in: the rules, inbox and cap of serving.collect apply
        from damage.tasks.data.blobstore import open_store
        from damage.tasks.serving.inbox import Inbox

        cc = cfg.serving.collect.model_copy(update={"enabled": True})
        inbox = Inbox(cc, open_store(cc.inbox, paths.root / "inbox"), max_pixels=pred.max_pixels)
    results = (_ray_results(cfg, paths, model, images, settings, overlay) if use_ray
               else _local_results(pred, model, images, overlay, inbox))
    index, failed, collected = _write_results(results, names, out, len(images))
    if len(images) == 1 and not failed:
        d = index[0]
        pct = "n/a" if d["damage_percent"] is None else f"{d['damage_percent']:.1f}%"
        console.print(f"{images[0]}: {d['instances']} instance(s), damage {pct}", highlight=False, soft_wrap=True)
    where = f", Ray: {ray_where(cfg)}" if use_ray else ""
    console.print(f"predicted {len(images) - failed}/{len(images)} image(s) (conf {pred.conf:g}, iou {pred.iou:g}, "
                  f"{pred.backend}, slices {json.dumps(pred.slices.to_value())}{where}) -> {out}", highlight=False,
                  soft_wrap=True)
    if inbox is not None:
        console.print(f"collected {sum(collected)} image(s) for labelling -> {inbox.store.uri} "
                      f"(next: damage data label-export)", highlight=False, soft_wrap=True)
    if failed:
        err_console.print(f"{failed} image(s) failed; see their JSON files", highlight=False)
        raise typer.Exit(1)


def _local_results(pred, model: Path, images: list[str], overlay: bool, inbox) -> Iterator[tuple[str, dict, bytes | None, bool]]:
    """(source, document, overlay PNG, collected) per image, in this process, in order."""
    from damage.tasks.core.errors import DamageError
    from damage.tasks.serving.one_image import error_doc, predict_source, read_source

    for src in images:
        try:
            data = read_source(src)
            doc, png = predict_source(pred, src, str(model), overlay, data=data)
            yield src, doc, png, bool(inbox is not None and inbox.maybe_collect(data, doc))
        except DamageError as e:
            yield src, error_doc(src, str(model), str(e)), None, False


def _ray_results(cfg, paths, model: Path, images: list[str], settings, overlay: bool) -> Iterator[tuple[str, dict, bytes | None, bool]]:
    """The same tuples from Ray Data workers (``damage.tasks.scale.batch``), as batches finish."""
    from damage.tasks.scale.batch import predict_on_ray

    ray_for(cfg, paths, True)
    # AWS keys go to the workers of an embedded Ray only (this machine); a cluster's workers use their own
    for r in run_guarded(predict_on_ray, model, images, settings, cfg.ray, str(model), overlay):
        yield r.source, r.doc, r.png, False


def _write_results(results, names: dict[str, str], out: Path, total: int) -> tuple[list[dict], int, list[bool]]:
    """NAME.json (and NAME.png) per result, written as each arrives; then index.json in the input order."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from damage.tasks.core.atomic import atomic_write_bytes, atomic_write_json
    from damage.tasks.core.errors import DamageError

    rows: dict[str, dict] = {}
    collected: list[bool] = []
    with Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err_console, disable=total == 1, transient=True) as bar:
        task = bar.add_task("predict", total=total)
        try:
            for src, doc, png, kept in results:
                name = names[src]
                if "error" in doc:
                    rows[src] = {"image": src, "json": f"{name}.json", "error": doc["error"]}
                    err_console.print(f"[red]error:[/] {doc['error']}", highlight=False, soft_wrap=True)
                else:
                    if png is not None:
                        atomic_write_bytes(out / f"{name}.png", png)
                    rows[src] = {"image": src, "json": f"{name}.json", "instances": len(doc["instances"]),
                                 "damage_percent": doc["damage_percent"]}
                atomic_write_json(out / f"{name}.json", doc, indent=1)
                collected.append(kept)
                bar.advance(task)
        except DamageError as e:
            fail(str(e))
    index = [rows[s] for s in names if s in rows]
    atomic_write_json(out / "index.json", index, indent=1)
    return index, sum("error" in r for r in index), collected


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)
    app.command("predict")(predict_cmd)
