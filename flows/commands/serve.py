"""``damage serve [MODEL_URI]`` (MLflow scoring server) and ``damage ui`` (MLflow + Prefect UIs).

Both run the servers from this virtualenv with its ``bin/`` first on ``PATH``: ``mlflow models
serve`` starts ``uvicorn`` by name, which fails (exit 127) when ``.venv/bin`` is not on ``PATH``.
Everything listens on loopback; Ctrl-C stops every process started here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from damage.flows.common import console, fail, setup

HostOpt = Annotated[str, typer.Option("--host", help="Interface to listen on (loopback by default).")]


def venv_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment with this interpreter's ``bin/`` first on PATH (uvicorn, prefect, mlflow)."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log, "ab")  # noqa: SIM115 (kept open for the child's lifetime)
    return subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process group (servers fork workers), SIGKILL after 15 s."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=5)


def _wait(procs: list[subprocess.Popen], logs: list[Path]) -> int:
    """Block until a child exits (its code, with its log tail) or Ctrl-C / SIGTERM (stop all, 0)."""
    def _term(*_):
        raise KeyboardInterrupt

    # SIGINT too: a process started in the background by a non-interactive shell inherits SIGINT
    # as "ignored", and Python then never raises KeyboardInterrupt.
    old = signal.signal(signal.SIGTERM, _term)
    old_int = signal.signal(signal.SIGINT, _term)
    try:
        while True:
            for p, log in zip(procs, logs, strict=True):
                if p.poll() is not None:
                    tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
                    console.print(f"[red]{p.args[0]} ... exited with {p.returncode}[/]; log {log}:\n{tail}",
                                  highlight=False)
                    return p.returncode or 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        console.print("stopping ...")
        return 0
    finally:
        _stop(procs)
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGINT, old_int)


def _approved_pyfunc(uri: str, work: Path, notify=None) -> Path:
    """A pyfunc folder for ``uri`` built from the installed package's code around the approved, verified ONNX
    (``models:/NAME@production`` or ``models:/NAME/VERSION``) or a local ``.onnx`` file."""
    import shutil

    from damage.flows.common import run_guarded
    from damage.tasks.serving.pyfunc import save_pyfunc

    if uri.startswith("models:/"):
        from damage.model_registry.frozen import approved_file, fetch_approved_uri
        from damage.tasks.core import tracking

        shutil.rmtree(work, ignore_errors=True)
        local = run_guarded(fetch_approved_uri, tracking.client(), uri, work / "files", notify)
        onnx = run_guarded(approved_file, local, ".onnx")
    else:
        onnx = Path(uri)
        if onnx.suffix != ".onnx" or not onnx.is_file():
            fail(f"{uri}: serve models:/NAME@production, models:/NAME/VERSION or a local .onnx file")
        shutil.rmtree(work, ignore_errors=True)
    return run_guarded(save_pyfunc, onnx, work / "pyfunc")


def serve(
    ctx: typer.Context,
    model_uri: Annotated[str | None, typer.Argument(
        help="MLflow model URI (default: models:/<registry.model_name>@production).")] = None,
    host: HostOpt = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port of the scoring server.")] = 5001,
    workers: Annotated[int, typer.Option("--workers", help="Server worker processes.")] = 1,
    replicas: Annotated[int | None, typer.Option(
        "--replicas", min=1, help="Serve on Ray Serve with N replicas, following the alias (the [ray] extra).")] = None,
    min_replicas: Annotated[int | None, typer.Option(
        "--min-replicas", min=0, help="Ray Serve autoscaling: fewest replicas (with --max-replicas).")] = None,
    max_replicas: Annotated[int | None, typer.Option(
        "--max-replicas", min=1, help="Ray Serve autoscaling: most replicas (with --min-replicas).")] = None,
    canary: Annotated[str | None, typer.Option(
        "--canary", help="Ray Serve: canary model URI (e.g. models:/damage-seg@staging); see --canary-weight.")] = None,
    canary_weight: Annotated[float, typer.Option(
        "--canary-weight", min=0, max=1, help="Share of requests (hashed by request id) the canary answers.")] = 0.1,
    shadow: Annotated[str | None, typer.Option(
        "--shadow", help="Ray Serve: shadow model URI; mirrored requests, answers never returned.")] = None,
) -> None:
    """Serve the approved model over HTTP (POST /invocations), from this virtualenv.

    Without --replicas (or --min/--max-replicas, --canary, --shadow, serving.canary/shadow in the
    config): ``mlflow models serve`` on the URI resolved once. With them: Ray Serve replicas that
    follow the alias, with canary, shadow, monitoring windows and /metrics (README "Serving in production").
    """
    sets = [f"serving.replicas={replicas}"] if replicas else []
    if min_replicas is not None or max_replicas is not None:
        sets += [f"serving.min_replicas={min_replicas}", f"serving.max_replicas={max_replicas}"]
    if canary:
        sets.append(f"serving.canary={{model: '{canary}', weight: {canary_weight}}}")
    if shadow:
        sets.append(f"serving.shadow='{shadow}'")
    cfg, paths = setup(ctx, sets)
    uri = model_uri or f"models:/{cfg.registry.model_name}@production"
    if sets or cfg.serving.canary or cfg.serving.shadow:
        raise typer.Exit(_serve_ray(cfg, paths, uri, host, port if port != 5001 else cfg.serving.port))
    # mlflow models serve: the files are the approved copy, hash-verified (model_registry.frozen.fetch_approved);
    # the code is this installed package's, never the artifact store's (the pyfunc folder is written here)
    from damage.model_registry.uri import alias_hint
    from damage.tasks.core import tracking

    hint = alias_hint(tracking.client(), uri)  # an unset alias: say what to do, not MLflow's traceback
    if hint:
        fail(hint)
    from damage.tasks.core.notify import send

    model_dir = _approved_pyfunc(uri, paths.root / "approved" / f"serve-{port}",
                                 lambda msg: send(cfg.notify, "failure", f"refused to serve {uri}", msg))
    log = paths.root / "logs" / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_dir), "--env-manager", "local",
           "--host", host, "--port", str(port), "--workers", str(workers)]
    proc = _start(cmd, venv_env(), log)
    from damage.tasks.serving.pyfunc import input_example

    body = json.dumps({"dataframe_split": input_example().to_dict(orient="split", index=False)})
    url = f"http://{host}:{port}"
    from damage.tasks.serving.pyfunc_model import PATH_ROOT_ENV

    root = os.environ.get(PATH_ROOT_ENV)
    path_note = (f"a 'path' column reads image files under {root}" if root else
                 f"the 'path' column is off: set {PATH_ROOT_ENV}=/folder before `damage serve` to read files there")
    console.print(f"serving {uri} at {url}  (log: {log}; Ctrl-C stops it)\n"
                  f"  health : curl {url}/ping\n"
                  f"  predict: curl -s {url}/invocations -H 'Content-Type: application/json' -d '{body}'\n"
                  f"  (send your own image as base64 in the 'image' column; {path_note})",
                  highlight=False, soft_wrap=True)
    raise typer.Exit(_wait([proc], [log]))


def ui_banner(mlflow_url: str, experiment_url: str, prefect_url: str, state_root: Path, log_dir: Path) -> str:
    """What ``damage ui`` prints: the experiment's deep link first (it opens the model-training view;
    MLflow 3's home -> Experiments path opens its GenAI view until the browser is switched once)."""
    lines = []
    if experiment_url:
        lines += [f"open this: {experiment_url}",
                  "  (runs, charts, models; from MLflow's home page, switch the sidebar's workflow to 'Model training' once:"
                  " it opens experiments in its GenAI traces view until then)"]
    lines += [f"MLflow UI : {mlflow_url}", f"Prefect UI: {prefect_url}",
              f"state dir : {state_root}   (logs: {log_dir}; Ctrl-C stops both)"]
    return "\n".join(lines)
