"""One image through the predictor, as ``damage predict`` writes it: the one rule both the single-process loop
and the Ray Data workers (``damage.tasks.scale.batch``) call, so their per-image JSON cannot differ.

Sources are local paths or ``s3://bucket/key`` objects, read whole into memory (no local copy) after their
size is checked against ``MAX_IMAGE_BYTES``; the decoder then checks the header's pixel count before decoding.

Example:
    >>> doc, png = predict_source(pred, "s3://claims/2026/a.jpg", "models:/damage-seg@production", overlay=True)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from damage.tasks.core.errors import DamageError

# Bytes of one image file read into memory: far above a 100-megapixel JPEG (about 50 MB), far below what
# would exhaust a worker. Checked from the file's size (S3: ContentLength) before anything is read.
MAX_IMAGE_BYTES = 128 << 20


def is_s3(source: str) -> bool:
    return str(source).startswith("s3://")


def read_source(source: str, client: Any = None, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of a local image file or an ``s3://`` object, refused above ``max_bytes`` before reading.

    Args:
        source: a path, or ``s3://bucket/key``.
        client: a boto3 S3 client for ``s3://`` sources (None: ``s3_client()``, the project's endpoint rules).

    Raises:
        DamageError: missing, too large, or unreadable (names the source).
    """
    if is_s3(source):
        from damage.tasks.data.storage import parse_s3_uri, s3_client

        bucket, key = parse_s3_uri(source)
        try:
            obj = (client or s3_client()).get_object(Bucket=bucket, Key=key.rstrip("/"))
        except Exception as e:  # botocore ClientError (NoSuchKey, AccessDenied), endpoint errors
            raise DamageError(f"{source}: cannot read ({e})") from None
        size = int(obj.get("ContentLength") or 0)
        if size > max_bytes:
            obj["Body"].close()
            raise DamageError(f"{source}: {size} bytes, over the {max_bytes}-byte limit of one image")
        data = obj["Body"].read(max_bytes + 1)
    else:
        path = Path(source)
        try:
            size = os.stat(path).st_size
        except OSError as e:
            raise DamageError(f"{path}: image not found ({e.strerror})") from None
        if size > max_bytes:
            raise DamageError(f"{path}: {size} bytes, over the {max_bytes}-byte limit of one image")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while read
        raise DamageError(f"{source}: over the {max_bytes}-byte limit of one image")
    return data


def predict_source(pred: Any, source: str, model_label: str, overlay: bool, data: bytes | None = None,
                   client: Any = None) -> tuple[dict[str, Any], bytes | None]:
    """``damage predict``'s JSON document for one image, and its PNG overlay when asked.

    Args:
        pred: a ``Predictor``.
        source: the image's path or ``s3://`` URI (also the document's ``image``).
        model_label: the document's ``model`` (the name the user gave, not a worker's local copy).
        overlay: also return the overlay, PNG-encoded.
        data: the bytes, when the caller already read them (``read_source``).

    Raises:
        DamageError: unreadable, too large, or the overlay could not be encoded.
    """
    import cv2

    from damage.tasks.serving.predictor import decode_image

    data = read_source(source, client) if data is None else data
    im = decode_image(data, pred.max_pixels, str(source))
    res = pred.predict(im)[0]
    doc = res.to_dict(str(source), str(model_label), pred.conf_for(*im.shape[:2]), pred.iou)
    png = None
    if overlay:
        from damage.tasks.serving.draw import draw_prediction

        ok, buf = cv2.imencode(".png", draw_prediction(im, res))
        if not ok:
            raise DamageError(f"{source}: could not encode the overlay")
        png = buf.tobytes()
    return doc, png


def error_doc(source: str, model_label: str, error: str) -> dict[str, Any]:
    """The JSON document written for an image that failed."""
    return {"image": str(source), "model": str(model_label), "error": str(error)}


def list_sources(source: str, exts: Sequence[str]) -> list[str]:
    """The images ``damage predict`` reads from ``source``: one image file, the image files directly in a
    folder, or every image object under an ``s3://bucket/prefix`` (listed, never downloaded); sorted.

    Raises:
        DamageError: a missing path, or an S3 prefix that cannot be listed.
    """
    if not is_s3(source):
        p = Path(source)
        if p.is_file():
            return [str(p)]
        if not p.is_dir():
            raise DamageError(f"{p}: no such file or folder")
        return sorted(str(f) for f in p.iterdir() if f.is_file() and f.suffix.lower() in exts)
    from damage.tasks.data.blobstore import S3Store

    try:
        store = S3Store(source)
        keys = store.list()
    except DamageError:
        raise
    except Exception as e:  # botocore: NoSuchBucket, AccessDenied, endpoint unreachable
        raise DamageError(f"{source}: cannot list ({e})") from None
    base = f"s3://{store.bucket}/{store.prefix}"
    return sorted(base + k for k in keys if not k.endswith("/") and os.path.splitext(k)[1].lower() in exts)
