"""Bearer tokens scoped to an org, and single-use log-stream tickets."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from flask import current_app, g, request

from cynchrod import store
from cynchrod.api import ApiError, throttle

if TYPE_CHECKING:
    from cynchrod.shell.front import Front

def daemon() -> Front:
    return cast("Front", current_app.extensions["cynchrod"])


def _failures() -> throttle.Table:
    return cast("throttle.Table", current_app.extensions["cynchrod.failures"])


def refused_for() -> int | None:
    """Seconds this client must wait before its credentials are looked at again (``throttle``), or None."""
    return _failures().refused_for(request.remote_addr)


def not_throttled() -> None:
    """``429 too_many_attempts`` with ``Retry-After`` for a client that failed too often."""
    if (wait := refused_for()) is not None:
        raise ApiError("too_many_attempts", f"too many failed attempts to authenticate from this address; "
                                            f"retry in {wait}s", retry_after=wait)


def failed() -> None:
    """Count a wrong credential against this client (``throttle``)."""
    _failures().failed(request.remote_addr)


def bearer() -> store.Token:
    """The token of this request, or a 401 (a 429 while this client is backing off, see ``throttle``).
    The header name is case-insensitive."""
    header = request.headers.get("Authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise ApiError("unauthorized", "missing bearer token")
    not_throttled()
    token = daemon().store.authenticate(secret.strip())
    if token is None:
        failed()
        raise ApiError("unauthorized", "invalid or revoked token")
    g.token_name = token.name
    return token


def visible_app(token: store.Token, app_id: str) -> store.App:
    """The app if this token's org may see it; another org's app is the same 404 as a missing one."""
    app = daemon().store.app(app_id)
    if app is None or not token.sees(app.org):
        raise ApiError("not_found", f"no app {app_id}")
    return app
