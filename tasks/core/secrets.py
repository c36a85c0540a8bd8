"""Keep credentials out of logs, params, hashes and files (standard library only).

A tracking URI may carry a password (``http://user:pw@host:5000``); MLflow accepts it, but
everything the pipeline records (MLflow params, ``config/resolved.yaml``, ``last_run.json``,
the skip summary, the config hash) must not. ``redact_uri`` drops the ``user:password@`` part
and credential-looking query parameters; ``redact_config`` applies it to every string of a
nested config dict. Pass credentials through ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD`` (or ``~/.mlflow/credentials``) instead.

Example:
    >>> redact_uri("http://pipeline:s3cret@mlflow:5000/")
    'http://mlflow:5000/'
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

_SECRET_QUERY = re.compile(r"(pass|pwd|secret|token|key|signature|credential|^sig$|^auth|session)", re.I)
_URI = re.compile(r"^[a-z][a-z0-9+.-]*://", re.I)
_USER = re.compile(r"^([a-z][a-z0-9+.-]*://)([^:/?#@]+)(:?)", re.I)


def split_userinfo(uri: str) -> tuple[str, str | None, str | None]:
    """``(uri without user[:password]@, user, password)`` (raw, not unquoted); user None when there is none.

    The password may hold '/', '#', '?' or '@' unencoded (``urlsplit`` would cut the authority at the first
    of them and leave the rest of the password in the path): the userinfo ends at the first '@' followed by
    a host and then '/', '?', '#' or the end. One pass over the string.

    Example:
        >>> split_userinfo("http://u:p/a#b?c@host:5000/x")
        ('http://host:5000/x', 'u', 'p/a#b?c')
    """
    m = _USER.match(uri) if isinstance(uri, str) else None
    if not m:
        return uri, None, None
    scheme, user, i = m[1], m[2], m.end()
    if not m[3]:  # no password: "user@host"
        return (scheme + uri[i + 1:], user, None) if uri[i:i + 1] == "@" else (uri, None, None)
    at = uri.find("@", i)
    while at >= 0:
        e = at + 1
        while e < len(uri) and uri[e] not in "/?#@":
            e += 1
        if e == len(uri) or uri[e] != "@":
            pw = uri[i:at]
            if re.fullmatch(r"\d*", re.split(r"[/?#]", pw, maxsplit=1)[0]) and re.search(r"[/?#]", pw):
                return uri, None, None  # "host:5000/path@x": a port and a path, not a password
            return scheme + uri[at + 1:], user, pw
        at = e
    return uri, None, None


def redact_uri(uri: str) -> str:
    """``uri`` without ``user[:password]@`` and without credential-like query parameters.

    Non-URI strings are returned unchanged.
    """
    if not isinstance(uri, str) or not _URI.match(uri):
        return uri
    uri = split_userinfo(uri)[0]
    try:
        parts = urlsplit(uri)
    except ValueError:
        return re.sub(r"//[^/@]*@", "//", uri)
    pairs = parse_qsl(parts.query, keep_blank_values=True) if parts.query else []
    secret_query = any(_SECRET_QUERY.search(k) for k, _ in pairs)
    if "@" not in parts.netloc and not secret_query:
        return uri  # nothing to hide: returned verbatim (urlunsplit would rewrite sqlite:////abs paths)
    query = urlencode([(k, "REDACTED" if _SECRET_QUERY.search(k) else v) for k, v in pairs]) if secret_query \
        else parts.query
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """``text`` with every URI in it passed through ``redact_uri`` (error messages, log lines).

    Example:
        >>> redact_text("cannot reach http://u:pw@h:1/x: refused")
        'cannot reach http://h:1/x: refused'
    """
    return re.sub(r"[a-z][a-z0-9+.-]*://\S+", lambda m: redact_uri(m[0]), str(text), flags=re.I)


def has_credentials(uri: str) -> bool:
    """True when ``uri`` carries a ``user:password@`` part or a credential query parameter."""
    return isinstance(uri, str) and redact_uri(uri) != uri


def redact_config(obj: Any) -> Any:
    """A copy of a nested dict/list structure with every URI string passed through ``redact_uri``."""
    if isinstance(obj, dict):
        return {k: redact_config(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_config(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(redact_config(v) for v in obj)
    return redact_uri(obj) if isinstance(obj, str) else obj


def move_uri_credentials_to_env(uri: str | None) -> str | None:
    """Take ``user:password@`` out of an MLflow tracking URI and hand it to MLflow through
    ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (kept when already set: the
    environment wins); returns the URI without them, which is what gets logged and hashed.
    """
    import logging
    import os
    from urllib.parse import unquote

    if not uri or not has_credentials(uri):
        return uri
    _, user, password = split_userinfo(uri)
    if user is not None:
        if os.environ.get("MLFLOW_TRACKING_USERNAME") and os.environ["MLFLOW_TRACKING_USERNAME"] != unquote(user):
            logging.getLogger(__name__).warning(
                "tracking URI credentials ignored: MLFLOW_TRACKING_USERNAME is already set")
        else:
            os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(user)
            if password is not None:
                os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(password)
    return redact_uri(uri)
