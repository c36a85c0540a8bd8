"""Prefect deployments of the project's flows, built from the config.

* ``nightly``: the retraining flow on the ``schedule.cron`` / ``schedule.timezone`` schedule
  (default 02:00 UTC), deployment concurrency limit 1 so two runs never overlap (a run that
  would overlap waits in the queue), parameters ``dataset`` (URI) and ``model_size``.
  Flow runs retry on failure (``FLOW_RETRIES``); training then resumes from the previous
  attempt's ``last.pt`` (see ``tasks/nightly/skip.py``).
* ``promote``: the promotion flow (gate + human approval), run on demand with a version.
* ``compress``: the compression flow, run on demand.

Two ways to run them, same definitions:

* ``damage schedule`` serves every deployment from one process (``prefect.serve``): simplest,
  no work pool. Runs execute as subprocesses of that process.
* ``damage schedule --work-pool damage-process`` registers them with a work pool (entrypoints
  are module paths, so any worker with this package installed can run them) and returns; a
  ``prefect worker start --pool damage-process`` executes the runs.
* ``prefect deploy --prefect-file infra/prefect.yaml --all``: the same deployments for the
  default config. The file is generated from this module (``python -m damage.flows.deploy
  infra/prefect.yaml``); a test fails when it differs from what this module builds.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from damage.tasks.core.config import Config, ConfigError

NIGHTLY_TAGS = ["damage", "nightly"]
WORK_POOL = "damage-process"  # the pool infra/prefect.yaml and the compose worker use
PREFECT_YAML = Path(__file__).resolve().parents[1] / "infra" / "prefect.yaml"
# What each deployment runs: (module, attribute). The nightly one is the flow object with retries
# (flows/nightly.py), so that a worker or a served subprocess loading it gets them too.
ENTRYPOINTS = {"nightly": ("damage.flows.nightly", "scheduled_nightly"), "promote": ("damage.flows.promote", "promote"),
               "compress": ("damage.flows.compress", "compress_flow")}


def nightly_parameters(flow_fn: Any, config_path: str | None, dataset: str | None = None,
                       model_size: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Default parameters of the nightly deployment.

    Uses the flow's own ``dataset`` / ``model_size`` parameters when it has them (so they show as
    separate fields in the Prefect UI), else folds them into ``overrides``.
    """
    params: dict[str, Any] = {"config_path": config_path, "force": False}
    accepted = inspect.signature(getattr(flow_fn, "fn", flow_fn)).parameters
    overrides = list(overrides or [])
    for name, key, value in (("dataset", "data.source", dataset), ("model_size", "train.model", model_size)):
        if name in accepted:
            params[name] = value
        elif value is not None:
            overrides.append(f"{key}={value}")
    params["overrides"] = overrides
    return params


def _run_defaults(cfg: Config, dataset: str | None, model_size: str | None) -> tuple[str | None, str | None]:
    """Default dataset / model size shown as run parameters: only values a run may set (``RUN_OVERRIDES``);
    a worker-only value (a ``.pt`` model, a URI with credentials) stays in the worker's config."""
    from damage.tasks.core.run_params import check_run_overrides
    from damage.tasks.core.secrets import redact_uri

    out = []
    for key, value in (("data.source", dataset or cfg.data.source), ("train.model", model_size or cfg.train.model)):
        try:
            check_run_overrides([f"{key}={value}"])
            out.append(value if redact_uri(str(value)) == str(value) else None)
        except ConfigError:
            out.append(None)
    return out[0], out[1]


