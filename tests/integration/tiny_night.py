"""The suite's one forced tiny nightly, shared by test_nightly_e2e.py (steps, versions, gate, no
outbound network) and test_nightly_ux.py (what the UIs and the notifications show): one run costs
what two did. The session fixture ``tiny_night`` (tests/integration/conftest.py) runs it.

Its settings are the union of what both files read: train and evaluate figures on (the only nightly
of the suite that draws them), system metrics every second, explain on one sample, compression off."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import sys
import uuid

TINY = [
    "data.synth.images=24", "data.synth.imgsz=64", "data.synth.val_fraction=0.25",
    "train.epochs=1", "train.imgsz=64", "train.batch=8", "sweep.conf=[0.3,0.5]", "sweep.iou=[0.5]",
    "explain.samples=1", "export.parity_images=1", "compress.enabled=false",
    "mlflow.system_metrics_interval_s=1",
]
# A model name of its own: no production version exists for it, so with floors off (a 1-epoch model)
# the gate must pass and the approval message goes out.
MODEL = f"damage-seg-night-{uuid.uuid4().hex[:8]}"
# The registry section is the worker's own config, never a run parameter: pinned in the environment.
WORKER_REGISTRY = {"model_name": MODEL, "floor_mask_map": 0.0, "min_class_ap50": 0.0}

AUDIT: dict = {"on": False, "attempts": []}  # non-loopback connections while the night runs


def _is_loopback(host) -> bool:
    if host in (None, "", "localhost") or (isinstance(host, str) and host.startswith("/")):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return str(host) == socket.gethostname()


def _audit(event: str, args) -> None:
    if not AUDIT["on"]:
        return
    if event == "socket.connect":
        addr = args[1]
        if isinstance(addr, tuple) and not _is_loopback(addr[0]):
            AUDIT["attempts"].append((event, addr))
    elif event == "socket.getaddrinfo":
        if not _is_loopback(args[0]):
            AUDIT["attempts"].append((event, args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed; the flag scopes it to the night


def worker_registry() -> contextlib.AbstractContextManager[None]:
    """The worker's registry section (``WORKER_REGISTRY``) in the environment, restored afterwards."""
    from damage.tasks.core.config_load import REGISTRY_ENV
    from tests.helpers import env_var

    return env_var(REGISTRY_ENV, json.dumps(WORKER_REGISTRY))


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
