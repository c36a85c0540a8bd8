"""Process environment for the pipeline: one state directory, offline and quiet.

Everything the pipeline writes lives under one directory (``Config.state_dir`` or
``$DAMAGE_STATE_DIR``): MLflow DB and artifacts, Prefect home, Ultralytics settings and
runs, caches and temp files. ``activate()`` must run before prefect, mlflow or ultralytics
are imported (they read some of these variables at import), so the CLI calls it first.
Nothing here runs at import time.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from damage.tasks.core.atomic import atomic_write

# Variables that keep every library offline and quiet (no telemetry, no downloads).
OFFLINE_ENV = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "YOLO_OFFLINE": "1",
    "YOLO_AUTOINSTALL": "0",
    "YOLO_VERBOSE": "false",
    "HF_HUB_OFFLINE": "1",
    "GIT_PYTHON_REFRESH": "quiet",
    # Prefect: a flow started with no API URL spins up a local server backed by the
    # SQLite DB in PREFECT_HOME; the UI started later on the same home shows its runs.
    "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true",
    # The first start migrates a fresh SQLite DB; 20 s (the default) is too short on 2 busy cores.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_LOGGING_TO_API_ENABLED": "true",
    "PREFECT_UI_ENABLED": "true",
}


@dataclass(frozen=True)
class StatePaths:
    """Where each kind of state lives under the state directory."""

    root: Path

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def yolo_config(self) -> Path:
        return self.root / "ultralytics"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def models(self) -> Path:
        return self.root / "models"

    def tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow_db}"


def resolve_state_dir(state_dir: str | os.PathLike | None = None) -> Path:
    """``$DAMAGE_STATE_DIR`` wins over the config value; the result is absolute."""
    chosen = os.environ.get("DAMAGE_STATE_DIR") or state_dir or ".state"
    return Path(chosen).expanduser().resolve()


def state_paths(state_dir: str | os.PathLike | None = None) -> StatePaths:
    """``StatePaths`` of the resolved state directory (``resolve_state_dir``): the one way to a state path."""
    return StatePaths(resolve_state_dir(state_dir))


def _bundled_font() -> Path | None:
    """A TTF shipped inside an installed package (matplotlib's DejaVu), used as Arial.ttf."""
    try:
        import matplotlib

        p = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        return p if p.is_file() else None
    except Exception:  # matplotlib missing: Ultralytics then draws without labels' font
        return None


def activate(state_dir: str | os.PathLike | None = None, tracking_uri: str | None = None) -> StatePaths:
    """Create the state tree and point every library at it. Idempotent.

    Args:
        state_dir: state directory (``$DAMAGE_STATE_DIR`` overrides it).
        tracking_uri: MLflow tracking URI; None keeps ``$MLFLOW_TRACKING_URI`` or uses the
            embedded SQLite DB in the state dir.
    """
    paths = StatePaths(resolve_state_dir(state_dir))
    for d in (paths.root, paths.prefect_home, paths.mlflow_artifacts, paths.yolo_config, paths.runs,
              paths.datasets, paths.cache, paths.tmp, paths.reports, paths.models):
        d.mkdir(parents=True, exist_ok=True)
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    from damage.tasks.core.quiet import quiet_openvino

    quiet_openvino()  # OpenVINO/NNCF telemetry: no client id in ~/intel, nothing sent
    os.environ["DAMAGE_STATE_DIR"] = str(paths.root)
    # Ultralytics sets OMP_NUM_THREADS=1 at import when unset; use every core instead.
    os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("DAMAGE_TORCH_THREADS") or str(os.cpu_count() or 1))
    os.environ.setdefault("PREFECT_HOME", str(paths.prefect_home))
    os.environ["YOLO_CONFIG_DIR"] = str(paths.yolo_config)
    os.environ.setdefault("TMPDIR", str(paths.tmp))
    os.environ.setdefault("MPLCONFIGDIR", str(paths.cache / "matplotlib"))
    os.environ.setdefault("XDG_CACHE_HOME", str(paths.cache))
    os.environ.setdefault("TORCH_HOME", str(paths.cache / "torch"))
    os.environ.setdefault("HF_HOME", str(paths.cache / "huggingface"))
    from damage.tasks.core.secrets import move_uri_credentials_to_env

    # credentials in a URI go to MLflow's own variables; the URI itself is logged, hashed, written
    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = move_uri_credentials_to_env(tracking_uri)
    else:
        os.environ.setdefault("MLFLOW_TRACKING_URI", paths.tracking_uri())
        os.environ["MLFLOW_TRACKING_URI"] = move_uri_credentials_to_env(os.environ["MLFLOW_TRACKING_URI"])
    import tempfile

    tempfile.tempdir = None  # re-read TMPDIR
    # Ultralytics looks for its fonts in $YOLO_CONFIG_DIR/Ultralytics and otherwise asks GitHub
    # for them on every train and val: put a bundled TTF there under the names it wants.
    font = _bundled_font()
    if font:
        ucfg = paths.yolo_config / "Ultralytics"
        ucfg.mkdir(parents=True, exist_ok=True)
        for name in ("Arial.ttf", "Arial.Unicode.ttf"):
            dst = ucfg / name
            if not dst.exists():
                atomic_write(dst, lambda tmp: shutil.copyfile(font, tmp))
    return paths


