"""Bearer tokens scoped to an org, and single-use log-stream tickets."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from flask import current_app, g, request

from cynchrod import store
from cynchrod.api import ApiError

if TYPE_CHECKING:
    from cynchrod.shell.front import Front

def daemon() -> Front:
    return cast("Front", current_app.extensions["cynchrod"])


def bearer() -> store.Token:
    """The token of this request, or a 401. The header name is case-insensitive."""
    header = request.headers.get("Authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise ApiError("unauthorized", "missing bearer token")
    token = daemon().store.authenticate(secret.strip())
    if token is None:
        raise ApiError("unauthorized", "invalid or revoked token")
    g.token_name = token.name
    return token


def visible_app(token: store.Token, app_id: str) -> store.App:
    """The app if this token's org may see it; another org's app is the same 404 as a missing one."""
    app = daemon().store.app(app_id)
    if app is None or not token.sees(app.org):
        raise ApiError("not_found", f"no app {app_id}")
    return app
