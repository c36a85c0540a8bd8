"""Issue 13, items 6-7: hostile S3 prefixes and colliding keys (moto's in-process S3)."""

from __future__ import annotations

import pytest

from damage.tasks.core.errors import DatasetError
from damage.tasks.data.storage import sync_s3_dataset
from tests.helpers import S3_BUCKET

BUCKET = S3_BUCKET  # the bucket of the `s3` fixture (tests/conftest.py)


@pytest.mark.parametrize("prefix", ["../../x/victim", "ds/./v1", "ds//v1", "ds/.."])
def test_13_06_s3_prefix_traversal(s3, tmp_path, prefix):
    victim = tmp_path / "x" / "victim" / "notes.txt"
    victim.parent.mkdir(parents=True)
    victim.write_bytes(b"user data")
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/notes.txt", Body=b"overwritten")
    cache = tmp_path / "a" / "cache"
    with pytest.raises(DatasetError, match=r"prefix segment .* is refused") as e:
        sync_s3_dataset(f"s3://{BUCKET}/{prefix}", cache, client=s3)
    assert prefix in str(e.value)  # the message names the URI
    assert victim.read_bytes() == b"user data"
    assert not (tmp_path / "a").exists()  # nothing written at all


def test_13_07_s3_key_collisions(s3, tmp_path):
    for key, body in (("ds/sub/img.jpg", b"one"), ("ds/sub//img.jpg", b"two"), ("ds/sub/./img.jpg", b"three")):
        s3.put_object(Bucket=BUCKET, Key=key, Body=body)
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match=r"s3 keys 'ds/sub/.*img.jpg' and 'ds/sub/.*img.jpg' both map to "
                                           r"the local file 'sub/img.jpg'"):
        sync_s3_dataset(f"s3://{BUCKET}/ds", cache, client=s3)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))
