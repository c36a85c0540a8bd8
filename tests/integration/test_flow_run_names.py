"""Item 8 of issue 32: a nightly's Prefect flow run is named after its MLflow run (not "grateful-pug"),
so both UIs list the night by one name; the MLflow run's ``prefect.flow_run_name`` tag agrees."""

from __future__ import annotations


def test_flow_run_is_named_after_the_mlflow_run(prefect_harness, state_paths):
    from uuid import UUID

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    from damage.tasks.core import tracking
    from damage.tasks.core.config_load import load_config
    from damage.tasks.nightly.pipeline import open_pipeline_run
    from damage.tasks.nightly.reporting import link_runs

    @flow(name="names")
    def names() -> tuple[str, str, str]:
        cfg = load_config(overrides=["mlflow.experiment=flow-run-names"])
        run = open_pipeline_run(cfg)
        link_runs(cfg, run)
        return run.run_id, run.tracking_uri, str(flow_run.get_id())

    run_id, uri, fid = names()
    mlflow_run = tracking.client(uri).get_run(run_id)
    with get_client(sync_client=True) as client:
        fr = client.read_flow_run(UUID(fid))
    assert mlflow_run.info.run_name.startswith("nightly-")
    assert fr.name == mlflow_run.info.run_name
    assert mlflow_run.data.tags["prefect.flow_run_name"] == fr.name
    assert f"mlflow-run:{run_id}" in fr.tags
