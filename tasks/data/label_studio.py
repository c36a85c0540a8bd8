"""To and from Label Studio: inbox items (and label-issue rows) out as tasks, reviewed labels back in.

**Out.** ``export_inbox`` writes ``tasks.json`` (Label Studio's import format) and
``label_config.xml`` (an ``Image`` + ``PolygonLabels`` config over the project's classes). Each
task's ``data`` holds the image URL and the inbox id; its ``predictions`` hold the model's
instances as polygon pre-annotations (``polygonlabels``, points in percent of the image size,
``original_width`` / ``original_height`` in pixels), so a reviewer corrects instead of drawing.
``issue_tasks`` does the same for label-issue mining rows (plain dicts with ``ann_polygon`` /
``pred_polygon`` in pixels): the dataset's label and the model's suggestion are two
pre-annotations of one task.

**In.** ``import_export`` reads a Label Studio JSON export and writes the reviewed tasks as one
YOLO-seg *batch* (``images/train``, ``labels/train``, ``data.yaml``, ``batch.json``) under a
batches folder, which ``data.batches`` adds to the next nightly. The export is checked whole
first: unknown labels, polygons outside the image (or with fewer than 3 points), other result
types, a size that is not the inbox image's, and images missing from the inbox refuse the import
with one line per bad task; nothing is written then. The batch is built in a temp folder and
renamed (nothing half-imported), and a task whose labels an earlier batch already holds is not
imported again (importing one export twice adds nothing). Tasks nobody annotated, and cancelled
(skipped) annotations, are left out and counted.

Example:
    >>> export_inbox(store, Path("ls"), CLASSES)                     # -> ls/tasks.json, ls/label_config.xml
    >>> import_export(Path("export.json"), store, Path(".state/reviewed"), CLASSES).batch
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import yaml

from damage.tasks.core.atomic import atomic_output_dir, atomic_write_json, atomic_write_text
from damage.tasks.core.errors import DatasetError
from damage.tasks.core.images import DEFAULT_MAX_PIXELS, check_image_bytes, check_image_file
from damage.tasks.serving.inbox import ID_RE, list_items

FROM_NAME = "label"  # the PolygonLabels control
TO_NAME = "image"  # the Image object (its value is $image)
BATCH_MANIFEST = "batch.json"
EPS = 1e-6  # percent: float noise of Label Studio's own clamping, not a polygon outside the image


def label_config(classes: Sequence[str]) -> str:
    """The Label Studio labelling config (XML) for the project's classes.

    >>> "<Label value=\\"dent\\"/>" in label_config(["vehicle", "dent"])
    True
    """
    labels = "\n".join(f"    <Label value={quoteattr(c)}/>" for c in classes)
    return (f'<View>\n  <Image name="{TO_NAME}" value="${TO_NAME}" zoom="true"/>\n'
            f'  <PolygonLabels name="{FROM_NAME}" toName="{TO_NAME}" strokeWidth="2" pointSize="small">\n'
            f"{labels}\n  </PolygonLabels>\n</View>\n")


def polygon_region(points_px: Sequence[Sequence[float]], label: str, width: int, height: int,
                   score: float | None = None) -> dict[str, Any]:
    """One ``polygonlabels`` result item: pixel points -> percent of the image, clipped to it."""
    pts = [[round(min(max(float(x) / width * 100, 0.0), 100.0), 4),
            round(min(max(float(y) / height * 100, 0.0), 100.0), 4)] for x, y in points_px]
    region: dict[str, Any] = {
        "id": uuid.uuid4().hex[:10], "from_name": FROM_NAME, "to_name": TO_NAME, "type": "polygonlabels",
        "original_width": int(width), "original_height": int(height), "image_rotation": 0,
        "value": {"points": pts, "polygonlabels": [label], "closed": True},
    }
    if score is not None:
        region["score"] = round(float(score), 5)
    return region


def box_polygon(box: Sequence[float]) -> list[list[float]]:
    """The four corners of an ``[x1, y1, x2, y2]`` box (a region when no outline is known)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return [[x1, y1], [x2, y1], [x2, y2], [x1, y2]]


def prediction_regions(pred: Mapping[str, Any], classes: Sequence[str]) -> list[dict[str, Any]]:
    """The regions of a stored prediction (``damage.tasks.serving.inbox.prediction_record``); classes not in
    ``classes`` are left out (a reviewer could not keep them)."""
    w, h = int(pred["width"]), int(pred["height"])
    out = []
    for inst in pred.get("instances") or []:
        pts = inst.get("polygon") or (box_polygon(inst["box"]) if inst.get("box") else None)
        if inst.get("class") in classes and pts and len(pts) >= 3:
            out.append(polygon_region(pts, inst["class"], w, h, inst.get("score")))
    return out


