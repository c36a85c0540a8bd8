"""Overlay of a prediction on its image: masks, boxes, labels, scores, damage percentages (OpenCV only)."""

from __future__ import annotations

import cv2
import numpy as np

# BGR colours per class name; vehicles stay light so damage colours stand out on them.
_PALETTE = {
    "vehicle": (200, 160, 40),
    "dent": (40, 40, 230),
    "scratch": (0, 200, 255),
    "crack": (220, 0, 200),
    "glass_shatter": (255, 255, 0),
    "lamp_broken": (0, 140, 255),
    "tire_flat": (60, 220, 60),
}


def _colour(name: str) -> tuple[int, int, int]:
    if name in _PALETTE:
        return _PALETTE[name]
    h = sum(name.encode()) * 2654435761 % 2**24
    return (h & 255, (h >> 8) & 255, (h >> 16) & 255)


def _label(img: np.ndarray, text: str, x: int, y: int, colour: tuple[int, int, int], scale: float) -> None:
    th = max(1, round(scale * 2))
    (tw, tht), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, th)
    x = int(min(max(x, 0), max(img.shape[1] - tw - 2, 0)))
    y = int(min(max(y, tht + base + 1), img.shape[0] - 1))
    cv2.rectangle(img, (x, y - tht - base - 1), (x + tw + 2, y), colour, -1)
    cv2.putText(img, text, (x + 1, y - base), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), th, cv2.LINE_AA)


def draw_prediction(image: np.ndarray, pred, alpha: float = 0.45) -> np.ndarray:
    """A copy of ``image`` (BGR) with ``pred`` (``damage.tasks.serving.predictor.Prediction``) drawn on it.

    Damage masks are drawn over vehicle masks; each vehicle's box carries its damage
    percentage, the top-left corner the image-level one (or the note when it is undefined).
    """
    out = image.copy()
    h, w = out.shape[:2]
    scale = max(0.3, min(h, w) / 900)
    order = sorted(pred.instances, key=lambda i: i.name != "vehicle")  # vehicles first, damage on top
    overlay = out.copy()
    for inst in order:
        m = inst.mask
        if hasattr(m, "crop"):  # BoxMask: paint its box only, no full-frame mask
            x0, y0, x1, y1 = m.extent
            overlay[y0:y1, x0:x1][m.crop] = _colour(inst.name)
        else:
            overlay[m] = _colour(inst.name)
    cv2.addWeighted(overlay, alpha, out, 1 - alpha, 0, dst=out)
    per_vehicle = {v["id"]: v["damage_percent"] for v in pred.damage.vehicles}
    for inst in order:
        c = _colour(inst.name)
        if len(inst.polygon) >= 3:
            cv2.polylines(out, [np.asarray(inst.polygon, np.int32).reshape(-1, 1, 2)], True, c, 1, cv2.LINE_AA)
        x1, y1, x2, y2 = (int(round(v)) for v in inst.box)
        cv2.rectangle(out, (x1, y1), (x2, y2), c, 1)
        text = f"{inst.name} {inst.score:.2f}"
        if inst.id in per_vehicle:
            text += f" dmg {per_vehicle[inst.id]:.1f}%"
        _label(out, text, x1, y1, c, scale)
    dp = pred.damage.damage_percent
    head = f"damage {dp:.1f}%" if dp is not None else (pred.damage.note or "no vehicle")
    _label(out, head, 0, int(20 * scale * 2) + 4, (40, 40, 40), scale)
    return out
