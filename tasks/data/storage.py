"""S3 (and S3-compatible: MinIO, moto) datasets synced into a local cache with boto3.

``sync_s3_dataset("s3://bucket/prefix", cache)`` mirrors every object under the prefix into
``cache/<bucket>/<prefix>/`` and returns that folder. It is incremental and safe:

* only objects whose ETag or size changed since the last sync are downloaded (a JSON manifest,
  ``.s3-manifest.json``, records ETag, size and the SHA-256 of every local file);
* every download is checked: MD5 == ETag for single-part uploads, the object's SHA-256
  checksum when S3 has one, and the byte count always; a mismatch is retried, then an error;
* a download goes to a temp file in the target folder and is ``os.replace``'d into place, so a
  partial file never becomes visible under its real name;
* keys that would land outside the cache folder (``..``, absolute paths) are refused before
  anything is downloaded;
* transient errors are retried: botocore's own retries (``standard`` mode) for API calls, and
  our backoff around each whole download (a dropped stream mid-body is not retried by botocore).

Objects deleted from the bucket are deleted from the cache, so the local folder is a mirror and
its fingerprint is the bucket's content. The endpoint comes from ``endpoint_url`` or, in this
order, ``$AWS_ENDPOINT_URL_S3``, ``$AWS_ENDPOINT_URL``, ``$MLFLOW_S3_ENDPOINT_URL`` (one MinIO
serves both datasets and MLflow artifacts); credentials from the usual AWS chain.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import posixpath
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from damage.tasks.core.atomic import atomic_write, atomic_write_json
from damage.tasks.core.errors import DatasetError

log = logging.getLogger(__name__)

MANIFEST = ".s3-manifest.json"
ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
_CHUNK = 1 << 20
_PART = ".part-"
_TMP = f"{_PART}tmp"  # temp-file suffix: a killed sync's leftovers are found and skipped by _PART


@dataclass
class SyncStats:
    """What one sync did (also logged)."""

    listed: int = 0
    downloaded: int = 0
    unchanged: int = 0
    deleted: int = 0
    bytes: int = 0


class ChecksumMismatch(Exception):
    """A downloaded body does not match its ETag / checksum / length (retried)."""


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b/")``; the prefix ends with ``/`` unless empty.

    A trailing slash is added so that ``s3://b/data`` does not also match ``s3://b/data2/...``.

    Raises:
        DatasetError: not an ``s3://bucket[/prefix]`` URI.
    """
    if not uri.startswith("s3://"):
        raise DatasetError(f"{uri}: not an s3:// URI")
    bucket, _, prefix = uri[5:].partition("/")
    if not bucket or "/" in bucket:
        raise DatasetError(f"{uri}: no bucket name (expected s3://bucket/prefix)")
    prefix = prefix.strip("/")
    # The prefix names the cache folder too: '.', '..' or empty segments would move the mirror
    # outside ``cache_root`` (s3://b/../../x) or merge two different S3 prefixes into one folder.
    bad = [seg for seg in prefix.split("/") if seg in ("", ".", "..")] if prefix else []
    if bad or "\\" in prefix or "\0" in prefix:
        raise DatasetError(f"{uri}: prefix segment {bad[0] if bad else prefix!r} is refused ('.', '..', empty "
                           f"segments, backslash and NUL are not allowed in a dataset URI)")
    return bucket, (prefix + "/") if prefix else ""


def endpoint_from_env() -> str | None:
    """The S3 endpoint named by the environment (MinIO, moto); None = AWS."""
    for k in ENDPOINT_ENV:
        if os.environ.get(k):
            return os.environ[k]
    return None


