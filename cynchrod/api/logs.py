"""Logs: a bounded tail over HTTP and a live stream over a WebSocket (flask-sock).

Both go through the runtime protocol (``Runtime.tail`` / ``Runtime.follow``), so
they work the same on every runtime. The stream follows the app through
restarts and redeploys; it ends when the app is deleted (``1000 app_removed``),
the token is revoked (checked every second), or the client leaves, and then the
runtime's followers are closed on this thread: nothing outlives the socket.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Response, jsonify, request

from cynchrod import store
from cynchrod.api import ApiError, sock
from cynchrod.api.auth import TICKET_TTL_S, bearer, daemon, visible_app
from cynchrod.errors import CynchrodError

if TYPE_CHECKING:
    from cynchrod.daemon import Front

bp = Blueprint("logs", __name__)
DEFAULT_TAIL = 200
MAX_TAIL = 2000
MAX_STREAMS = 16
QUEUE_LINES = 1000
_END = object()
_streams = threading.BoundedSemaphore(MAX_STREAMS)

# WebSocket close codes (4000-4999 are the application's).
CLOSE_UNAUTHORIZED = 4401
CLOSE_NOT_FOUND = 4404
CLOSE_BUSY = 4429
CLOSE_NORMAL = 1000


def _tail() -> int:
    raw = request.args.get("tail", str(DEFAULT_TAIL))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_TAIL:
        raise ApiError("invalid_tail", f"tail must be an integer from 1 to {MAX_TAIL}, got {raw[:20]!r}")
    return int(raw)


@bp.get("/apps/<app_id>/logs")
def tail(app_id: str) -> Response:
    app = visible_app(bearer(), app_id)
    n = _tail()
    lines = [] if app.status == store.REMOVED else daemon().runtime.tail(app.org, app.name, n)
    return jsonify({"app_id": app.id, "tail": n, "lines": [line.to_json() for line in lines]})


@bp.post("/apps/<app_id>/logs/ticket")
def ticket(app_id: str) -> Response:
    token = bearer()
    app = visible_app(token, app_id)
    return jsonify({"ticket": daemon().tickets.issue(token, app.id), "expires_in": int(TICKET_TTL_S)})


def _stream_token(app_id: str) -> store.Token | None:
    d = daemon()
    if (secret := request.args.get("token")) is not None:
        return d.store.authenticate(secret)
    if (ticket_value := request.args.get("ticket")) is not None:
        token_id = d.tickets.redeem(ticket_value, app_id)
        token = d.store.token_by_id(token_id) if token_id else None
        return token if token is not None and token.revoked_at is None else None
    return None


@sock.route("/apps/<app_id>/logs/stream")
def stream(ws: Any, app_id: str) -> None:
    d = daemon()
    token = _stream_token(app_id)
    if token is None:
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
        _pump(ws, d, token, app)
    finally:
        _streams.release()


def _pump(ws: Any, d: Front, token: store.Token, app: store.App) -> None:
    ended = threading.Event()
    try:
        follower = d.runtime.follow(app.org, app.name, since=time.time(), ended=ended)
    except CynchrodError:
        ws.close(1011, "docker_unavailable")
        return
    lines: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_LINES)
    done = threading.Event()

    def read() -> None:
        try:
            for line in follower:
                while not done.is_set():
                    try:
                        lines.put(line, timeout=0.5)  # a slow client slows the reader: bounded memory
                        break
                    except queue.Full:
                        continue
                if done.is_set():
                    return
        except CynchrodError:
            pass
        finally:
            with contextlib.suppress(queue.Full):
                lines.put_nowait(_END)

    reader = threading.Thread(target=read, daemon=True, name=f"logs-{app.id}")
    reader.start()
    last_check = time.monotonic()
    try:
        while ws.connected:
            try:
                item = lines.get(timeout=0.5)
            except queue.Empty:
                item = None
            if item is _END:
                break
            if item is not None:
                ws.send(json.dumps(item.to_json()))
            if time.monotonic() - last_check >= 1.0:
                last_check = time.monotonic()
                if not d.store.is_live_token(token.id):
                    ws.close(CLOSE_UNAUTHORIZED, "token_revoked")
                    return
                now = d.store.app(app.id)
                if now is None or now.status == store.REMOVED:
                    ended.set()
                    ws.close(CLOSE_NORMAL, "app_removed")
                    return
        if ws.connected:
            ws.close(CLOSE_NORMAL, "stream_ended")
    except ConnectionError:
        pass
    finally:
        done.set()
        ended.set()
        follower.close()
        reader.join(5)
