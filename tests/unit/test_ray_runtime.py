"""tasks/scale/ray_runtime: addresses, an unreachable cluster fails fast and names the setting."""

from __future__ import annotations

import time

import pytest

from damage.tasks.core.config_load import load_config
from damage.tasks.scale.ray_runtime import RayUnavailable, check_reachable, connect, parse_address


def test_parse_address():
    assert parse_address("ray://head.ray.svc:10001") == ("head.ray.svc", 10001)
    assert parse_address("10.0.0.5:6379") == ("10.0.0.5", 6379)
    with pytest.raises(RayUnavailable, match="host:port"):
        parse_address("head-without-port")


def test_unreachable_address_fails_within_the_timeout(monkeypatch):
    pytest.importorskip("ray")
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray session is already up in this process")
    cfg = load_config(overrides=["ray.address=127.0.0.1:1", "ray.connect_timeout_s=3"])
    t0 = time.monotonic()
    with pytest.raises(RayUnavailable, match=r"127\.0\.0\.1:1.*ray\.address"):
        connect(cfg.ray)
    assert time.monotonic() - t0 < 30
    assert not ray.is_initialized()


def test_check_reachable_accepts_a_listening_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        check_reachable(f"127.0.0.1:{s.getsockname()[1]}", 2)
