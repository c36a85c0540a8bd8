"""The labelling inbox: requests the served model is unsure about, kept for a person to label.

``Inbox.maybe_collect(image_bytes, prediction)`` is called on the request path (the scoring
server, ``damage predict --collect``). It keeps a request when

* ``uncertain``: a damage instance's confidence lies in ``serving.collect.band`` [low, high);
* ``disagreement``: the canary or shadow model's prediction (``other``) disagrees with the served
  one (``disagree``), or the caller already found so (``reason="disagreement"``);

and at most ``max_per_hour`` items per process are kept (a sliding one-hour window), so a burst of
hard photos cannot flood the reviewers (a claims team reviews a few hundred photos a week).

Each item is two objects under the inbox (a folder or ``s3://bucket/prefix``)::

    <id>.<png|jpg|...>   the image bytes as received
    <id>.json            {"reason": ..., "prediction": {width, height, model, conf, iou, instances}}

``<id>`` is ``<UTC time>-<sha256 of the image, 16 hex>``: the time gives the retention rule
without reading anything (``purge_expired``), the hash names the image. The JSON is written
after the image, so an item with a JSON is complete. Nothing else of the request is stored: the
prediction is copied field by field from a whitelist (no file name, no client data).

A write failure is logged as a warning and never reaches the request: ``maybe_collect`` never
raises. Items older than ``retention_days`` are deleted by ``purge_expired``: at most once an hour
while collecting, before every ``damage data label-export``, and by ``damage data inbox-purge``.

Example:
    >>> inbox = Inbox(cfg.serving.collect, open_store(cfg.serving.collect.inbox, paths.root / "inbox"))
    >>> inbox.maybe_collect(jpeg_bytes, prediction)   # -> "20261204T113100Z-1a2b..." or None
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from damage.tasks.core.config import CollectConfig
from damage.tasks.core.images import DEFAULT_MAX_PIXELS, check_image_bytes, image_header

log = logging.getLogger(__name__)

REASONS = ("uncertain", "disagreement")
ID_RE = re.compile(r"^(\d{8}T\d{6}Z)-([0-9a-f]{16})$")
STAMP = "%Y%m%dT%H%M%SZ"
EXTS = {"png": "png", "jpeg": "jpg", "webp": "webp", "bmp": "bmp", "tiff": "tif"}
# The prediction fields kept (a whitelist: anything else a caller's dict carries is dropped).
PRED_KEYS = ("width", "height", "model", "conf", "iou")
INSTANCE_KEYS = ("class", "score", "box", "polygon")


def prediction_record(prediction: Any) -> dict[str, Any]:
    """The stored form of a prediction (a ``Prediction`` or its ``to_dict()``): whitelisted fields only."""
    d = prediction.to_dict() if hasattr(prediction, "to_dict") else dict(prediction)
    out = {k: d[k] for k in PRED_KEYS if k in d}
    out["instances"] = [{k: i.get(k) for k in INSTANCE_KEYS} for i in d.get("instances") or []]
    return out


def _damage(instances: Iterable[Mapping[str, Any]], ignore: Iterable[str]) -> list[Mapping[str, Any]]:
    skip = set(ignore)
    return [i for i in instances if i.get("class") not in skip]


def uncertain(pred: Mapping[str, Any], band: tuple[float, float], ignore: Iterable[str] = ("vehicle",)) -> bool:
    """Whether a damage instance's score lies in ``band`` [low, high).

    >>> uncertain({"instances": [{"class": "dent", "score": 0.3}]}, (0.25, 0.5))
    True
    >>> uncertain({"instances": [{"class": "vehicle", "score": 0.3}, {"class": "dent", "score": 0.9}]}, (0.25, 0.5))
    False
    """
    lo, hi = band
    return any(lo <= float(i.get("score", 0.0)) < hi for i in _damage(pred.get("instances") or [], ignore))


def box_iou(a: list[float], b: list[float]) -> float:
    """IoU of two ``[x1, y1, x2, y2]`` boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def disagree(a: Mapping[str, Any], b: Mapping[str, Any], iou: float = 0.5,
             ignore: Iterable[str] = ("vehicle",)) -> bool:
    """Whether two predictions of one image disagree on the damage.

    They agree when their damage instances pair up one to one, each pair of the same class with a
    box IoU of at least ``iou`` (greedy, best IoU first); any unpaired instance is a disagreement.

    >>> d = {"instances": [{"class": "dent", "box": [0, 0, 10, 10]}]}
    >>> disagree(d, d), disagree(d, {"instances": []})
    (False, True)
    """
    da, db = _damage(a.get("instances") or [], ignore), _damage(b.get("instances") or [], ignore)
    if len(da) != len(db):
        return True
    pairs = sorted(((box_iou(x["box"], y["box"]), i, j) for i, x in enumerate(da) for j, y in enumerate(db)
                    if x.get("class") == y.get("class")), reverse=True)
    used_a: set[int] = set()
    used_b: set[int] = set()
    for v, i, j in pairs:
        if v >= iou and i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
    return len(used_a) != len(da)


@dataclass(frozen=True)
class ItemKeys:
    """The objects of one inbox item."""

    id: str
    image: str
    record: str


def item_id(image_bytes: bytes, now: dt.datetime) -> str:
    """``<UTC time>-<sha256[:16]>`` of an image collected at ``now``."""
    return f"{now.astimezone(dt.UTC).strftime(STAMP)}-{hashlib.sha256(image_bytes).hexdigest()[:16]}"