def s3_client(endpoint_url: str | None = None, max_attempts: int = 5, connect_timeout: float = 10,
              read_timeout: float = 60) -> Any:
    """A boto3 S3 client with botocore's ``standard`` retry mode (backoff on throttling and 5xx).

    Args:
        endpoint_url: S3-compatible endpoint; None = from the environment (see ``endpoint_from_env``).
        max_attempts: total attempts per API call, botocore side.
        connect_timeout: seconds to connect.
        read_timeout: seconds to wait for data on an open connection.
    """
    import boto3
    from botocore.config import Config as BotoConfig

    cfg = BotoConfig(retries={"max_attempts": max_attempts, "mode": "standard"},
                     connect_timeout=connect_timeout, read_timeout=read_timeout,
                     # path-style works with MinIO/moto on any host name; AWS accepts it too
                     s3={"addressing_style": "path"})
    return boto3.client("s3", endpoint_url=endpoint_url or endpoint_from_env(), config=cfg)


def safe_relpath(key: str, prefix: str) -> PurePosixPath:
    """The local relative path of ``key`` under ``prefix``, refusing anything that escapes.

    Raises:
        DatasetError: absolute key, ``..`` component, backslash or NUL, or an empty name.
    """
    rel = key[len(prefix):]
    if "\\" in rel or "\0" in rel:
        raise DatasetError(f"s3 key '{key}': backslash or NUL in the name is refused")
    if rel.startswith("/") or re.match(r"^[A-Za-z]:", rel):
        raise DatasetError(f"s3 key '{key}': absolute path is refused (it would escape the cache dir)")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts:
        raise DatasetError(f"s3 key '{key}': empty name under the prefix")
    if ".." in parts:
        raise DatasetError(f"s3 key '{key}': '..' is refused (it would escape the cache dir)")
    if parts[-1] == MANIFEST or parts[-1].startswith(".") and _PART in parts[-1]:
        raise DatasetError(f"s3 key '{key}': name is reserved by the cache")
    return PurePosixPath(posixpath.join(*parts))


def local_dir(cache_root: Path, bucket: str, prefix: str) -> Path:
    """Where ``s3://bucket/prefix`` is mirrored: ``cache_root/bucket/prefix``."""
    root = Path(cache_root) / bucket
    return root / prefix.strip("/") if prefix else root