def configure_ultralytics(paths: StatePaths) -> None:
    """Ultralytics: settings in the state dir, its MLflow callback off, all CPU cores used.

    Ultralytics' own MLflow callback opens competing runs, so it is disabled and the pipeline
    logs explicitly. Ultralytics sets torch to ``cpu_count - 1`` threads (1 on a 2-core box);
    we patch ``NUM_THREADS`` and torch's thread count so training uses every core.
    """
    import torch
    import ultralytics.utils as uutils
    from ultralytics import settings

    want = {
        "mlflow": False,
        "tensorboard": False,
        "wandb": False,
        "clearml": False,
        "comet": False,
        "dvc": False,
        "raytune": False,
        "hub": False,
        "sync": False,
        "runs_dir": str(paths.runs),
        "datasets_dir": str(paths.datasets),
        "weights_dir": str(paths.cache / "weights"),
    }
    want = {k: v for k, v in want.items() if k in settings}  # keys vary across Ultralytics versions
    current = {k: settings.get(k) for k in want}
    if current != want:
        settings.update(want)
    # DAMAGE_TORCH_THREADS caps the threads on a shared machine: with more runnable threads than
    # cores, torch's OpenMP threads wait on each other (measured: 2 threads 21 s per training batch
    # vs 1 thread 0.8 s on a 2-core box at load 30).
    n = int(os.environ.get("DAMAGE_TORCH_THREADS") or os.cpu_count() or 1)
    uutils.NUM_THREADS = n
    for modname in ("ultralytics.engine.trainer", "ultralytics.data.build", "ultralytics.data.base",
                    "ultralytics.data.utils", "ultralytics.data.dataset", "ultralytics.utils.torch_utils"):
        mod = __import__(modname, fromlist=["_"])
        if hasattr(mod, "NUM_THREADS"):
            mod.NUM_THREADS = n
    torch.set_num_threads(n)


def embedded_ray_token(paths: StatePaths) -> None:
    """Keep the token of a Ray cluster this process starts in the state dir, not in ``~/.ray``.

    Ray (2.5x) turns token authentication on for a cluster that ``ray.init`` starts and, when no token
    is found, writes a new one to ``~/.ray/auth_token``. Unless the user has a token (``$RAY_AUTH_TOKEN``,
    ``$RAY_AUTH_TOKEN_PATH``, or one in ``~/.ray/auth_token`` already, which a cluster they started with
    ``ray start`` uses) or chose a mode (``$RAY_AUTH_MODE``), this points
    ``$RAY_AUTH_TOKEN_PATH`` at ``<state>/ray/auth_token``, created once with 256 random bits, mode
    0600, and never replaced (two processes racing to create it agree on the first). Ray's workers and
    any driver started from this process inherit the variable. Call it only before starting an embedded
    cluster: a process that joins someone else's cluster needs that cluster's token.
    """
    if any(os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")):
        return
    if (Path.home() / ".ray" / "auth_token").is_file():  # the user's own (`ray start`, `ray get-auth-token`)
        return
    import secrets
    import tempfile

    token = paths.root / "ray" / "auth_token"
    if not token.is_file():
        token.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=token.parent, prefix=".auth_token.")  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
            try:
                os.link(tmp, token)  # create-if-absent, atomic: a token another process wrote first stays
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
