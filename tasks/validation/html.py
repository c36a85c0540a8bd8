"""A one-page, self-contained HTML summary of a data-gate report.

Everything is inline (CSS, thumbnails as base64 JPEG data URIs), no script, no CDN, so it looks
the same offline, attached to an MLflow run or mailed around. It shows counts per code, the
worst files, images per split, instances per class and thumbnails of flagged images.
"""

from __future__ import annotations

import base64
import html
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pandas as pd

from damage.tasks.core.atomic import atomic_write_text
from damage.tasks.core.errors import DamageError
from damage.tasks.core.images import DEFAULT_MAX_PIXELS, check_image_bytes
from damage.tasks.validation.scan import Layout, read_bytes

MAX_THUMBS = 24
THUMB_SIDE = 160
WORST_FILES = 25

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem;color:#222;background:#fafafa}
h1{font-size:1.5rem;margin:0 0 .3rem} h2{font-size:1.15rem;margin:1.8rem 0 .5rem}
.verdict{display:inline-block;padding:.25rem .8rem;border-radius:4px;color:#fff;font-weight:600}
.pass{background:#2e7d32}.fail{background:#c62828}
table{border-collapse:collapse;background:#fff;font-size:.9rem}
th,td{border:1px solid #ddd;padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:#f0f0f0} td.n{text-align:right;font-variant-numeric:tabular-nums}
.error{color:#c62828;font-weight:600}.warning{color:#a66300;font-weight:600}
.meta{color:#555;font-size:.85rem} code{font-size:.85rem}
.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:172px;background:#fff;border:1px solid #ddd;padding:6px;font-size:.75rem}
figure img{display:block;max-width:160px;max-height:160px;margin:auto}
.noimg{width:160px;height:100px;display:flex;align-items:center;justify-content:center;background:#eee;color:#777}
figcaption{word-break:break-all;margin-top:4px}
"""


def _thumb(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """A small JPEG data URI of an image, or None if it does not decode or declares more than
    ``max_pixels`` pixels (checked from the header: the report never decodes what the scan refused)."""
    import cv2
    import numpy as np

    try:
        data = read_bytes(path)
        check_image_bytes(data[: 1 << 20], max_pixels, path)
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_COLOR_2)
    except (OSError, cv2.error, DamageError):
        return None
    if img is None or img.size == 0:
        return None
    s = THUMB_SIDE / max(img.shape[:2])
    if s < 1:
        img = cv2.resize(img, (max(1, round(img.shape[1] * s)), max(1, round(img.shape[0] * s))),
                         interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode() if ok else None


def _e(x: Any) -> str:
    return html.escape(str(x))


def render_summary(report: dict[str, Any], layout: Layout, images: pd.DataFrame, dataset: pd.DataFrame,
                   docs_link: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    """The summary page as one HTML string."""
    s = report["summary"]
    findings = report["findings"]
    sev_of = {f["code"]: f["severity"] for f in findings}
    out = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
           f"<title>Data gate: {_e(Path(report['dataset']).name)}</title><style>{_CSS}</style></head><body>"]
    verdict = ("<span class='verdict pass'>PASSED</span>" if report["passed"]
               else "<span class='verdict fail'>FAILED</span>")
    out.append(f"<h1>Data gate {verdict}</h1>")
    out.append(f"<p class='meta'>Dataset <code>{_e(report['dataset'])}</code> &middot; fingerprint "
               f"<code>{_e(report['fingerprint'])}</code> &middot; {s['images']} images &middot; "
               f"{s['annotations']} annotations &middot; <span class='error'>{s['errors']} errors</span> &middot; "
               f"<span class='warning'>{s['warnings']} warnings</span></p>")
    if docs_link:
        out.append(f"<p class='meta'>Great Expectations Data Docs: <a href='{_e(docs_link)}'>{_e(docs_link)}</a></p>")

    out.append("<h2>Findings per code</h2>")
    if s["by_code"]:
        out.append("<table><tr><th>code</th><th>severity</th><th>count</th><th>example</th></tr>")
        example = {}
        for f in findings:
            example.setdefault(f["code"], f)
        for code, n in sorted(s["by_code"].items(), key=lambda kv: (sev_of[kv[0]] != "error", -kv[1])):
            ex = example[code]
            out.append(f"<tr><td><code>{_e(code)}</code></td><td class='{sev_of[code]}'>{sev_of[code]}</td>"
                       f"<td class='n'>{n}</td><td><code>{_e(ex['file'])}</code>: {_e(ex['detail'])}</td></tr>")
        out.append("</table>")
    else:
        out.append("<p>No findings.</p>")

    per_file: dict[str, Counter] = defaultdict(Counter)
    for f in findings:
        per_file[f["file"]][f["severity"]] += 1
    worst = sorted(per_file, key=lambda k: (-per_file[k]["error"], -per_file[k]["warning"], k))[:WORST_FILES]
    if worst:
        codes_of: dict[str, list[str]] = defaultdict(list)
        for f in findings:
            if f["code"] not in codes_of[f["file"]]:
                codes_of[f["file"]].append(f["code"])
        out.append(f"<h2>Worst files (top {len(worst)})</h2><table><tr><th>file</th><th>errors</th>"
                   "<th>warnings</th><th>codes</th></tr>")
        for k in worst:
            out.append(f"<tr><td><code>{_e(k)}</code></td><td class='n'>{per_file[k]['error']}</td>"
                       f"<td class='n'>{per_file[k]['warning']}</td><td>{_e(', '.join(codes_of[k]))}</td></tr>")
        out.append("</table>")

    if "drift" in report:
        out += _drift_section(report["drift"])

    out.append("<h2>Dataset</h2><table><tr><th>split</th><th>images</th></tr>")
    for _, r in dataset[dataset["entity"] == "split"].iterrows():
        out.append(f"<tr><td>{_e(r['split'])}</td><td class='n'>{int(r['images'])}</td></tr>")
    out.append("</table><br><table><tr><th>class</th><th>instances</th></tr>")
    for _, r in dataset[dataset["entity"] == "class"].iterrows():
        out.append(f"<tr><td>{_e(r['name'])}</td><td class='n'>{int(r['instances'])}</td></tr>")
    out.append("</table>")

    flagged = [f for f in findings if f["file"] in set(images["file"])]
    shown: list[str] = []
    for f in flagged:
        if f["file"] not in shown:
            shown.append(f["file"])
    shown = shown[:MAX_THUMBS]
    if shown:
        out.append(f"<h2>Flagged images ({len(shown)} shown)</h2><div class='grid'>")
        codes_of = defaultdict(list)
        for f in flagged:
            codes_of[f["file"]].append(f"{f['code']}: {f['detail']}")
        for rel in shown:
            uri = _thumb(os.path.join(layout.root, rel), max_pixels)
            pic = (f"<img src='{uri}' alt='{_e(rel)}'>" if uri else "<div class='noimg'>does not decode</div>")
            out.append(f"<figure>{pic}<figcaption><code>{_e(rel)}</code><br>"
                       f"{'<br>'.join(_e(c) for c in codes_of[rel])}</figcaption></figure>")
        out.append("</div>")
    out.append("</body></html>\n")
    return "\n".join(out)


def _num(v: Any, fmt: str = ".3f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else ""


def _drift_section(drift: dict[str, Any]) -> list[str]:
    """The drift table: class shares and numeric columns against the reference profile."""
    ref = drift["reference"]
    out = [f"<h2>Drift against the reference</h2><p class='meta'>Reference <code>{_e(ref.get('dataset'))}</code> "
           f"(fingerprint <code>{_e(ref.get('fingerprint'))}</code>, from {_e(ref.get('source') or '?')}): "
           f"{_e(ref.get('images'))} images, {_e(ref.get('annotations'))} annotations</p>",
           "<table><tr><th>class</th><th>reference share</th><th>tonight</th><th>change</th><th>limit</th></tr>"]
    for r in drift["table"]:
        if r["entity"] != "class":
            continue
        change = r.get("share_change")
        bad = (change is not None and abs(change) > r["share_limit"]) or not r["in_reference"] or not r["in_current"]
        note = "" if r["in_reference"] and r["in_current"] else (" (added)" if not r["in_reference"] else " (removed)")
        out.append(f"<tr><td class='{'warning' if bad else ''}'>{_e(r['name'])}{note}</td>"
                   f"<td class='n'>{_num(r.get('ref_share'))}</td><td class='n'>{_num(r.get('cur_share'))}</td>"
                   f"<td class='n'>{_num(change, '+.3f')}</td><td class='n'>{_num(r.get('share_limit'))}</td></tr>")
    out.append("</table><br><table><tr><th>column</th><th>KS</th><th>limit</th><th>PSI</th>"
               "<th>median (reference &rarr; tonight)</th><th>n</th></tr>")
    for r in drift["table"]:
        if r["entity"] != "column":
            continue
        cls = "warning" if r["ks"] > r["ks_limit"] else ""
        out.append(f"<tr><td class='{cls}'>{_e(r['column'])}</td><td class='n'>{_num(r['ks'])}</td>"
                   f"<td class='n'>{_num(r['ks_limit'])}</td><td class='n'>{_num(r.get('psi'))}</td>"
                   f"<td class='n'>{_num(r['ref_median'], '.4g')} &rarr; {_num(r['cur_median'], '.4g')}</td>"
                   f"<td class='n'>{r['ref_n']} / {r['cur_n']}</td></tr>")
    out.append("</table>")
    return out


def write_summary_page(html_dir: Path, report: dict[str, Any], layout: Layout, images: pd.DataFrame,
                       dataset: pd.DataFrame, docs_index: Path | None = None,
                       max_pixels: int = DEFAULT_MAX_PIXELS) -> Path:
    """Write ``<html_dir>/index.html`` atomically and return its path."""
    html_dir.mkdir(parents=True, exist_ok=True)
    link = os.path.relpath(docs_index, html_dir) if docs_index else None
    page = render_summary(report, layout, images, dataset, link, max_pixels)
    return atomic_write_text(html_dir / "index.html", page)