def default_image_url(store_uri: str, key: str) -> str:
    """Where Label Studio finds an inbox image: the ``s3://`` URL (a connected S3 source storage signs
    it), or a local-files URL (``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED`` with the document root ``/``)."""
    if store_uri.startswith("s3://"):
        return f"{store_uri.rstrip('/')}/{key}"
    return f"/data/local-files/?d={(Path(store_uri) / key).as_posix().lstrip('/')}"


def inbox_tasks(store: Any, classes: Sequence[str], image_url: Callable[[str], str] | None = None
                ) -> list[dict[str, Any]]:
    """One Label Studio task per complete inbox item, its prediction as the pre-annotation."""
    url = image_url or (lambda key: default_image_url(store.uri, key))
    tasks = []
    for iid, item in list_items(store.list()).items():
        try:
            rec = json.loads(store.get(item.record))
            pred = rec["prediction"]
            regions = prediction_regions(pred, classes)
        except (ValueError, KeyError, TypeError) as e:
            raise DatasetError(f"{store.uri}/{item.record}: not an inbox record ({e})") from None
        scores = [r["score"] for r in regions if "score" in r]
        tasks.append({
            "data": {TO_NAME: url(item.image), "inbox_id": iid, "reason": rec.get("reason", "")},
            "predictions": [{"model_version": str(pred.get("model") or "model"),
                             "score": round(min(scores), 5) if scores else 0.0, "result": regions}],
        })
    return tasks


def _json_list(v: Any) -> Any:
    if isinstance(v, str):
        return json.loads(v) if v.strip() else None
    return v


def issue_tasks(rows: Iterable[Mapping[str, Any]], image_url: Callable[[str], str],
                image_size: Callable[[str], tuple[int, int]], min_score: float = 0.0) -> list[dict[str, Any]]:
    """Label Studio tasks for label-issue rows (``label_issues.csv`` as dicts), one task per image.

    Each row may carry ``ann_polygon`` / ``ann_box`` (the dataset's label) and ``pred_polygon`` /
    ``pred_box`` (the model's suggestion), as lists or JSON text in image pixels. The task gets two
    pre-annotations: ``dataset-label`` (every flagged label of the image) and ``model-suggestion``;
    its data lists the issues (kind, score, evidence) for the reviewer.

    Args:
        rows: the mining rows (``damage.tasks.evaluation.label_issues.CSV_COLUMNS`` plus the four above).
        image_url: row ``image`` -> the URL Label Studio loads.
        image_size: row ``image`` -> (width, height) in pixels.
        min_score: rows below this score are left out (the flagged ones: ``label_issues.flag_score``).
    """
    by_image: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        if float(r.get("score") or 0) >= min_score:
            by_image.setdefault(str(r["image"]), []).append(r)
    tasks = []
    for image, rs in by_image.items():
        w, h = image_size(image)
        sides: dict[str, list[dict[str, Any]]] = {"dataset-label": [], "model-suggestion": []}
        for r in rs:
            for side, poly, box, cls, score in (
                    ("dataset-label", "ann_polygon", "ann_box", "label_class", None),
                    ("model-suggestion", "pred_polygon", "pred_box", "pred_class", r.get("conf"))):
                pts = _json_list(r.get(poly)) or (box_polygon(_json_list(r[box])) if _json_list(r.get(box)) else None)
                if pts and len(pts) >= 3 and r.get(cls):
                    sides[side].append(polygon_region(pts, str(r[cls]), w, h,
                                                      float(score) if score not in (None, "") else None))
        tasks.append({
            "data": {TO_NAME: image_url(image), "source_image": image,
                     "issues": "; ".join(f"{r.get('kind')} {float(r.get('score') or 0):.2f}: {r.get('evidence', '')}"
                                         for r in rs)},
            "predictions": [{"model_version": side, "result": regs} for side, regs in sides.items() if regs],
        })
    return tasks


def write_tasks(tasks: list[dict[str, Any]], classes: Sequence[str], out_dir: Path) -> tuple[Path, Path]:
    """``out_dir/tasks.json`` and ``out_dir/label_config.xml``, each written atomically."""
    out_dir = Path(out_dir)
    return (atomic_write_json(out_dir / "tasks.json", tasks, indent=1),
            atomic_write_text(out_dir / "label_config.xml", label_config(classes)))


def export_inbox(store: Any, out_dir: Path, classes: Sequence[str],
                 image_url: Callable[[str], str] | None = None) -> tuple[Path, int]:
    """Write the inbox as Label Studio tasks (``tasks.json`` + ``label_config.xml``); (tasks.json, count)."""
    tasks = inbox_tasks(store, classes, image_url)
    return write_tasks(tasks, classes, out_dir)[0], len(tasks)