def collected_at(key: str) -> dt.datetime | None:
    """The collection time encoded in an inbox key (None: not an inbox item's key)."""
    m = ID_RE.match(key.rsplit("/", 1)[-1].split(".", 1)[0])
    return dt.datetime.strptime(m.group(1), STAMP).replace(tzinfo=dt.UTC) if m else None


def list_items(keys: Iterable[str]) -> dict[str, ItemKeys]:
    """Complete items (an image and its JSON) among ``keys``, by id."""
    images: dict[str, str] = {}
    records: set[str] = set()
    for k in keys:
        stem, _, ext = k.partition(".")
        if not ID_RE.match(stem):
            continue
        if ext == "json":
            records.add(stem)
        elif ext in EXTS.values():
            images[stem] = k
    return {i: ItemKeys(i, images[i], f"{i}.json") for i in sorted(images) if i in records}


class Inbox:
    """Collection rules + writes to a store (``damage.tasks.data.blobstore``); safe to share between threads.

    Args:
        config: the ``serving.collect`` section.
        store: where items go (``LocalStore`` / ``S3Store``).
        max_pixels: images above this are not kept (bounded by their header; nothing is decoded).
        clock: seconds since the epoch (injectable for tests of the rate cap).
    """

    def __init__(self, config: CollectConfig, store: Any, max_pixels: int = DEFAULT_MAX_PIXELS,
                 clock=time.time) -> None:
        self.config = config
        self.store = store
        self.max_pixels = max_pixels
        self.clock = clock
        self._recent: deque[float] = deque()
        self._lock = threading.Lock()
        self._last_purge: float | None = None

    def reason(self, prediction: Mapping[str, Any], other: Mapping[str, Any] | None = None,
               reason: str | None = None) -> str | None:
        """Why this request would be collected (None: it would not), before the rate cap."""
        c = self.config
        if reason is not None:
            if reason not in REASONS:
                raise ValueError(f"collect reason must be one of {', '.join(REASONS)}, got {reason!r}")
            return None if reason == "disagreement" and not c.disagreement else reason
        if c.disagreement and other is not None and disagree(prediction, prediction_record(other),
                                                             c.disagreement_iou, c.ignore_classes):
            return "disagreement"
        return "uncertain" if uncertain(prediction, c.band, c.ignore_classes) else None

    def _take_slot(self, now: float) -> bool:
        """One slot of the hourly cap (sliding window), or False when it is spent."""
        with self._lock:
            while self._recent and self._recent[0] <= now - 3600:
                self._recent.popleft()
            if len(self._recent) >= self.config.max_per_hour:
                return False
            self._recent.append(now)
            return True

    def maybe_collect(self, image_bytes: bytes, prediction: Any, reason: str | None = None,
                      other: Any = None) -> str | None:
        """Keep this request in the inbox if a rule says so and the cap allows; never raises.

        Args:
            image_bytes: the encoded image as received (PNG, JPEG, ...).
            prediction: the served model's ``Prediction`` (or its ``to_dict()``).
            reason: the caller's own finding ("disagreement" when it compared canary and shadow);
                None = apply the rules here.
            other: the canary's or shadow's prediction of the same image, to compare with.

        Returns:
            The item id written, or None (not collected, cap reached, or the write failed: a warning).
        """
        if not self.config.enabled:
            return None
        try:
            pred = prediction_record(prediction)
            why = self.reason(pred, other, reason)
            if why is None or not self._take_slot(self.clock()):
                return None
            iid = self._write(image_bytes, pred, why)
        except Exception as e:  # the request must not fail because the inbox could not keep it
            log.warning("inbox %s: request not collected: %s: %s", getattr(self.store, "uri", "?"),
                        type(e).__name__, e)
            return None
        self._purge_hourly()
        return iid

    def _purge_hourly(self) -> None:
        """While collecting, purge expired items at most once an hour (retention holds without a cron job)."""
        now = self.clock()
        with self._lock:
            if self._last_purge is not None and now - self._last_purge < 3600:
                return
            self._last_purge = now
        try:
            self.purge_expired(dt.datetime.fromtimestamp(now, dt.UTC))
        except Exception as e:
            log.warning("inbox %s: purge failed: %s: %s", getattr(self.store, "uri", "?"), type(e).__name__, e)

    def _write(self, image_bytes: bytes, pred: dict[str, Any], reason: str) -> str:
        check_image_bytes(image_bytes, self.max_pixels, "collected image")
        ext = EXTS.get(image_header(image_bytes)[0])
        if ext is None:
            raise ValueError(f"image format {image_header(image_bytes)[0]!r} is not kept (png, jpeg, webp, bmp, tiff)")
        iid = item_id(image_bytes, dt.datetime.fromtimestamp(self.clock(), dt.UTC))
        self.store.put(f"{iid}.{ext}", image_bytes)  # the image first: a record always has its image
        self.store.put(f"{iid}.json", json.dumps({"reason": reason, "prediction": pred}).encode())
        log.info("inbox %s: collected %s (%s)", self.store.uri, iid, reason)
        return iid

    def purge_expired(self, now: dt.datetime | None = None) -> list[str]:
        """Delete every object collected more than ``retention_days`` before ``now`` (default: now).

        Objects whose name carries no collection time are not the inbox's and are left alone.
        Returns the keys deleted.
        """
        now = now or dt.datetime.now(dt.UTC)
        cutoff = now - dt.timedelta(days=self.config.retention_days)
        gone = []
        for key in self.store.list():
            t = collected_at(key)
            if t is not None and t < cutoff:
                self.store.delete(key)
                gone.append(key)
        return gone
