"""Who is calling, as the MLflow server sees it (not as an environment variable says).

``MLFLOW_TRACKING_USERNAME`` is only what this process *claims*; against a server without
authentication any name would do. ``confirmed_identity`` asks the server
(``GET /api/2.0/mlflow/users/current`` of MLflow's basic-auth app) and fails closed: a server
that does not answer it has no accounts, so nobody can be confirmed as an approver there.
"""

from __future__ import annotations

from mlflow.exceptions import MlflowException

from damage.model_registry.errors import AccessDenied
from damage.tasks.core.secrets import redact_uri

CURRENT_USER = "/api/2.0/mlflow/users/current"


def confirmed_identity(tracking_uri: str) -> str:
    """The account the server authenticated this process as.

    Raises:
        AccessDenied: the server refused the credentials, or it has no authentication (no such
            endpoint): an approval there would be anybody's.
    """
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    where = redact_uri(tracking_uri)
    try:
        resp = http_request(get_default_host_creds(tracking_uri), CURRENT_USER, "GET", max_retries=0, timeout=30)
    except MlflowException as e:
        raise AccessDenied(f"cannot confirm the MLflow account at {where}: {e.message}") from None
    if resp.status_code in (401, 403):
        raise AccessDenied(f"MLflow server {where} refused this process's credentials (HTTP {resp.status_code})")
    if resp.status_code == 404:
        raise AccessDenied(f"MLflow server {where} has no authentication (no {CURRENT_USER}): nobody can be "
                           f"confirmed as an approver there; run it with --app-name basic-auth "
                           f"(infra/mlflow-auth/README.md)")
    try:
        name = resp.json()["user"]["username"]
    except (ValueError, KeyError, TypeError):
        raise AccessDenied(f"MLflow server {where}: unexpected answer to {CURRENT_USER} "
                           f"(HTTP {resp.status_code}); cannot confirm the account") from None
    return str(name)
