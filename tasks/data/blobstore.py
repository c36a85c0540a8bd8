"""A flat key -> bytes store over a local folder or an S3 prefix (the labelling inbox lives in one).

Both stores take the same relative keys (``20261204T113100Z-1a2b3c.png``), refuse keys that would
leave their root (``..``, absolute, backslash: ``damage.tasks.data.storage.safe_relpath``'s rule), and
make a write visible whole or not at all: the local store writes a temp file and renames it
(``damage.tasks.core.atomic``), an S3 ``PutObject`` is atomic by itself.

Example:
    >>> store = open_store("s3://claims/inbox", default_root=Path(".state/inbox"))
    >>> store.put("a.json", b"{}"); store.list()
    ['a.json']
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from damage.tasks.core.atomic import atomic_write_bytes
from damage.tasks.data.storage import parse_s3_uri, s3_client, safe_relpath


class BlobStore(Protocol):
    """What the inbox needs of a store."""

    uri: str

    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def list(self) -> list[str]: ...
    def delete(self, key: str) -> None: ...


def check_key(key: str) -> str:
    """``key`` as a clean relative POSIX path; raises DatasetError when it would escape the store."""
    return safe_relpath(key, "").as_posix()


class LocalStore:
    """Keys are files under ``root`` (dot-files, e.g. temp files of a write in flight, are not listed)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes) -> None:
        atomic_write_bytes(self.path(key), data)

    def get(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def list(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*")
                      if p.is_file() and not any(s.startswith(".") for s in p.relative_to(self.root).parts))

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)


class S3Store:
    """Keys are objects under ``s3://bucket/prefix/`` (endpoint and credentials: ``s3_client``'s rules)."""

    def __init__(self, uri: str, client: Any = None) -> None:
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.uri = uri
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:  # created on first use: constructing the store does no I/O
            self._client = s3_client()
        return self._client

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + check_key(key), Body=data)

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self.prefix + check_key(key))["Body"].read()

    def list(self) -> list[str]:
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
            keys.extend(o["Key"][len(self.prefix):] for o in page.get("Contents", []))
        return sorted(keys)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.prefix + check_key(key))


def open_store(location: str | Path | None, default_root: Path) -> LocalStore | S3Store:
    """The store at ``location`` (``s3://bucket/prefix`` or a folder); None = ``default_root``."""
    if location is None:
        return LocalStore(default_root)
    if str(location).startswith("s3://"):
        return S3Store(str(location))
    return LocalStore(location)
