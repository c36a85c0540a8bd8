"""The one place that starts or joins Ray, and the thread rule of every Ray worker.

Ray is an optional extra (``pip install 'damage[ray]'``): nothing here imports it at module import,
and asking for Ray without it is a ``DamageError`` naming the extra. ``connect`` joins the cluster
named by ``ray.address`` (or ``$RAY_ADDRESS``), else starts an embedded Ray on this machine with an
explicit CPU count and its files in the state dir. It never calls ``ray.shutdown()``: whoever started
Ray (the CLI process ending, a test fixture) stops it.

Example:
    >>> connect(cfg.ray, state_dir)       # embedded Ray with every core, or the cluster
    'local'
    >>> apply_worker_threads(1)          # first thing inside every task/actor
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from damage.tasks.core.errors import DamageError
from damage.tasks.core.machine import THREAD_ENV
from damage.tasks.core.runtime import StatePaths, embedded_ray_token, state_paths

if TYPE_CHECKING:
    from damage.tasks.core.config import RayConfig

EXTRA_HINT = "pip install 'damage[ray]'"


# The S3 endpoint and region a worker needs to read where this process reads (no secrets)
S3_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION")
# Credentials: handed to the workers of an embedded Ray only (this machine, this user); a cluster's workers hold
# their own (IRSA, instance role, their own MLflow account), so keys of the submitting machine never travel there
SECRET_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
              "AWS_SESSION_TOKEN")


def forwarded_env(names: tuple[str, ...], forward_secrets: bool) -> dict[str, str]:
    """This process's values of ``names`` (and of ``SECRET_ENV`` when ``forward_secrets``) that are set: the
    ``env_vars`` of a Ray task or actor. The one rule of what travels to Ray workers."""
    keep = names + (SECRET_ENV if forward_secrets else ())
    return {k: os.environ[k] for k in keep if os.environ.get(k)}


class RayUnavailable(DamageError):
    """Ray is not installed, or the cluster cannot be reached (the message says which and what to do)."""


def require_ray() -> Any:
    """The ``ray`` module.

    Raises:
        RayUnavailable: Ray is not installed; the message names the extra.
    """
    try:
        import ray
    except ImportError as e:
        raise RayUnavailable(f"this needs Ray, which is not installed ({e}): {EXTRA_HINT}") from None
    return ray


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` of a Ray address (``host:6379``, ``ray://host:10001``).

    Example:
        >>> parse_address("ray://head.ray.svc:10001")
        ('head.ray.svc', 10001)

    Raises:
        RayUnavailable: no port, or not a number.
    """
    rest = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RayUnavailable(f"ray.address '{address}': expected host:port or ray://host:port")
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout_s: float) -> None:
    """Fail within ``timeout_s`` when nothing accepts a TCP connection at ``address``.

    ``ray.init`` itself retries an unreachable GCS for minutes; a wrong address in a nightly must
    fail fast, naming the address and the setting.

    Raises:
        RayUnavailable: the host does not resolve or the port does not accept within ``timeout_s``.
    """
    host, port = parse_address(address)
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            with socket.create_connection((host, port), timeout=min(left, 5.0)):
                return
        except OSError as e:  # refused, unresolvable, timed out: try again until the deadline
            last = e
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    raise RayUnavailable(f"Ray cluster at '{address}' not reachable within {timeout_s:g} s ({last}); "
                         f"check ray.address / $RAY_ADDRESS, or unset both for an embedded Ray on this machine")


def resolve_address(cfg: RayConfig) -> str | None:
    """The cluster to join: ``ray.address``, else ``$RAY_ADDRESS``; None = embedded Ray."""
    addr = cfg.address or os.environ.get("RAY_ADDRESS") or None
    return None if addr in (None, "", "local") else addr


def connect(cfg: RayConfig, state_dir: str | os.PathLike | None = None) -> str:
    """Join the configured Ray cluster, or start an embedded one; a no-op when Ray is already up.

    Args:
        cfg: the ``ray:`` section.
        state_dir: where the embedded Ray keeps its session files (``<state_dir>/ray``); None = Ray's own.

    Returns:
        ``"existing"``, ``"local"`` or the address joined.

    Raises:
        RayUnavailable: Ray missing, or the address unreachable within ``ray.connect_timeout_s``.
    """
    ray = require_ray()
    if ray.is_initialized():
        return "existing"
    address = resolve_address(cfg)
    if address is not None:
        if address != "auto":
            check_reachable(address, cfg.connect_timeout_s)
        try:
            # the cluster's image carries the project (infra/k8s/raycluster.yaml); trials log to the
            # MLflow server named by the config, so nothing of this machine's state dir is shipped
            ray.init(address=address, include_dashboard=False, configure_logging=False, log_to_driver=False)
        except Exception as e:  # ConnectionError, RuntimeError ("could not find any running Ray instance")
            raise RayUnavailable(f"Ray cluster at '{address}': {e}") from None
        return address
    kwargs: dict[str, Any] = {"num_cpus": cfg.num_cpus or os.cpu_count() or 1}
    if cfg.num_gpus is not None:
        kwargs["num_gpus"] = cfg.num_gpus
    if state_dir is not None:
        tmp = Path(state_dir) / "ray"
        tmp.mkdir(parents=True, exist_ok=True)
        kwargs["_temp_dir"] = str(tmp.resolve())
    embedded_ray_token(StatePaths(Path(state_dir).resolve()) if state_dir is not None else state_paths())
    ray.init(address="local", include_dashboard=False, configure_logging=False, log_to_driver=False, **kwargs)
    return "local"


def cluster_cpus() -> int:
    """CPUs of the connected cluster (at least 1)."""
    ray = require_ray()
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def apply_worker_threads(n: int) -> None:
    """Pin this worker's threads to ``n``: the env of every numeric library, OpenCV, and torch when loaded.

    Ray starts one worker process per CPU; a library that takes every core in each of them oversubscribes
    the machine (on 2 vCPUs measured 28x slower), so every Ray task and actor calls this first.
    """
    for k in THREAD_ENV:
        os.environ[k] = str(n)
    try:
        import cv2

        cv2.setNumThreads(n)
    except ImportError:  # OpenCV is a core dependency; a worker without it has nothing to pin
        pass
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