def _serve_ray(cfg, paths, uri: str, host: str, port: int) -> int:
    """Ray Serve: build the application from the config, run it on ``host:port``, wait for Ctrl-C."""
    import functools
    import importlib.util

    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        fail("Ray Serve is not installed: install the \\[ray] extra (pip install 'damage\\[ray]'), "
             "or serve without --replicas/--canary/--shadow (mlflow models serve)")
    from damage.model_registry.serving import log_window, parse_model_uri, resolve, training_profile
    from damage.tasks.core.errors import DamageError
    from damage.tasks.core.notify import send
    from damage.tasks.serving import ray_serve

    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        for u in (uri, cfg.serving.canary.model if cfg.serving.canary else None, cfg.serving.shadow):
            if u:
                parse_model_uri(u)
    except DamageError as e:
        fail(str(e))
    name = parse_model_uri(uri)[0]
    monitor_kwargs = {
        "window": cfg.serving.window, "window_min": cfg.serving.window_min, "validate": cfg.validation,
        "notify": cfg.notify, "max_error_rate": cfg.serving.max_error_rate, "monitor": cfg.serving.monitor,
        "sink": functools.partial(log_window, name, cfg.mlflow.experiment, tracking_uri),
        "reference": functools.partial(training_profile, name, tracking_uri=tracking_uri),
    }
    resolver = functools.partial(resolve, cache_dir=paths.root / "serving" / "models", tracking_uri=tracking_uri,
                                 notify=lambda msg: send(cfg.notify, "failure", f"refused to serve {uri}", msg))
    app = ray_serve.build_app(uri, resolver, cfg.serving, monitor_kwargs, inbox_root=paths.root / "inbox")
    ray_serve.run(app, host, port)
    from damage.tasks.serving.pyfunc import input_example

    body = json.dumps({"dataframe_split": input_example().to_dict(orient="split", index=False)})
    url = f"http://{host}:{port}"
    scale = (f"{cfg.serving.min_replicas}-{cfg.serving.max_replicas} replicas (autoscaling)"
             if cfg.serving.min_replicas is not None else f"{cfg.serving.replicas} replica(s)")
    extra = "".join([f"; canary {cfg.serving.canary.model} ({cfg.serving.canary.weight:.0%})" if cfg.serving.canary
                     else "", f"; shadow {cfg.serving.shadow}" if cfg.serving.shadow else ""])
    console.print(f"Ray Serve: {uri} on {scale}{extra}, following the alias every {cfg.serving.poll_s:g} s\n"
                  f"  predict: curl -s {url}/invocations -H 'Content-Type: application/json' -d '{body}'\n"
                  f"  version: curl {url}/version     metrics: curl {url}/metrics\n"
                  f"  monitoring windows and shadow reports: MLflow experiment '{cfg.mlflow.experiment}' "
                  f"(runs serving-*/shadow-*); Ctrl-C stops it", highlight=False, soft_wrap=True)

    def _term(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _term)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        console.print("stopping ...")
    finally:
        from ray import serve

        try:  # the open windows and shadow reports go to MLflow before the replicas stop
            serve.get_deployment_handle("monitor", app_name=ray_serve.APP_NAME).flush.remote().result(timeout_s=60)
        except Exception as e:
            console.print(f"[yellow]open monitoring windows not logged: {e}[/]", highlight=False)
        serve.shutdown()
        signal.signal(signal.SIGTERM, old)
    return 0


