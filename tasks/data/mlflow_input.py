"""A dataset as an MLflow run input: digest = the project's dataset fingerprint.

Logged with ``MlflowClient.log_inputs`` on every training, evaluation and compression run, so the
MLflow UI's "Dataset" column and "runs that used this dataset" work. The digest is
``damage.tasks.data.fingerprint.dataset_fingerprint`` (the same identity as the lineage tag and the
skip-unchanged key); the profile holds the split sizes and the class counts.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

from damage.tasks.data.dataset import label_path, list_images, load_data_yaml

SOURCE_TYPE_LOCAL = "local"
SOURCE_TYPE_S3 = "s3"


@lru_cache(maxsize=8)
def _profile_cached(data_yaml: str, fingerprint: str) -> str:
    info = load_data_yaml(data_yaml, required=())  # a labelled batch has a train split only
    splits: dict[str, int] = {}
    classes: Counter[str] = Counter()
    for split, sources in info.splits.items():
        images = [im for src in sources for im in list_images(src, info.root)]
        splits[split] = len(images)
        for im in images:
            lbl = label_path(im)
            if not lbl.is_file():
                continue
            for line in lbl.read_text(errors="replace").splitlines():
                tok = line.split(maxsplit=1)
                if tok and tok[0].isdigit() and int(tok[0]) < len(info.names):
                    classes[f"{split}/{info.names[int(tok[0])]}"] += 1
    return json.dumps({"splits": splits, "instances": dict(sorted(classes.items())), "classes": info.names})


def dataset_profile(data_yaml: str | Path, fingerprint: str) -> dict[str, Any]:
    """Split sizes (images) and instance counts per ``split/class`` of a YOLO-seg dataset.

    Cached per (data.yaml, fingerprint): the train, evaluate and compress runs of one pipeline
    run count once.
    """
    return json.loads(_profile_cached(str(Path(data_yaml).resolve()), fingerprint))


def dataset_entity(data_yaml: str | Path, fingerprint: str, source: str | None = None,
                   name: str | None = None):
    """The ``mlflow.entities.Dataset`` for a dataset (digest = fingerprint, profile = counts).

    Args:
        data_yaml: the local data.yaml the run reads.
        fingerprint: ``dataset_fingerprint`` of the dataset folder.
        source: where the data came from when remote (``s3://bucket/prefix``); otherwise the
            local folder of ``data_yaml`` is the source.
        name: display name; None = the dataset folder's name.
    """
    from mlflow.entities import Dataset
    from mlflow.types.schema import ColSpec, Schema

    data_yaml = Path(data_yaml).resolve()
    # One row per sample, as an MLflow column spec (the UI's dataset panel renders ``mlflow_colspec``;
    # any other schema reads "Unrecognized Schema Format")
    columns = Schema([ColSpec("string", "split"), ColSpec("string", "image"),
                      ColSpec("string", "label", required=False)]).to_dict()
    # A remote origin (s3://) is the source; anything else ("synth", a COCO JSON...) was resolved
    # into the local folder the run actually read.
    src = source if source and source.startswith("s3://") else str(data_yaml.parent)
    kind = SOURCE_TYPE_S3 if src.startswith("s3://") else SOURCE_TYPE_LOCAL
    return Dataset(name=name or data_yaml.parent.name, digest=fingerprint, source_type=kind,
                   source=json.dumps({"uri": src}), profile=json.dumps(dataset_profile(data_yaml, fingerprint)),
                   schema=json.dumps({"mlflow_colspec": columns, "format": "yolo-seg (label: one polygon per line, "
                                      "class x1 y1 x2 y2 ... normalised)", "data_yaml": data_yaml.name}))


def log_dataset_input(client, run_id: str, data_yaml: str | Path, fingerprint: str | None = None,
                      context: str = "training", source: str | None = None) -> str:
    """Log the dataset as an input of ``run_id`` (context tag: training / evaluation / ...).

    Args:
        fingerprint: the dataset fingerprint; None = computed from the data.yaml's folder.

    Returns:
        The digest logged (the fingerprint).
    """
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    if not fingerprint:
        from damage.tasks.data.fingerprint import dataset_fingerprint

        fingerprint = dataset_fingerprint(load_data_yaml(data_yaml).root)
    ds = dataset_entity(data_yaml, fingerprint, source)
    client.log_inputs(run_id, datasets=[DatasetInput(ds, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])
    return fingerprint