def build_deployments(cfg: Config, config_path: str | Path | None = None, *, overrides: list[str] | None = None,
                      dataset: str | None = None, model_size: str | None = None, work_pool: str | None = None,
                      schedule: bool = True) -> list[Any]:
    """RunnerDeployments for nightly, promote and compress.

    Args:
        cfg: resolved config (schedule, registry and MLflow sections are read).
        config_path: YAML the flows load at run time (absolute path recommended); None = default.
        overrides: ``key=value`` overrides every nightly run applies (the ``--set`` of ``damage schedule``):
            the flow reloads the config at run time, so they must travel as a parameter.
        dataset: default ``data.source`` of the nightly runs (``s3://...``, a folder, ``synth``).
        model_size: default ``train.model`` (n|s|m|l|x or a .pt path).
        work_pool: work pool name when deploying to workers (entrypoints become module paths).
        schedule: attach the cron schedule (tests pass False and trigger runs by hand).
    """
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    from damage.flows.compress import compress_flow
    from damage.flows.nightly import nightly, scheduled_nightly
    from damage.flows.promote import promote

    cp = str(Path(config_path).resolve()) if config_path else None
    common: dict[str, Any] = {"work_pool_name": work_pool}
    if work_pool:  # a worker imports the flow from the installed package, no code storage needed
        common["entrypoint_type"] = EntrypointType.MODULE_PATH
    deployments = [scheduled_nightly.to_deployment(
        "nightly",
        schedules=[Cron(cfg.schedule.cron, timezone=cfg.schedule.timezone)] if schedule else None,
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        parameters=nightly_parameters(nightly, cp, *_run_defaults(cfg, dataset, model_size), overrides),
        description="Nightly retraining: data gate, train, evaluate, sweep, export, register, promotion gate. "
                    "Skips when data, config and code are unchanged (force=true to run anyway).",
        tags=NIGHTLY_TAGS,
        **common,
    )]
    deployments.append(promote.to_deployment(
        "promote",
        # no tracking URI, evaluator or registry parameter: those are the worker's own config (damage.tasks.core.run_params)
        parameters={"model_name": cfg.registry.model_name, "wait_for_approval": cfg.registry.wait_for_approval},
        description="Gate a registered version against production with the worker's evaluator, then wait for "
                    "an approver's own `damage registry approve`. Run with parameter version=<N>.",
        tags=["damage", "registry"],
        enforce_parameter_schema=False,  # `version` is supplied per run
        **common,
    ))
    deployments.append(compress_flow.to_deployment(
        "compress", description="Compression chain on a trained model (distill, prune, quantize).",
        tags=["damage", "compress"], enforce_parameter_schema=False, **common))
    for d in deployments:  # Prefect derives the entrypoint from the function's name, not the flow object's
        module, attr = ENTRYPOINTS[d.name]
        d.entrypoint = f"{module}.{attr}" if work_pool else f"{module.removeprefix('damage.').replace('.', '/')}.py:{attr}"
    return deployments


_YAML_HEADER = """\
# GENERATED from flows/deploy.py by `python -m damage.flows.deploy infra/prefect.yaml`; do not edit by hand
# (tests/unit/test_deploy.py fails when this file and flows/deploy.py differ).
#
# Prefect deployments for `prefect deploy` (work-pool mode), built from configs/default.yaml.
# Run from the repository root:
#
#   prefect work-pool create damage-process --type process
#   prefect deploy --prefect-file infra/prefect.yaml --all
#   prefect worker start --pool damage-process
#
# `damage schedule --work-pool damage-process` registers the same deployments from whatever
# config you pass, and is the recommended way.
"""


def prefect_yaml(cfg: Config, work_pool: str = WORK_POOL) -> str:
    """The ``prefect.yaml`` text of ``build_deployments(cfg)`` for ``prefect deploy`` (file-path entrypoints,
    run from the checkout the worker's ``DAMAGE_REPO_DIR`` names)."""
    import yaml
    from prefect import __version__

    entries = []
    for d in build_deployments(cfg, work_pool=None):
        entry: dict[str, Any] = {"name": d.name, "entrypoint": d.entrypoint, "description": d.description,
                                 "tags": list(d.tags), "work_pool": {"name": work_pool}}
        if d.schedules:
            entry["schedules"] = [{"cron": s.schedule.cron, "timezone": s.schedule.timezone} for s in d.schedules]
        if d.concurrency_limit:
            entry["concurrency_limit"] = {"limit": d.concurrency_limit,
                                          "collision_strategy": d.concurrency_options.collision_strategy.value}
        if d.enforce_parameter_schema is False:
            entry["enforce_parameter_schema"] = False
        entry["parameters"] = d.parameters
        entries.append(entry)
    spec = {"name": "damage", "prefect-version": ".".join(__version__.split(".")[:2]), "build": None, "push": None,
            "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $DAMAGE_REPO_DIR }}"}}],
            "deployments": entries}
    return _YAML_HEADER + yaml.safe_dump(spec, sort_keys=False, default_flow_style=False, width=110)


if __name__ == "__main__":  # python -m damage.flows.deploy [OUT]: write (or print) infra/prefect.yaml's text
    import sys

    from damage.tasks.core.config_load import load_config

    text = prefect_yaml(load_config())
    if len(sys.argv) > 1:
        from damage.tasks.core.atomic import atomic_write_text

        atomic_write_text(sys.argv[1], text)
    else:
        print(text, end="")


def register_with_pool(deployments: list[Any], work_pool: str) -> list[str]:
    """Create/update the deployments on the server for ``work_pool``; returns their ids."""
    from prefect.deployments.runner import deploy

    ids = deploy(*deployments, work_pool_name=work_pool, build=False, push=False, print_next_steps_message=False,
                 ignore_warnings=True)
    return [str(i) for i in ids]


def serve_all(deployments: list[Any], limit: int | None = None) -> None:
    """Serve the deployments from this process until interrupted (runs execute as subprocesses)."""
    from prefect import serve

    serve(*deployments, limit=limit, print_starting_message=True)