def export_issue_rows(rows: Iterable[Mapping[str, Any]], data_yaml: Path, out_dir: Path, classes: Sequence[str],
                      min_score: float, max_pixels: int = DEFAULT_MAX_PIXELS,
                      image_url: Callable[[str], str] | None = None) -> tuple[Path, int]:
    """Label-issue rows (images relative to ``data_yaml``'s root) -> ``out_dir/tasks.json``; (path, count).

    Image sizes come from the image headers (bounded by ``max_pixels``; nothing is decoded).
    """
    from damage.tasks.data.dataset import load_data_yaml

    root = load_data_yaml(data_yaml, required=()).root

    def size(im: str) -> tuple[int, int]:
        p = (root / im).resolve()
        if not p.is_relative_to(root.resolve()):
            raise DatasetError(f"{im}: label-issue image resolves outside the dataset root {root}")
        return check_image_file(p, max_pixels)

    url = image_url or (lambda im: default_image_url(str(root), im))
    tasks = issue_tasks(rows, url, size, min_score=min_score)
    return write_tasks(tasks, classes, out_dir)[0], len(tasks)


# ----------------------------------------------------------------------------- import


@dataclass
class ImportResult:
    """What one import did."""

    batch: Path | None  # the batch folder written (None: nothing new)
    imported: list[str] = field(default_factory=list)  # inbox ids
    already: list[str] = field(default_factory=list)  # same labels already in an earlier batch
    unreviewed: list[str] = field(default_factory=list)  # task ids with no (uncancelled) annotation

    def summary(self) -> str:
        where = f" -> {self.batch}" if self.batch else " (nothing new: no batch written)"
        return (f"imported {len(self.imported)} reviewed task(s); {len(self.already)} already imported, "
                f"{len(self.unreviewed)} not reviewed{where}")


def _task_item(task: Mapping[str, Any]) -> str | None:
    data = task.get("data") or {}
    iid = data.get("inbox_id")
    if not iid and isinstance(data.get(TO_NAME), str):  # fall back to the image URL's file name
        iid = data[TO_NAME].split("?")[-1].rsplit("/", 1)[-1].rsplit("=", 1)[-1].split(".", 1)[0]
    return str(iid) if iid else None


