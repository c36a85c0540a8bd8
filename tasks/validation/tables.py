"""The three tables the expectation suites check, built from the streaming scan's rows.

Rows arrive one image at a time from worker processes and are stored column-wise in numpy
arrays (no pixel data, ~100 bytes per image, ~60 bytes per annotation), so 100k images fit in
a few tens of MB; the pandas DataFrames Great Expectations needs are made once at the end.

Duplicates: exact ones by SHA-256; near ones by 64-bit dHash within a Hamming distance, found
with the pigeonhole multi-index (split the hash into d+1 bands: two hashes within distance d
agree exactly on at least one band), so the work is near-linear instead of O(n^2).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pandas as pd

from damage.tasks.validation.scan import ANNOTATION_FIELDS, THUMB_SIDE, Inventory, Layout, Sample

SPLIT_RANK = {"train": 0, "val": 1, "test": 2}
_ANN_DTYPE = np.dtype([
    ("image", "i4"), ("line", "i4"), ("parse_ok", "?"), ("error", "O"), ("class_id", "f8"),
    ("n_points", "f4"), ("coord_min", "f8"), ("coord_max", "f8"), ("xmin", "f4"), ("ymin", "f4"),
    ("xmax", "f4"), ("ymax", "f4"), ("area", "f8"), ("self_intersects", "?"),
])
_FLUSH = 4096


class TableBuilder:
    """Collects scan rows column-wise; ``add`` accepts rows in any order (by sample index)."""

    def __init__(self, samples: list[Sample]):
        n = len(samples)
        self.samples = samples
        self.decodes = np.zeros(n, bool)
        self.error = np.full(n, "", dtype=object)
        self.fmt = np.full(n, "", dtype=object)
        self.size = np.full((n, 3), np.nan, np.float32)  # width, height, channels
        self.nbytes = np.zeros(n, np.int64)
        self.sha = np.zeros(n, "S32")
        self.phash = np.zeros(n, np.uint64)
        self.thumb = np.zeros((n, THUMB_SIDE * THUMB_SIDE), np.uint8)
        self.stats = np.full((n, 3), np.nan, np.float32)  # blur, brightness, contrast
        self.instances = np.zeros(n, np.int32)
        self.mtime = np.zeros(n, np.int64)
        self.seen = np.zeros(n, bool)
        self._ann: list[np.ndarray] = []
        self._pending: list[tuple] = []

    def add(self, idx: int, row: tuple, anns: list[tuple]) -> None:
        """Store one image row (``IMAGE_FIELDS`` order) and its annotation rows."""
        decodes, error, fmt, w, h, c, nbytes, sha, phash, blur, bright, contrast, mtime, thumb = row
        self.mtime[idx] = mtime
        self.seen[idx] = True
        self.decodes[idx] = decodes
        self.error[idx] = error
        self.fmt[idx] = fmt
        if decodes:  # sizes of undecodable files would only add secondary findings
            self.size[idx] = (w, h, c)
            self.phash[idx] = int(phash, 16)
            if thumb:
                self.thumb[idx] = np.frombuffer(thumb, np.uint8)
        self.nbytes[idx] = nbytes
        if sha:
            self.sha[idx] = bytes.fromhex(sha)
        self.stats[idx] = (blur, bright, contrast)
        self.instances[idx] = sum(1 for a in anns if a[1])
        self._pending.extend((idx, *a) for a in anns)
        if len(self._pending) >= _FLUSH:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._ann.append(np.array(self._pending, dtype=_ANN_DTYPE))
            self._pending = []

    @property
    def annotation_count(self) -> int:
        self._flush()
        return int(sum(int(a["parse_ok"].sum()) for a in self._ann))

    def images_frame(self) -> pd.DataFrame:
        """Per-image table (one row per image file found, symlinks out of the dataset excluded)."""
        s = self.samples
        sha_hex = [b.hex() if b else "" for b in (bytes(x) for x in self.sha)]
        return pd.DataFrame({
            "file": [x.image_rel for x in s],
            "split": [x.split for x in s],
            "label_file": [x.label_rel for x in s],
            "has_label": [x.label_exists for x in s],
            "expected_label": [x.label_rel for x in s],
            "decodes": self.decodes,
            "error": self.error,
            "format": self.fmt,
            "width": self.size[:, 0].astype(float),
            "height": self.size[:, 1].astype(float),
            "channels": self.size[:, 2].astype(float),
            "pixels": (self.size[:, 0].astype(float) * self.size[:, 1].astype(float)),
            "bytes": self.nbytes,
            "sha256": sha_hex,
            "phash": [f"{int(v):016x}" if d else "" for v, d in zip(self.phash, self.decodes, strict=True)],
            "blur": self.stats[:, 0].astype(float),
            "brightness": self.stats[:, 1].astype(float),
            "contrast": self.stats[:, 2].astype(float),
            "instances": self.instances,
            "mtime_ns": self.mtime,
        })

    def annotations_frame(self) -> pd.DataFrame:
        """Per-annotation table: one row per non-blank label line (line 0 = unreadable file)."""
        self._flush()
        arr = np.concatenate(self._ann) if self._ann else np.zeros(0, _ANN_DTYPE)
        img = arr["image"]
        df = pd.DataFrame({
            "file": [self.samples[i].label_rel for i in img],
            "image": [self.samples[i].image_rel for i in img],
            "split": [self.samples[i].split for i in img],
        })
        for name in ANNOTATION_FIELDS:
            col = arr[name]
            df[name] = col.astype(float) if col.dtype.kind == "f" else col
        # A polygon with no points has no geometry: leave its geometry checks to n_points.
        return df


# --------------------------------------------------------------------------------------------
# Duplicates
# --------------------------------------------------------------------------------------------


def _popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x) if hasattr(np, "bitwise_count") else np.unpackbits(
        x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)


def near_pairs(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int, int]]:
    """Pairs (i, j, distance), i < j, of distinct 64-bit hashes within ``max_distance`` bits.

    Multi-index search: with d+1 bands, two hashes within distance d share one band exactly.
    Candidates come from equal-band buckets and are verified with a popcount. Falls back to
    blockwise all-pairs for large d (>= 16), where bands get too narrow to prune.
    """
    n = len(hashes)
    if n < 2 or max_distance <= 0:
        return []
    hashes = hashes.astype(np.uint64)
    pairs: set[tuple[int, int]] = set()
    if max_distance < 16:
        bands = max_distance + 1
        edges = np.linspace(0, 64, bands + 1).astype(int)
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            mask = np.uint64((1 << (hi - lo)) - 1)
            keys = (hashes >> np.uint64(lo)) & mask
            order = np.argsort(keys, kind="stable")
            sk = keys[order]
            starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
            ends = np.r_[starts[1:], n]
            for a, b in zip(starts, ends, strict=True):
                if b - a < 2:
                    continue
                members = order[a:b]
                hm = hashes[members]
                d = _popcount(hm[:, None] ^ hm[None, :])
                ii, jj = np.nonzero(np.triu(d <= max_distance, 1))
                for x, y in zip(members[ii], members[jj], strict=True):
                    pairs.add((int(min(x, y)), int(max(x, y))))
        out = []
        for i, j in sorted(pairs):
            out.append((i, j, int(_popcount(np.array([hashes[i] ^ hashes[j]], np.uint64))[0])))
        return out
    out = []
    block = 2048
    for s in range(0, n, block):
        d = _popcount(hashes[s:s + block, None] ^ hashes[None, :])
        ii, jj = np.nonzero(d <= max_distance)
        for a, b in zip(ii + s, jj, strict=True):
            if a < b:
                out.append((int(a), int(b), int(d[a - s, b])))
    return out


# A hash match is a near duplicate only if the grey thumbnails also agree within this mean
# absolute difference (0-255 levels): flat and smoothly shaded images share dHashes.
NEAR_DUP_THUMB_TOL = 10.0


def _thumbs_close(a: np.ndarray, b: np.ndarray) -> bool:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()) <= NEAR_DUP_THUMB_TOL


def duplicate_rows(images: pd.DataFrame, max_distance: int, thumbs: np.ndarray | None = None) -> list[dict]:
    """Dataset-table rows for images that duplicate an earlier one.

    "Earlier" means train before val before test, then older before newer (the copy is the
    newer file), then path order.

    Exact duplicates (same SHA-256) and near duplicates (dHash distance <= ``max_distance``,
    confirmed by ``thumbs``, the per-image grey thumbnails indexed like ``images``, when given)
    within a split get ``dup_of`` / ``near_dup_of``; a twin in another split gets ``leak_of``.
    The first image of each group is the one kept; every other member names its twin.
    """
    ok = images[images["decodes"]].copy()
    if ok.empty:
        return []
    ok["_rank"] = ok["split"].map(lambda s: SPLIT_RANK.get(s, 9))
    ok = ok.sort_values(["_rank", "mtime_ns", "file"], kind="stable")
    rows: list[dict] = []
    keepers = []
    first_by_sha: dict[str, int] = {}
    for idx, sha in zip(ok.index, ok["sha256"], strict=True):
        if sha in first_by_sha:
            twin = images.loc[first_by_sha[sha]]
            me = images.loc[idx]
            row = {"entity": "image", "file": me["file"], "split": me["split"], "sha256_short": sha[:12]}
            if twin["split"] != me["split"]:
                row.update(leak_of=twin["file"], leak_kind="identical copy", twin_split=twin["split"])
            else:
                row.update(dup_of=twin["file"])
            rows.append(row)
        else:
            first_by_sha[sha] = idx
            keepers.append(idx)
    if max_distance <= 0 or len(keepers) < 2:
        return rows
    kept = images.loc[keepers]
    hashes = np.array([int(h, 16) for h in kept["phash"]], dtype=np.uint64)
    tk = thumbs[kept.index.to_numpy()] if thumbs is not None else None

    def close(a: int, b: int) -> bool:
        return tk is None or _thumbs_close(tk[a], tk[b])

    # Identical perceptual hashes collapse to one search key (distance 0 to each other); inside
    # a key, members are clustered by thumbnail so unrelated flat images are not merged.
    uniq, inverse = np.unique(hashes, return_inverse=True)
    members = defaultdict(list)
    for pos, u in enumerate(inverse):
        members[int(u)].append(pos)
    # Star edges (member -> its cluster representative, representatives <-> representatives
    # across keys) keep the graph linear in size even when thousands of images share one hash.
    nbrs: dict[int, dict[int, int]] = defaultdict(dict)
    reps: dict[int, list[int]] = {}
    for key, group in members.items():
        reps[key] = []
        for b in group:
            r = next((r for r in reps[key] if close(r, b)), None)
            if r is None:
                reps[key].append(b)
            else:
                nbrs[b][r] = 0
                nbrs[r][b] = 0
    for ui, uj, d in near_pairs(uniq, max_distance):
        for a in reps[ui]:
            for b in reps[uj]:
                if close(a, b):
                    nbrs[a][b] = d
                    nbrs[b][a] = d
    if not nbrs:
        return rows
    # Union-find over the neighbour graph: one image per connected group is kept (the first
    # in split-age-path order, which is the order of `kept`).
    parent = list(range(len(kept)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, bs in nbrs.items():
        for b in bs:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    files = kept["file"].tolist()
    splits = kept["split"].tolist()
    for a in sorted(nbrs):
        if find(a) == a:
            continue  # the group's kept image
        earlier = [b for b in nbrs[a] if b < a]
        cands = earlier or list(nbrs[a])
        cross = [b for b in cands if splits[b] != splits[a]]
        twin = min(cross or cands)
        row = {"entity": "image", "file": files[a], "split": splits[a]}
        if splits[twin] != splits[a]:
            row.update(leak_of=files[twin], leak_kind=f"near duplicate (hash distance {nbrs[a][twin]})",
                       twin_split=splits[twin])
        else:
            row.update(near_dup_of=files[twin], distance=nbrs[a][twin])
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Dataset table
# --------------------------------------------------------------------------------------------

DATASET_COLUMNS = ["entity", "file", "split", "declared", "name", "instances", "max_class", "max_instances",
                   "imbalance", "images", "dup_of", "sha256_short", "near_dup_of", "distance", "leak_of",
                   "leak_kind", "twin_split", "has_image", "link_target"]


def class_counts(annotations: pd.DataFrame, num_classes: int) -> list[int]:
    """Instances per class id among parsed lines with a valid class id."""
    ok = annotations[annotations["parse_ok"]]["class_id"]
    ok = ok[(ok >= 0) & (ok < num_classes) & (ok == np.floor(ok))].astype(int)
    return np.bincount(ok.to_numpy(), minlength=num_classes)[:num_classes].tolist()


def dataset_frame(layout: Layout, inv: Inventory, images: pd.DataFrame, annotations: pd.DataFrame,
                  near_duplicate_distance: int, thumbs: np.ndarray | None = None) -> pd.DataFrame:
    """Dataset-level table: one row per class, split, duplicate image, orphan label, outside link."""
    rows: list[dict] = []
    yaml_rel = layout.rel(layout.yaml_path)
    counts = class_counts(annotations, len(layout.names))
    top = max(counts) if counts else 0
    top_name = layout.names[counts.index(top)] if counts else ""
    for name, c in zip(layout.names, counts, strict=True):
        ratio = (top / c if c else math.inf) if top else math.nan
        rows.append({"entity": "class", "file": yaml_rel, "name": name, "instances": c, "max_class": top_name,
                     "max_instances": top, "imbalance": ratio})
    for split in layout.splits:
        rel = ", ".join(layout.rel(d) for d in [*split.image_dirs, *split.image_lists])
        rows.append({"entity": "split", "file": rel, "split": split.name, "declared": split.declared,
                     "images": inv.split_images.get(split.name, 0)})
    rows += duplicate_rows(images, near_duplicate_distance, thumbs)
    for split, rel in inv.orphan_labels:
        rows.append({"entity": "label", "file": rel, "split": split, "has_image": False})
    for link in inv.outside_links:
        rows.append({"entity": "link", "file": link["file"], "split": link["split"], "link_target": link["target"]})
    df = pd.DataFrame(rows, columns=DATASET_COLUMNS)
    # Object dtype keeps None as "missing" for GE's null-skipping map expectations.
    for col in ("dup_of", "near_dup_of", "leak_of", "link_target", "has_image"):
        df[col] = df[col].astype(object).where(df[col].notna(), None)
    return df
