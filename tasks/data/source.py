"""Turn ``data.source`` into a local YOLO-seg dataset (its data.yaml) the rest of the pipeline reads.

Sources: ``synth`` (the built-in generator, cached by its parameters), a local YOLO-seg folder
or data.yaml, a COCO instance JSON (imported into the state dir, cached by content), or
``s3://bucket/prefix`` (synced to a local cache first).
"""

from __future__ import annotations

from pathlib import Path

from damage.tasks.core.config import DataConfig
from damage.tasks.core.errors import DatasetError
from damage.tasks.data.fingerprint import file_sha256


def synth_dir(datasets_root: Path, cfg: DataConfig) -> Path:
    """Cache folder of a synthetic dataset: keyed by its parameters and the generator version."""
    import hashlib
    import json

    from damage.tasks.data.synth import GENERATOR_VERSION

    s = cfg.synth
    # every generator argument is in the key (the composition ones through a short hash)
    comp = {"closeup_fraction": s.closeup_fraction, "zoom": list(s.zoom), "balance": s.balance}
    if s.tile_fraction:  # only then: the folders of sets without tiles keep their names
        comp.update({"tile_fraction": s.tile_fraction, "tile_scale": s.tile_scale})
    comp = json.dumps(comp, sort_keys=True)
    return datasets_root / (f"synth-g{GENERATOR_VERSION}-n{s.images}-px{s.imgsz}"
                            f"-v{int(s.val_fraction * 100)}-s{s.seed}-{hashlib.sha256(comp.encode()).hexdigest()[:8]}")


def absolute_data_yaml(data_yaml: Path, datasets_root: Path) -> Path:
    """A data.yaml whose ``path:`` is absolute, so every reader resolves the same root.

    Ultralytics resolves a relative ``path:`` against the working directory (or its datasets
    dir), while this project resolves it by ``load_data_yaml``'s rule. The user's file is never
    modified: when its ``path:`` is missing or relative, an equivalent copy with the absolute
    root is written under the state dir and returned.
    """
    import hashlib

    import yaml

    from damage.tasks.data.dataset import load_data_yaml

    info = load_data_yaml(data_yaml, required=())
    raw = dict(info.raw)
    root = raw.get("path")
    if isinstance(root, str) and Path(root).is_absolute():
        return data_yaml
    raw["path"] = str(info.root)
    text = yaml.safe_dump(raw, sort_keys=False)
    out = datasets_root / "resolved" / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
    if not out.is_file():
        from damage.tasks.core.atomic import atomic_write_text

        atomic_write_text(out, text)
    return out


def resolve_source(cfg: DataConfig, datasets_root: Path, cache_root: Path) -> Path:
    """Return the data.yaml of a local YOLO-seg dataset for ``cfg.source``.

    Raises:
        DatasetError: the source does not exist or is not a dataset (message names the path).
    """
    src = cfg.source
    if src == "synth":
        from damage.tasks.data.synth import generate_dataset

        out = synth_dir(datasets_root, cfg)
        if (out / "data.yaml").is_file():
            return out / "data.yaml"
        s = cfg.synth
        return generate_dataset(out, images=s.images, seed=s.seed, imgsz=s.imgsz, val_fraction=s.val_fraction,
                                closeup_fraction=s.closeup_fraction, zoom=s.zoom, balance=s.balance,
                                tile_fraction=s.tile_fraction, tile_scale=s.tile_scale)
    if src.startswith("s3://"):
        from damage.tasks.data.storage import sync_s3_dataset

        local = sync_s3_dataset(src, cache_root / "s3")
        return resolve_source(cfg.model_copy(update={"source": str(local)}), datasets_root, cache_root)
    p = Path(src).expanduser().resolve()
    if not p.exists():
        raise DatasetError(f"{p}: dataset path does not exist")
    if p.is_file() and p.suffix == ".json":  # COCO instance JSON: import once per content hash
        from damage.tasks.data.importer import import_dataset

        out = datasets_root / f"coco-{p.stem}-{file_sha256(p)[:12]}"
        if not (out / "data.yaml").is_file():
            import_dataset(p, out, classes=cfg.classes)
        return out / "data.yaml"
    if p.is_file() and p.suffix in {".yaml", ".yml"}:
        return absolute_data_yaml(p, datasets_root)
    if p.is_dir():
        for name in ("data.yaml", "dataset.yaml"):
            if (p / name).is_file():
                return absolute_data_yaml(p / name, datasets_root)
        jsons = sorted(p.glob("*.json")) + sorted(p.glob("annotations/*.json"))
        if len(jsons) == 1:
            return resolve_source(cfg.model_copy(update={"source": str(jsons[0])}), datasets_root, cache_root)
        raise DatasetError(f"{p}: not a dataset (no data.yaml, and not exactly one COCO JSON)")
    raise DatasetError(f"{p}: not a dataset (expected a folder, a data.yaml or a COCO .json)")
