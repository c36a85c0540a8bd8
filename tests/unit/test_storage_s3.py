"""S3 dataset sync (tasks/data/storage.py) against moto's in-process S3 mock."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from damage.tasks.core.errors import DatasetError
from damage.tasks.data.storage import (
    MANIFEST,
    SyncStats,
    endpoint_from_env,
    parse_s3_uri,
    safe_relpath,
    sync_s3_dataset,
    upload_dir,
    with_retries,
)
from tests.helpers import S3_BUCKET

BUCKET = S3_BUCKET  # the bucket of the `s3` fixture (tests/conftest.py)


def _put(c, key: str, body: bytes) -> None:
    c.put_object(Bucket=BUCKET, Key=key, Body=body)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _seed(c, n: int = 5) -> dict[str, bytes]:
    objs = {"data.yaml": b"names: [a]\n"}
    objs.update({f"images/train/{i}.png": bytes([i]) * (100 + i) for i in range(n)})
    objs["labels/train/0.txt"] = b"0 0.1 0.1 0.5 0.5 0.2 0.9\n"
    for k, v in objs.items():
        _put(c, f"ds/v1/{k}", v)
    _put(c, "ds/v10/other.txt", b"must not be synced")  # shares the string prefix "ds/v1"
    return objs


def test_parse_uri():
    assert parse_s3_uri("s3://b/a/b/") == ("b", "a/b/")
    assert parse_s3_uri("s3://b") == ("b", "")
    with pytest.raises(DatasetError, match="no bucket"):
        parse_s3_uri("s3:///x")
    with pytest.raises(DatasetError, match="not an s3"):
        parse_s3_uri("/local/path")


@pytest.mark.parametrize("key", ["p/../x", "p/a/../../x", "p//etc/passwd", "p/..", "p/a\\..\\b", "p/C:/x"])
def test_escaping_keys_refused(key):
    with pytest.raises(DatasetError, match="refused"):
        safe_relpath(key, "p/")


def test_safe_relpath_normalises_harmless_parts():
    assert safe_relpath("p/a/./b.txt", "p/").as_posix() == "a/b.txt"


def test_sync_mirror_incremental(s3, tmp_path):
    objs = _seed(s3)
    stats = SyncStats()
    root = sync_s3_dataset("s3://datasets/ds/v1", tmp_path, client=s3, page_size=2, stats=stats)
    assert root == (tmp_path / BUCKET / "ds" / "v1").resolve()
    assert _files(root) == {**objs, MANIFEST: (root / MANIFEST).read_bytes()}
    assert (stats.listed, stats.downloaded, stats.unchanged) == (len(objs), len(objs), 0)  # all pages seen
    manifest = json.loads((root / MANIFEST).read_text())["objects"]
    assert manifest["data.yaml"]["sha256"] == hashlib.sha256(objs["data.yaml"]).hexdigest()

    again = SyncStats()
    sync_s3_dataset("s3://datasets/ds/v1/", tmp_path, client=s3, stats=again)
    assert (again.downloaded, again.unchanged) == (0, len(objs))

    _put(s3, "ds/v1/images/train/1.png", b"changed")
    s3.delete_object(Bucket=BUCKET, Key="ds/v1/images/train/2.png")
    third = SyncStats()
    sync_s3_dataset("s3://datasets/ds/v1", tmp_path, client=s3, stats=third)
    assert (third.downloaded, third.deleted) == (1, 1)
    assert (root / "images/train/1.png").read_bytes() == b"changed"
    assert not (root / "images/train/2.png").exists()


def test_locally_tampered_file_is_downloaded_again(s3, tmp_path):
    _seed(s3)
    root = sync_s3_dataset("s3://datasets/ds/v1", tmp_path, client=s3)
    f = root / "images/train/3.png"
    good = f.read_bytes()
    f.write_bytes(b"\0" * len(good))  # same size, other bytes: only the hash can tell
    stats = SyncStats()
    sync_s3_dataset("s3://datasets/ds/v1", tmp_path, client=s3, stats=stats)
    assert stats.downloaded == 1 and f.read_bytes() == good


def test_hostile_key_refuses_whole_sync(s3, tmp_path):
    _seed(s3)
    _put(s3, "ds/v1/../../escape.txt", b"x")
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match=r"'\.\.' is refused"):
        sync_s3_dataset("s3://datasets/ds/v1", cache, client=s3)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # nothing written anywhere


def test_empty_prefix_is_an_error(s3, tmp_path):
    with pytest.raises(DatasetError, match="no objects under this prefix"):
        sync_s3_dataset("s3://datasets/nothing", tmp_path, client=s3)


class _Corrupting:
    """Wraps a client; ``get_object`` returns a wrong body for the first ``bad`` calls."""

    def __init__(self, client, bad: int, mode: str = "flip"):
        self._c, self.bad, self.mode, self.calls = client, bad, mode, 0

    def __getattr__(self, name):
        return getattr(self._c, name)

    def get_object(self, **kw):
        resp = self._c.get_object(**kw)
        self.calls += 1
        if self.calls > self.bad:
            return resp
        body = resp["Body"].read()
        mode = self.mode

        class Body:
            def iter_chunks(self, n):
                if mode == "drop":  # connection dies after half of the body
                    yield body[: len(body) // 2]
                    raise ConnectionError("connection reset by peer")
                yield bytes([body[0] ^ 0xFF]) + body[1:]  # same length, wrong bytes

        return {**resp, "Body": Body(), "ChecksumSHA256": None}


@pytest.mark.parametrize("mode", ["flip", "drop"])
def test_bad_download_is_retried(s3, tmp_path, mode):
    _put(s3, "ds/one/data.yaml", b"names: [a]\n" * 50)
    flaky = _Corrupting(s3, bad=2, mode=mode)
    root = sync_s3_dataset("s3://datasets/ds/one", tmp_path, client=flaky, backoff_s=0.001)
    assert flaky.calls == 3
    assert (root / "data.yaml").read_bytes() == b"names: [a]\n" * 50


@pytest.mark.parametrize("mode", ["flip", "drop"])
def test_partial_or_corrupt_download_never_visible(s3, tmp_path, mode):
    _put(s3, "ds/one/data.yaml", b"names: [a]\n" * 50)
    flaky = _Corrupting(s3, bad=99, mode=mode)
    with pytest.raises(DatasetError, match="failed after 2 attempts"):
        sync_s3_dataset("s3://datasets/ds/one", tmp_path, client=flaky, attempts=2, backoff_s=0.001)
    root = tmp_path / BUCKET / "ds" / "one"
    assert [p.name for p in root.iterdir()] == [MANIFEST]  # no data.yaml, no temp file
    assert json.loads((root / MANIFEST).read_text())["objects"] == {}


def test_multipart_object_verified_by_sha256(s3, tmp_path):
    from boto3.s3.transfer import TransferConfig

    src = tmp_path / "big.bin"
    src.write_bytes(bytes(range(256)) * (6 * 4096 + 7))  # ~6 MiB: two parts of >= 5 MiB
    s3.upload_file(str(src), BUCKET, "ds/big/big.bin",
                   Config=TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20))
    etag = s3.head_object(Bucket=BUCKET, Key="ds/big/big.bin")["ETag"]
    assert "-" in etag  # really multipart: ETag is not the MD5
    root = sync_s3_dataset("s3://datasets/ds/big", tmp_path / "cache", client=s3)
    assert (root / "big.bin").read_bytes() == src.read_bytes()
    entry = json.loads((root / MANIFEST).read_text())["objects"]["big.bin"]
    assert entry["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()


def test_permanent_error_not_retried():
    from botocore.exceptions import ClientError

    calls = []

    def denied():
        calls.append(1)
        raise ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "GetObject")

    with pytest.raises(DatasetError, match="AccessDenied"):
        with_retries(denied, "s3://b/k", attempts=4, sleep=lambda s: None)
    assert len(calls) == 1


def test_transient_error_backs_off():
    from botocore.exceptions import ClientError

    delays, calls = [], []

    def slow():
        calls.append(1)
        if len(calls) < 3:
            raise ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject")
        return "ok"

    assert with_retries(slow, "x", attempts=4, backoff_s=0.5, sleep=delays.append) == "ok"
    assert delays == [0.5, 1.0]


def test_upload_then_sync_roundtrip_and_endpoint_env(s3, tmp_path, monkeypatch):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "images" / "a.png").write_bytes(b"png")
    (src / "data.yaml").write_text("names: [a]\n")
    assert upload_dir(src, "s3://datasets/up", client=s3) == 2
    root = sync_s3_dataset("s3://datasets/up", tmp_path / "cache", client=s3)
    assert _files(src) == {k: v for k, v in _files(root).items() if k != MANIFEST}
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert endpoint_from_env() == "http://127.0.0.1:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://minio:9000")
    assert endpoint_from_env() == "http://minio:9000"