def _chosen_annotation(task: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The annotation that counts: a ground-truth one, else the latest; cancelled ones never."""
    anns = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if not anns:
        return None
    return max(anns, key=lambda a: (bool(a.get("ground_truth")), str(a.get("updated_at") or a.get("created_at") or ""),
                                    int(a.get("id") or 0)))


def region_line(region: Mapping[str, Any], classes: Sequence[str], size: tuple[int, int]) -> str:
    """A YOLO-seg label line from one result item; raises ValueError saying what is wrong with it."""
    kind = region.get("type")
    if kind != "polygonlabels":
        raise ValueError(f"result type {kind!r} is not supported (polygonlabels only)")
    v = region.get("value") or {}
    labels = v.get("polygonlabels") or []
    if len(labels) != 1:
        raise ValueError(f"a polygon needs exactly one label, got {labels}")
    if labels[0] not in classes:
        raise ValueError(f"unknown label {labels[0]!r} (known: {', '.join(classes)})")
    if region.get("image_rotation"):
        raise ValueError(f"image rotated by {region['image_rotation']} degrees (rotation is not supported)")
    ow, oh = region.get("original_width"), region.get("original_height")
    if ow is not None and oh is not None and (int(ow), int(oh)) != size:
        raise ValueError(f"annotated at {ow}x{oh} but the inbox image is {size[0]}x{size[1]}")
    pts = v.get("points")
    if not isinstance(pts, list) or len(pts) < 3:
        raise ValueError(f"a polygon needs at least 3 points, got {len(pts) if isinstance(pts, list) else pts!r}")
    coords = []
    for p in pts:
        if not (isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(c, int | float) for c in p)):
            raise ValueError(f"point {p!r} is not [x, y]")
        if not all(-EPS <= c <= 100 + EPS for c in p):
            raise ValueError(f"polygon point {list(p)} lies outside the image (0-100%)")
        coords += [min(max(c / 100, 0.0), 1.0) for c in p]
    return f"{classes.index(labels[0])} " + " ".join(f"{c:.6f}" for c in coords)


def _load_export(path: Path) -> list[Mapping[str, Any]]:
    try:
        tasks = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: not a readable Label Studio JSON export ({e})") from None
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise DatasetError(f"{path}: a Label Studio JSON export is a list of tasks")
    return tasks


def is_label_studio_export(path: Path) -> bool:
    """Whether ``path`` is a JSON list of tasks (a COCO file is a mapping)."""
    if Path(path).suffix.lower() != ".json" or not Path(path).is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def batch_dirs(root: Path) -> list[Path]:
    """The batches under a batches folder, oldest import first."""
    def key(d: Path) -> tuple[str, str]:
        try:
            return str(json.loads((d / BATCH_MANIFEST).read_text()).get("imported_at", "")), d.name
        except (OSError, ValueError):
            return "", d.name
    root = Path(root)
    return sorted((d for d in root.iterdir() if d.is_dir() and (d / BATCH_MANIFEST).is_file()), key=key) \
        if root.is_dir() else []


def imported_labels(root: Path) -> dict[str, str]:
    """inbox id -> hash of its labels, as the batches under ``root`` hold them (later batches win)."""
    out: dict[str, str] = {}
    for d in batch_dirs(root):
        out.update(json.loads((d / BATCH_MANIFEST).read_text()).get("items", {}))
    return out


def import_export(export_json: Path, store: Any, batches_root: Path, classes: Sequence[str],
                  max_pixels: int = DEFAULT_MAX_PIXELS, now: dt.datetime | None = None) -> ImportResult:
    """Import a Label Studio JSON export of inbox tasks as a new batch under ``batches_root``.

    Raises:
        DatasetError: unreadable export, or bad tasks (one line per task: unknown label, polygon
            outside the image, image missing from the inbox, ...). Nothing is written then.
    """
    export_json = Path(export_json)
    tasks = _load_export(export_json)
    items = list_items(store.list())
    done = imported_labels(batches_root)
    errors: list[str] = []
    chosen: dict[str, tuple[str, list[str]]] = {}  # inbox id -> (image key, label lines)
    res = ImportResult(batch=None)
    sizes: dict[str, tuple[int, int]] = {}  # image bytes are read again when written: no export-sized memory
    for n, task in enumerate(tasks):
        name = f"task {task.get('id', f'#{n}')}"
        ann = _chosen_annotation(task)
        if ann is None:
            res.unreviewed.append(str(task.get("id", f"#{n}")))
            continue
        iid = _task_item(task)
        if not iid or not ID_RE.match(iid) or iid not in items:
            errors.append(f"{name}: image {iid or (task.get('data') or {}).get(TO_NAME)!r} is not in the inbox {store.uri}")
            continue
        if iid not in sizes:
            try:
                sizes[iid] = check_image_bytes(store.get(items[iid].image), max_pixels, f"{store.uri}/{items[iid].image}")
            except Exception as e:
                errors.append(f"{name} ({iid}): inbox image unreadable: {e}")
                continue
        lines, bad = [], []
        for k, region in enumerate(ann.get("result") or []):
            try:
                lines.append(region_line(region, classes, sizes[iid]))
            except ValueError as e:
                bad.append(f"region {region.get('id', k)}: {e}")
        if bad:
            errors.append(f"{name} ({iid}): " + "; ".join(bad))
        elif iid in chosen and chosen[iid][1] != lines:
            errors.append(f"{name} ({iid}): the export labels this inbox image twice, differently")
        else:
            chosen[iid] = (items[iid].image, lines)
    if errors:
        raise DatasetError(f"{export_json}: refused, {len(errors)} bad task(s); nothing imported:\n  "
                           + "\n  ".join(errors))
    new: dict[str, str] = {}
    for iid, (_, lines) in sorted(chosen.items()):
        h = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
        (res.already if done.get(iid) == h else res.imported).append(iid)
        if done.get(iid) != h:
            new[iid] = h
    if not new:
        return res
    now = now or dt.datetime.now(dt.UTC)
    digest = hashlib.sha256(json.dumps(new, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(batches_root) / f"ls-{now.strftime('%Y%m%dT%H%M%SZ')}-{digest}"
    with atomic_output_dir(out) as tmp:
        (tmp / "images" / "train").mkdir(parents=True)
        (tmp / "labels" / "train").mkdir(parents=True)
        for iid in new:
            key, lines = chosen[iid]
            (tmp / "images" / "train" / key).write_bytes(store.get(key))
            (tmp / "labels" / "train" / f"{iid}.txt").write_text("".join(f"{ln}\n" for ln in lines))
        (tmp / "data.yaml").write_text(yaml.safe_dump({"path": ".", "train": "images/train",
                                                       "names": dict(enumerate(classes))}, sort_keys=False))
        atomic_write_json(tmp / BATCH_MANIFEST, {
            "export": export_json.name, "export_sha256": hashlib.sha256(export_json.read_bytes()).hexdigest(),
            "inbox": store.uri, "imported_at": now.isoformat(), "items": new})
    res.batch = out
    return res
