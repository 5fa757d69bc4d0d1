"""Logs' routes: ``GET /apps/<id>/logs`` (a bounded tail), ``POST .../logs/ticket`` and the
WebSocket ``.../logs/stream`` (flask-sock), which hands each client to ``pump``.

Both go through the runtime protocol (``Runtime.tail`` / ``Runtime.follow``), so they
work the same on every runtime.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from flask import Blueprint, Response, jsonify, request
from werkzeug.routing import WebsocketMismatch

from cynchrod import store
from cynchrod.api import ApiError, is_ascii_number, sock
from cynchrod.api.auth import bearer, daemon, failed, not_throttled, visible_app
from cynchrod.api.logs.frames import CLOSE_BUSY, CLOSE_NOT_FOUND, CLOSE_UNAUTHORIZED
from cynchrod.api.logs.pump import pump
from cynchrod.shell.front import TICKET_TTL_S

bp = Blueprint("logs", __name__)
DEFAULT_TAIL = 200
MAX_TAIL = 2000
MAX_STREAMS = 256
_streams = threading.BoundedSemaphore(MAX_STREAMS)


def _tail() -> int:
    raw = request.args.get("tail", str(DEFAULT_TAIL))
    if not is_ascii_number(raw) or not 1 <= int(raw) <= MAX_TAIL:
        raise ApiError("invalid_tail", f"tail must be an integer from 1 to {MAX_TAIL}, got {raw[:20]!r}")
    return int(raw)


def _live(app: store.App) -> None:
    """A removed app has no logs to read or follow: said as ``409 app_removed`` (as the imperative
    calls say it), not an empty list a client cannot tell from a quiet app."""
    if app.status == store.REMOVED:
        raise ApiError("app_removed", f"app {app.org}/{app.name} is removed (deleted from the repository); "
                                      "it stays only as history")


@bp.get("/apps/<app_id>/logs")
def tail(app_id: str) -> Response:
    app = visible_app(bearer(), app_id)
    n = _tail()
    _live(app)
    lines = daemon().runtime.tail(app.org, app.name, n)
    return jsonify({"app_id": app.id, "tail": n, "lines": [line.to_json() for line in lines]})


@bp.post("/apps/<app_id>/logs/ticket")
def ticket(app_id: str) -> Response:
    token = bearer()
    app = visible_app(token, app_id)
    _live(app)
    return jsonify({"ticket": daemon().tickets.issue(token, app.id), "expires_in": int(TICKET_TTL_S)})


def _stream_token(app_id: str) -> tuple[store.Token | None, str | None]:
    """The stream's token, and the hash of the dashboard session its ticket was issued to."""
    d = daemon()
    if (secret := request.args.get("token")) is not None:
        return d.store.authenticate(secret), None
    if (ticket_value := request.args.get("ticket")) is not None:
        issued = d.tickets.redeem(ticket_value, app_id)
        token = d.store.token_by_id(issued[0]) if issued else None
        if token is None or token.revoked_at is not None or issued is None:
            return None, None
        if issued[1] is not None and not d.store.is_live_session(issued[1]):
            return None, None
        return token, issued[1]
    return None, None


#: flask-sock registers its routes on a blueprint of its own, ``__flask_sock``.
STREAM_ENDPOINT = "__flask_sock.stream"
_STREAM_PATH = re.compile(r"/apps/([^/]+)/logs/stream")


def _credential() -> bool:
    return request.args.get("token") is not None or request.args.get("ticket") is not None


@bp.before_app_request
def _before_stream() -> None:
    """Before the WebSocket upgrade (flask-sock's view upgrades first, then runs ``stream``): a
    client backing off (``throttle``) is ``429 too_many_attempts``, and a plain GET gets an HTTP
    answer in the order every endpoint checks: 401 for a wrong or missing token or ticket (a
    ticket is looked at, not spent), 404 for an app it cannot see, else ``400 not_a_websocket``."""
    if request.endpoint == STREAM_ENDPOINT:  # an upgrade request
        if _credential():
            not_throttled()
        return
    # The stream's rule matches upgrade requests only: a plain GET of its path is a routing error.
    if not isinstance(request.routing_exception, WebsocketMismatch) or request.method != "GET":
        return
    plain = _STREAM_PATH.fullmatch(request.path)
    if plain is None:
        return
    if _credential():
        not_throttled()
    d, app_id = daemon(), plain.group(1)
    token: store.Token | None = None
    if (secret := request.args.get("token")) is not None:
        token = d.store.authenticate(secret)
    elif (ticket_value := request.args.get("ticket")) is not None:
        token_id = d.store.ticket_token(ticket_value, app_id)
        token = d.store.token_by_id(token_id) if token_id else None
        token = token if token is not None and token.revoked_at is None else None
    if token is None:
        if _credential():
            failed()
        raise ApiError("unauthorized", "a log stream needs ?token= or ?ticket=, valid for this app")
    visible_app(token, app_id)
    raise ApiError("not_a_websocket", "this URL is a WebSocket: send an upgrade request (Upgrade: websocket)")


@sock.route("/apps/<app_id>/logs/stream")
def stream(ws: Any, app_id: str) -> None:
    d = daemon()
    token, session = _stream_token(app_id)
    if token is None:
        if _credential():
            failed()
        ws.close(CLOSE_UNAUTHORIZED, "unauthorized")
        return
    app = d.store.app(app_id)
    if app is None or not token.sees(app.org):
        ws.close(CLOSE_NOT_FOUND, "not_found")
        return
    if not _streams.acquire(blocking=False):
        ws.close(CLOSE_BUSY, "too_many_streams")
        return
    try:
        pump(ws, d, token, app, session=session)
    finally:
        _streams.release()