def ui(
    ctx: typer.Context,
    host: HostOpt = "127.0.0.1",
    mlflow_port: Annotated[int, typer.Option("--mlflow-port", help="Port of the MLflow UI.")] = 5000,
    prefect_port: Annotated[int, typer.Option("--prefect-port", help="Port of the Prefect UI.")] = 4200,
) -> None:
    """Start the MLflow UI and the Prefect UI on this state directory; Ctrl-C stops both."""
    cfg, paths = setup(ctx)
    from damage.tasks.core import links, tracking

    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or ""
    if tracking_uri.startswith(("http://", "https://")):
        fail(f"MLflow tracking URI is a server ({tracking_uri}): open its UI there; `damage ui` serves local stores")
    logs = [paths.root / "logs" / "ui-mlflow.log", paths.root / "logs" / "ui-prefect.log"]
    # One worker: a UI for one person, and uvicorn's multi-worker supervisor kills workers that miss
    # its 5 s health ping, which happens on a busy 2-core machine (workers restarting forever).
    mlflow_cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
                  "--host", host, "--port", str(mlflow_port), "--workers", "1"]
    prefect_cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(prefect_port)]
    prefect_env = {"PREFECT_HOME": str(paths.prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                   "PREFECT_UI_API_URL": f"http://{host}:{prefect_port}/api"}
    prefect_env_all = venv_env(prefect_env)
    prefect_env_all.pop("PREFECT_API_URL", None)  # the server itself must not point at another API
    # Touch the store before the UI starts: on a fresh state dir both would create (migrate) the
    # same SQLite schema at once and one of them fails ("table _alembic_tmp_runs already exists").
    exp_url = ""
    c = tracking.client(tracking_uri)
    exp = c.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is not None:
        exp_url = links.mlflow_experiment_url(exp.experiment_id, f"http://{host}:{mlflow_port}")
    procs = [_start(mlflow_cmd, venv_env(), logs[0]), _start(prefect_cmd, prefect_env_all, logs[1])]
    console.print(ui_banner(f"http://{host}:{mlflow_port}", exp_url, f"http://{host}:{prefect_port}", paths.root,
                            logs[0].parent), highlight=False, soft_wrap=True)
    raise typer.Exit(_wait(procs, logs))


def register(app: typer.Typer) -> None:
    """Add ``serve`` and ``ui`` to the ``damage`` CLI."""
    app.command("serve")(serve)
    app.command("ui")(ui)
