"""Provision MLflow basic-auth accounts and per-model permissions for the promotion policy.

Run as the MLflow admin (``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` of the
admin account in the environment; MLflow's auth client reads them per request)::

    python -m damage.model_registry.auth http://mlflow:5000 damage-seg \\
        --pipeline pipeline:$PIPELINE_PW --approver approver:$APPROVER_PW

What MLflow enforces server-side is per registered model and per experiment, not per alias (see
infra/mlflow-auth/README.md): on ``damage-seg`` the pipeline gets EDIT (create versions, tags, set
aliases), approvers get MANAGE. The approval records live in the model and the experiment
``damage-seg-approved`` (``damage.model_registry.frozen``): approvers MANAGE, the pipeline READ. So the
server itself refuses the pipeline an approval record or a move of its ``production`` alias, and
every reader of ``production`` checks ``damage-seg@production`` against that record.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from mlflow.exceptions import MlflowException

from damage.tasks.core.secrets import redact_uri

PIPELINE_PERMISSION = "EDIT"
APPROVER_PERMISSION = "MANAGE"


def _client(tracking_uri: str):
    from mlflow.server import get_app_client

    return get_app_client("basic-auth", tracking_uri=tracking_uri)


def ensure_user(tracking_uri: str, username: str, password: str) -> bool:
    """Create ``username`` if missing; returns True when it was created."""
    auth = _client(tracking_uri)
    try:
        auth.get_user(username)
        return False
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" not in str(e.error_code):
            raise
    auth.create_user(username, password)
    return True


def grant_model_permission(tracking_uri: str, username: str, model_name: str, permission: str) -> None:
    """Grant (or update) ``permission`` (READ/EDIT/MANAGE) on registered model ``model_name``."""
    _client(tracking_uri).grant_user_permission(username, "registered_model", model_name, permission)


def provision(tracking_uri: str, model_name: str, pipeline: tuple[str, str],
              approvers: Sequence[tuple[str, str]], readers: Sequence[tuple[str, str]] = ()) -> None:
    """Create the accounts, the registered model (owned by the admin) and the grants.

    Args:
        tracking_uri: ``http(s)://`` URI of an ``mlflow server --app-name basic-auth``.
        model_name: registered model (created here so that the pipeline does not own it:
            the creator of a model gets MANAGE on it).
        pipeline: ``(user, password)`` of the nightly pipeline: EDIT on the model.
        approvers: ``(user, password)`` pairs: MANAGE on the model.
        readers: accounts that only get the server's ``default_permission`` (READ by default).
    """
    from mlflow.tracking import MlflowClient

    for user, pw in (pipeline, *approvers, *readers):
        ensure_user(tracking_uri, user, pw)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        client.create_registered_model(model_name, description="vehicle-damage segmentation (damage pipeline)")
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise
    grant_model_permission(tracking_uri, pipeline[0], model_name, PIPELINE_PERMISSION)
    for user, _ in approvers:
        grant_model_permission(tracking_uri, user, model_name, APPROVER_PERMISSION)
    provision_approved(tracking_uri, model_name, pipeline[0], [u for u, _ in approvers])


def provision_approved(tracking_uri: str, model_name: str, pipeline: str, approvers: Sequence[str]) -> None:
    """Create ``<model>-approved`` (model and experiment) as admin: approvers MANAGE, the pipeline READ."""
    from mlflow.tracking import MlflowClient

    from damage.model_registry.frozen import approved_name

    name = approved_name(model_name)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        client.create_registered_model(name, description=f"approval records of '{model_name}' (approvers only)")
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name)
    auth = _client(tracking_uri)
    for user, perm in ((pipeline, "READ"), *((u, APPROVER_PERMISSION) for u in approvers)):
        auth.grant_user_permission(user, "registered_model", name, perm)
        auth.grant_user_permission(user, "experiment", exp_id, perm)


def _pair(text: str) -> tuple[str, str]:
    user, sep, pw = text.partition(":")
    if not sep or not user or not pw:
        raise argparse.ArgumentTypeError(f"expected USER:PASSWORD, got {text!r}")
    return user, pw


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Provision MLflow basic-auth accounts for model promotion.")
    p.add_argument("tracking_uri")
    p.add_argument("model_name")
    p.add_argument("--pipeline", type=_pair, required=True, help="USER:PASSWORD of the pipeline account")
    p.add_argument("--approver", type=_pair, action="append", required=True, help="USER:PASSWORD (repeatable)")
    p.add_argument("--reader", type=_pair, action="append", default=[], help="USER:PASSWORD (repeatable)")
    a = p.parse_args(argv)
    provision(a.tracking_uri, a.model_name, a.pipeline, a.approver, a.reader)
    print(f"provisioned '{a.model_name}' at {redact_uri(a.tracking_uri)}: pipeline={a.pipeline[0]} (EDIT), "
          f"approvers={[u for u, _ in a.approver]} (MANAGE)")


if __name__ == "__main__":
    main()
