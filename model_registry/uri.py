"""Check a ``models:/NAME@ALIAS`` URI before a server tries to load it.

``mlflow models serve`` on an alias nobody holds prints ~40 lines of traceback ending in
"Registered model alias production not found". Right after ``make demo`` that is the normal case:
the demo's version waits at ``staging`` for a person. ``alias_hint`` says so, with the command.
"""

from __future__ import annotations

import re

from damage.model_registry.registry import PRODUCTION, STAGING, alias_version, get_client
from damage.tasks.core.secrets import redact_uri

_ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")


def alias_hint(client_or_uri, model_uri: str) -> str | None:
    """None when ``model_uri`` is not an alias URI or the alias is set; else what to do, one line.

    Example:
        >>> alias_hint(client, "models:/damage-seg@production")  # doctest: +SKIP
        "no version of 'damage-seg' holds the alias 'production' yet; version 3 waits at 'staging': ..."
    """
    m = _ALIAS_URI.match(model_uri)
    if m is None:
        return None
    name, alias = m["name"], m["alias"]
    c = get_client(client_or_uri)
    if alias_version(c, name, alias) is not None:
        return None
    versions = sorted((int(v.version) for v in c.search_model_versions(f"name = '{name}'")), reverse=True)
    if not versions:
        return (f"no registered model '{name}' in {redact_uri(c.tracking_uri)}: run the pipeline first "
                f"(`damage run --demo`), or give a model URI (`damage serve models:/NAME/VERSION`)")
    head = f"no version of '{name}' holds the alias '{alias}' yet"
    staged = alias_version(c, name, STAGING)
    if alias == PRODUCTION and staged is not None:
        return (f"{head}; version {staged} waits at '{STAGING}': approve it with "
                f"`damage registry approve {name} {staged} --by YOU --reason \"...\"`, "
                f"or serve it now with `damage serve models:/{name}@{STAGING}`")
    return (f"{head}; registered versions: {', '.join(map(str, versions[:5]))} "
            f"(`damage registry list {name}`); serve one with `damage serve models:/{name}/{versions[0]}`")
