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


def test_an_embedded_clusters_token_lives_in_the_state_dir(tmp_path, monkeypatch):
    """Ray writes a new cluster's token to ~/.ray/auth_token unless one is found: the project names one
    in the state dir (created once, 0600, kept), and leaves a token or mode the user chose alone."""
    import os
    import stat

    from damage.tasks.core.runtime import StatePaths, embedded_ray_token

    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(k, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    embedded_ray_token(StatePaths(tmp_path))
    token = tmp_path / "ray" / "auth_token"
    assert os.environ["RAY_AUTH_TOKEN_PATH"] == str(token)
    first = token.read_text()
    assert len(first) == 64 and int(first, 16) > 0
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert [p.name for p in token.parent.iterdir()] == ["auth_token"]  # no temp file left
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    embedded_ray_token(StatePaths(tmp_path))
    assert token.read_text() == first  # a second process joins with the same token
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "users-own")
    embedded_ray_token(StatePaths(tmp_path / "other"))
    assert "RAY_AUTH_TOKEN_PATH" not in os.environ and not (tmp_path / "other").exists()
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("f" * 64)  # what `ray start` made: Ray reads it, so do we
    embedded_ray_token(StatePaths(tmp_path / "other"))
    assert "RAY_AUTH_TOKEN_PATH" not in os.environ and not (tmp_path / "other").exists()
