"""Bearer tokens scoped to an org, and single-use log-stream tickets."""

from __future__ import annotations

import secrets
import threading
import time
from typing import TYPE_CHECKING, cast

from flask import current_app, g, request

from cynchrod import store
from cynchrod.api import ApiError

if TYPE_CHECKING:
    from cynchrod.daemon import Daemon

TICKET_TTL_S = 30.0


def daemon() -> Daemon:
    return cast("Daemon", current_app.extensions["cynchrod"])


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


class Tickets:
    """Short-lived single-use tickets for the WebSocket URL (in memory, one process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tickets: dict[str, tuple[str, str, float]] = {}

    def issue(self, token: store.Token, app_id: str) -> str:
        ticket = "tkt_" + secrets.token_urlsafe(24)
        now = time.monotonic()
        with self._lock:
            self._tickets = {k: v for k, v in self._tickets.items() if v[2] > now}
            self._tickets[ticket] = (token.id, app_id, now + TICKET_TTL_S)
        return ticket

    def redeem(self, ticket: str, app_id: str) -> str | None:
        """The token id the ticket was issued to, once, for this app, before it expires."""
        with self._lock:
            entry = self._tickets.pop(ticket, None)
        if entry is None or entry[1] != app_id or entry[2] < time.monotonic():
            return None
        return entry[0]
