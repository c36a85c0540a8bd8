"""infra/prefect.yaml is generated from flows/deploy.py, and `prefect deploy` reads what `damage schedule` builds."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from damage.flows.deploy import PREFECT_YAML, build_deployments, prefect_yaml
from damage.tasks.core.config_load import load_config

REPO = Path(__file__).resolve().parents[2]


def test_prefect_yaml_is_generated_from_deploy_py():
    assert PREFECT_YAML.read_text() == prefect_yaml(load_config()), (
        "infra/prefect.yaml differs from flows/deploy.py: regenerate it with "
        "`python -m damage.flows.deploy infra/prefect.yaml`")


def test_prefect_deploy_reads_the_same_deployments(monkeypatch):
    from prefect.cli.deploy._config import _load_deploy_configs_and_actions
    from prefect.flows import load_flow_from_entrypoint

    from damage.flows.nightly import FLOW_RETRIES, FLOW_RETRY_DELAY_S

    read, actions = _load_deploy_configs_and_actions(PREFECT_YAML, console=Console(quiet=True))
    assert actions["pull"]  # the worker runs from the checkout
    built = {d.name: d for d in build_deployments(load_config())}
    assert [d["name"] for d in read] == list(built) == ["nightly", "promote", "compress"]
    monkeypatch.chdir(REPO)  # prefect deploy runs from the repository root
    for d in read:
        b = built[d["name"]]
        assert d["entrypoint"] == b.entrypoint and d["parameters"] == b.parameters
        assert set(d["tags"]) == set(b.tags) and d["description"] == b.description
        assert d["work_pool"]["name"] == "damage-process"
        assert [(s["cron"], s["timezone"]) for s in d.get("schedules", [])] == [
            (s.schedule.cron, s.schedule.timezone) for s in b.schedules or []]
        if b.concurrency_limit:
            assert d["concurrency_limit"] == {"limit": b.concurrency_limit, "collision_strategy": "ENQUEUE"}
        flow = load_flow_from_entrypoint(d["entrypoint"])
        assert flow.name == b.flow_name
        if d["name"] == "nightly":  # the worker's flow object retries a failed night
            assert (flow.retries, flow.retry_delay_seconds) == (FLOW_RETRIES, FLOW_RETRY_DELAY_S)
    cfg = load_config()
    assert read[0]["schedules"][0]["cron"] == cfg.schedule.cron


def test_work_pool_entrypoints_are_module_paths_of_the_retried_flow():
    deps = {d.name: d for d in build_deployments(load_config(), work_pool="damage-process", schedule=False)}
    assert deps["nightly"].entrypoint == "damage.flows.nightly.scheduled_nightly"
    assert deps["compress"].entrypoint == "damage.flows.compress.compress_flow"
