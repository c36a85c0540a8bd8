"""Label-issue rows a person can act on: geometry in image pixels, the CSV, the overlay grid, the summary.

Every row carries the annotation's box and polygon (``ann_box``, ``ann_polygon``) and, where a
prediction is the evidence (always for a missing label; the other-class prediction of a wrong
class, the same-class prediction of a bad outline), its box and polygon (``pred_box``,
``pred_polygon``): JSON lists in the original image's pixels (box ``[x1, y1, x2, y2]``, polygon
``[[x, y], ...]``), an empty string where not applicable. A labelling tool (Label Studio export)
reads them back as the label and the model's suggestion.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from damage.tasks.core.atomic import atomic_write, atomic_write_text

CSV_COLUMNS = ("rank", "image", "split", "annotation", "kind", "score", "label_class", "pred_class", "conf",
               "iou", "in_sample", "fold", "evidence", "ann_box", "ann_polygon", "pred_box", "pred_polygon")
GEOMETRY_COLUMNS = ("ann_box", "ann_polygon", "pred_box", "pred_polygon")
GRID_COLUMNS = 6
TILE = 192
DEFAULT_MAX_PIXELS = 100_000_000


# ----------------------------------------------------------------------------- geometry


class Frame:
    """Letterbox (the model's input) <-> original image pixels for one dataset item."""

    def __init__(self, item: dict[str, Any]):
        h0, w0 = item["ori_shape"]
        h, w = item["img"].shape[1:]
        self.hw = (int(h0), int(w0))
        self.gain = min(h / h0, w / w0)
        pad = (item.get("ratio_pad") or (None, None))[1]
        self.pad = tuple(pad) if pad is not None else ((w - w0 * self.gain) / 2, (h - h0 * self.gain) / 2)

    def to_image(self, xy: np.ndarray) -> np.ndarray:
        """(..., 2) letterbox pixels -> original pixels, clipped to the image."""
        out = (np.asarray(xy, float) - self.pad) / self.gain
        return np.clip(out, 0, (self.hw[1], self.hw[0]))


def rel_path(path: str | Path, root: Path) -> str:
    """An image path as rows name it: relative to the dataset root (as given when outside it)."""
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return str(path)


def box_of(poly: np.ndarray) -> list[float]:
    """[x1, y1, x2, y2] around a polygon, rounded to 0.1 px."""
    p = np.asarray(poly, float).reshape(-1, 2)
    return [round(float(v), 1) for v in (*p.min(0), *p.max(0))]


def poly_list(poly: np.ndarray) -> list[list[float]]:
    return np.round(np.asarray(poly, float).reshape(-1, 2), 1).tolist()


def mask_polygon(prob: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray | None:
    """Outer contour (largest region) of a soft mask resized to ``out_hw`` and cut at 0.5; None if empty."""
    import cv2

    m = np.asarray(prob, np.float32)
    if m.shape != tuple(out_hw):
        m = cv2.resize(m, (out_hw[1], out_hw[0]), interpolation=cv2.INTER_LINEAR)
    contours, _ = cv2.findContours((m > 0.5).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    c = max(contours, key=cv2.contourArea).reshape(-1, 2).astype(float)
    return c if len(c) >= 3 else None


def pred_geometry(prob: np.ndarray, box: np.ndarray | None, frame: Frame, label_hw: tuple[int, int]) -> dict[str, Any]:
    """``pred_box`` / ``pred_polygon`` in image pixels from a prediction's mask (and box, letterbox pixels)."""
    poly = mask_polygon(prob, label_hw)
    if poly is None and box is None:
        return {"pred_box": "", "pred_polygon": ""}
    if poly is None:
        x1, y1, x2, y2 = np.asarray(box, float)
        poly = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]])
    poly = frame.to_image(poly)
    pbox = box_of(frame.to_image(np.asarray(box, float).reshape(2, 2))) if box is not None else box_of(poly)
    return {"pred_box": pbox, "pred_polygon": poly_list(poly)}


# ----------------------------------------------------------------------------- CSV


def _cell(v: Any) -> Any:
    return json.dumps(v, separators=(",", ":")) if isinstance(v, (list, tuple)) else v