def _load_manifest(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
        return data.get("objects", {}) if isinstance(data, dict) else {}
    except (FileNotFoundError, ValueError):  # missing or corrupt: re-verify everything
        return {}


def _list_objects(client: Any, bucket: str, prefix: str, page_size: int = 1000) -> Iterator[dict[str, Any]]:
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/"):  # "folder" marker objects carry no data
                yield obj


def _etag(raw: str | None) -> str:
    return (raw or "").strip('"')


def _local_ok(path: Path, entry: dict[str, Any] | None, etag: str, size: int) -> bool:
    """The cached file is the listed object (same ETag and size, untouched since we wrote it)."""
    if not entry or entry.get("etag") != etag or entry.get("size") != size:
        return False
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    if st.st_size != size:
        return False
    if st.st_mtime_ns == entry.get("mtime_ns"):
        return True
    from damage.tasks.data.fingerprint import file_sha256

    return file_sha256(path) == entry.get("sha256")  # touched locally: trust only the content


def _download(client: Any, bucket: str, key: str, dest: Path, etag: str, size: int) -> dict[str, Any]:
    """Stream one object to a temp file beside ``dest``, verify it, then rename it into place."""
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()

    def fetch(tmp: str) -> None:
        n = 0
        # IfMatch: the bytes must be the version that was listed (a concurrent overwrite -> 412)
        extra = {"IfMatch": f'"{etag}"'} if etag else {}
        resp = client.get_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED", **extra)
        with open(tmp, "wb") as f:
            for chunk in resp["Body"].iter_chunks(_CHUNK):
                f.write(chunk)
                md5.update(chunk)
                sha.update(chunk)
                n += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        if n != size:
            raise ChecksumMismatch(f"got {n} bytes, listing says {size}")
        # Single-part uploads (without SSE-KMS) have ETag == MD5 of the body; multipart ETags
        # ("<md5>-<parts>") do not, so those rely on the S3 checksum and the length.
        if _MD5_ETAG.match(etag) and md5.hexdigest() != etag:
            raise ChecksumMismatch(f"MD5 {md5.hexdigest()} != ETag {etag}")
        want = resp.get("ChecksumSHA256")
        if want and "-" not in want and base64.b64encode(sha.digest()).decode() != want:
            raise ChecksumMismatch("SHA-256 differs from the object's checksum")

    atomic_write(dest, fetch, suffix=_TMP)
    return {"etag": etag, "size": size, "sha256": sha.hexdigest(), "mtime_ns": dest.stat().st_mtime_ns}


def _transient(e: BaseException) -> bool:
    """Errors worth another try: network trouble, throttling, 5xx, a body that failed its check."""
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(e, (ChecksumMismatch, ConnectionError, TimeoutError)):
        return True
    if isinstance(e, ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        # 412: the object changed between listing and download; the next sync picks it up
        return status >= 500 or code in {"SlowDown", "Throttling", "RequestTimeout", "InternalError"}
    return isinstance(e, BotoCoreError)  # connection closed, read timeout, incomplete read ...


def with_retries(fn: Callable[[], Any], what: str, attempts: int = 4, backoff_s: float = 1.0,
                 sleep: Callable[[float], None] = time.sleep) -> Any:
    """Call ``fn``; on a transient error wait ``backoff_s * 2**i`` and try again.

    Raises:
        DatasetError: the last error once ``attempts`` are used up, or at once for a permanent one
            (access denied, no such bucket).
    """
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:
            if not _transient(e):
                hint = " (the object changed during the sync: run it again)" if "PreconditionFailed" in str(e) else ""
                raise DatasetError(f"{what}: {type(e).__name__}: {e}{hint}") from e
            if i == attempts - 1:
                raise DatasetError(f"{what}: failed after {attempts} attempts: {type(e).__name__}: {e}") from e
            delay = backoff_s * 2**i
            log.warning("%s: %s (%s); retrying in %.1f s", what, type(e).__name__, e, delay)
            sleep(delay)
    raise AssertionError("unreachable")


def sync_s3_dataset(uri: str, cache_root: Path, endpoint_url: str | None = None, *, client: Any = None,
                    attempts: int = 4, backoff_s: float = 1.0, max_workers: int = 8, page_size: int = 1000,
                    stats: SyncStats | None = None) -> Path:
    """Mirror ``s3://bucket/prefix`` into ``cache_root/bucket/prefix`` and return that folder.

    Args:
        uri: ``s3://bucket/prefix`` of a dataset (YOLO-seg folder or COCO JSON + images).
        cache_root: local cache root (the pipeline passes ``<state>/cache/s3``).
        endpoint_url: S3-compatible endpoint; None = from the environment.
        client: a boto3 S3 client to use (tests); None = ``s3_client(endpoint_url)``.
        attempts: tries per object (and for the listing) on transient errors.
        backoff_s: first retry delay; doubles each retry.
        max_workers: parallel downloads (datasets are many small files).
        page_size: keys per listing request (S3 returns at most 1000).
        stats: filled with what the sync did, when given.

    Returns:
        The local folder mirroring the prefix.

    Raises:
        DatasetError: bad URI, no objects under the prefix, a key escaping the cache, a
            permanent S3 error, or a download that kept failing its checksum.

    Example:
        >>> root = sync_s3_dataset("s3://datasets/cardd", Path(".state/cache/s3"))
        >>> (root / "data.yaml").is_file()
        True
    """
    bucket, prefix = parse_s3_uri(uri)
    client = client or s3_client(endpoint_url)
    stats = stats if stats is not None else SyncStats()
    objects = with_retries(lambda: list(_list_objects(client, bucket, prefix, page_size)), f"{uri}: listing",
                           attempts, backoff_s)
    if not objects:
        raise DatasetError(f"{uri}: no objects under this prefix")
    # Check every key before writing anything: one hostile key refuses the whole dataset.
    plan = [(safe_relpath(o["Key"], prefix), o) for o in objects]
    seen: dict[str, str] = {}
    for rel, o in plan:  # 'a//b.jpg', 'a/./b.jpg' and 'a/b.jpg' would all be one local file
        other = seen.setdefault(rel.as_posix(), o["Key"])
        if other != o["Key"]:
            raise DatasetError(f"{uri}: s3 keys '{other}' and '{o['Key']}' both map to the local file "
                               f"'{rel.as_posix()}'; rename one of them")
    cache = Path(cache_root).resolve()
    root = local_dir(cache, bucket, prefix).resolve()
    if not root.is_relative_to(cache) or root == cache:
        raise DatasetError(f"{uri}: sync folder {root} is not inside the cache {cache}")
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / MANIFEST
    old = _load_manifest(manifest_path)
    new: dict[str, dict[str, Any]] = {}
    stats.listed = len(plan)

    todo = []
    for rel, o in plan:
        dest = root / rel
        if not dest.resolve().is_relative_to(root):  # a symlinked folder inside the cache
            raise DatasetError(f"s3 key '{o['Key']}': resolves outside the cache dir {root}")
        etag, size = _etag(o.get("ETag")), int(o["Size"])
        if _local_ok(dest, old.get(rel.as_posix()), etag, size):
            new[rel.as_posix()] = old[rel.as_posix()]
            stats.unchanged += 1
        else:
            todo.append((rel, o["Key"], dest, etag, size))

    def fetch(item):
        rel, key, dest, etag, size = item
        entry = with_retries(lambda: _download(client, bucket, key, dest, etag, size),
                             f"s3://{bucket}/{key}", attempts, backoff_s)
        return rel.as_posix(), entry

    from damage.tasks.core.progress import track

    try:
        with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(todo) or 1))) as pool, \
                track("s3-sync", f"S3 sync: {len(todo)} files", len(todo), artifact_every=64) as bar:
            for rel, entry in pool.map(fetch, todo):
                new[rel] = entry
                stats.downloaded += 1
                stats.bytes += entry["size"]
                bar.advance()
    finally:
        # Record what is verified so far even on failure: the next sync resumes, not restarts.
        keep = {**{k: v for k, v in old.items() if (root / k).is_file()}, **new}
        atomic_write_json(manifest_path, {"uri": uri, "objects": keep}, indent=1, sort_keys=True, suffix=_TMP)

    listed = {rel.as_posix() for rel, _ in plan}
    for rel in set(old) - listed:  # deleted upstream: keep the cache a mirror
        (root / rel).unlink(missing_ok=True)
        stats.deleted += 1
    for part in root.rglob(f".*{_PART}*"):  # temp files of a killed earlier sync
        if part.name != MANIFEST:
            part.unlink(missing_ok=True)
    atomic_write_json(manifest_path, {"uri": uri, "objects": new}, indent=1, sort_keys=True, suffix=_TMP)
    log.info("%s -> %s: %d objects, %d downloaded (%d bytes), %d unchanged, %d deleted",
             uri, root, stats.listed, stats.downloaded, stats.bytes, stats.unchanged, stats.deleted)
    return root


def upload_dir(local: Path, uri: str, endpoint_url: str | None = None, *, client: Any = None) -> int:
    """Upload every file under ``local`` to ``s3://bucket/prefix`` (keys = relative paths).

    Used to publish a dataset (and by tests to seed a bucket). Returns the number of files.
    """
    bucket, prefix = parse_s3_uri(uri)
    client = client or s3_client(endpoint_url)
    n = 0
    for p in sorted(Path(local).rglob("*")):
        if p.is_file() and p.name != MANIFEST and _PART not in p.name:  # never publish cache bookkeeping
            client.upload_file(str(p), bucket, prefix + p.relative_to(local).as_posix())
            n += 1
    return n