def write_issues_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Ranked rows as CSV (``CSV_COLUMNS``; geometry as JSON lists), atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({**{k: _cell(r.get(k, "")) for k in GEOMETRY_COLUMNS}, **{k: r[k] for k in CSV_COLUMNS
                                                                           if k in r and k not in GEOMETRY_COLUMNS},
                    "score": f"{r['score']:.6f}", "conf": f"{r['conf']:.4f}", "iou": f"{r['iou']:.4f}"})
    return atomic_write_text(path, buf.getvalue())


def read_geometry(row: dict[str, Any], key: str) -> list | None:
    """A geometry cell of a CSV or in-memory row as a list (None when empty)."""
    v = row.get(key, "")
    if isinstance(v, str):
        return json.loads(v) if v else None
    return v or None


# ----------------------------------------------------------------------------- overlay grid


def _tile(img: np.ndarray, row: dict[str, Any]) -> np.ndarray:
    """Crop around the label and the prediction (3x their extent, square), draw both, resize to TILE."""
    import cv2

    polys = [(read_geometry(row, "ann_polygon"), (0, 0, 230)), (read_geometry(row, "pred_polygon"), (0, 200, 0))]
    pts = np.concatenate([np.asarray(p, float) for p, _ in polys if p] or [np.zeros((1, 2))])
    h, w = img.shape[:2]
    (x1, y1), (x2, y2) = pts.min(0), pts.max(0)
    side = float(np.clip(3 * max(x2 - x1, y2 - y1, 8), 32, max(h, w)))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    x0, y0 = int(np.clip(cx - side / 2, 0, max(w - side, 0))), int(np.clip(cy - side / 2, 0, max(h - side, 0)))
    crop = np.ascontiguousarray(img[y0:y0 + int(side), x0:x0 + int(side)])
    scale = TILE / max(crop.shape[:2])
    tile = cv2.resize(crop, (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale))),
                      interpolation=cv2.INTER_LINEAR)
    for p, colour in polys:
        if p:
            q = np.round((np.asarray(p, float) - (x0, y0)) * scale).astype(np.int32)
            cv2.polylines(tile, [q], True, colour, 1, cv2.LINE_AA)
    out = np.full((TILE, TILE, 3), 255, np.uint8)
    out[:tile.shape[0], :tile.shape[1]] = tile
    return out


def write_overlay_grid(rows: Sequence[dict[str, Any]], root: Path, path: Path,
                       max_pixels: int = DEFAULT_MAX_PIXELS) -> Path | None:
    """The rows as tiles (label outline red, the prediction it cites green), rank / kind / score on top.
    Images are read from ``root`` (the dataset root), each size-checked before decoding."""
    import cv2

    from damage.tasks.core.images import check_image_file

    tiles = []
    for row in rows:
        p = Path(row["image"])
        p = p if p.is_absolute() else Path(root) / p
        check_image_file(p, max_pixels)
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is None:
            continue
        band = np.full((34, TILE, 3), 255, np.uint8)
        cv2.putText(band, f"#{row['rank']} {row['kind']} {row['score']:.2f}", (3, 13), cv2.FONT_HERSHEY_SIMPLEX,
                    0.38, (0, 0, 0), 1, cv2.LINE_AA)
        who = row["label_class"] or "-"
        cv2.putText(band, f"{p.name[:18]} a{row['annotation']} {who}>{row['pred_class'] or '-'}"[:34], (3, 28),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.33, (80, 80, 80), 1, cv2.LINE_AA)
        tiles.append(np.vstack([band, _tile(img, row)]))
    if not tiles:
        return None
    while len(tiles) % GRID_COLUMNS:
        tiles.append(np.full_like(tiles[0], 255))
    grid = np.vstack([np.hstack(tiles[i:i + GRID_COLUMNS]) for i in range(0, len(tiles), GRID_COLUMNS)])

    def write(tmp: str) -> None:
        if not cv2.imwrite(tmp, grid):
            raise OSError(f"{path}: cannot write the PNG")

    return atomic_write(path, write, suffix=".png")


__all__ = ["CSV_COLUMNS", "GEOMETRY_COLUMNS", "Frame", "box_of", "mask_polygon", "poly_list", "pred_geometry",
           "read_geometry", "rel_path", "write_issues_csv", "write_overlay_grid"]
