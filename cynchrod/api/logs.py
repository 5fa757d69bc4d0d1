"""Logs: a bounded tail over HTTP and a live stream over a WebSocket (flask-sock).

Both go through the runtime protocol (``Runtime.tail`` / ``Runtime.follow``), so
they work the same on every runtime. One follower per app per worker process (a
hub) feeds every client of that app; each WebSocket message is a JSON array of
line objects: the lines waiting, gathered for at most ``BATCH_WAIT_S`` and at
most ``BATCH_BYTES``. The stream follows the app through restarts and
redeploys; it ends when the app is deleted (``1000 app_removed``), the token is
revoked (checked every second), or the client leaves; the hub's follower is
closed with its last client: nothing outlives the sockets.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Response, jsonify, request

from cynchrod import store
from cynchrod.api import ApiError, is_ascii_number, sock
from cynchrod.api.auth import TICKET_TTL_S, bearer, daemon, visible_app
from cynchrod.errors import CynchrodError
from cynchrod.runtime import LogLine

if TYPE_CHECKING:
    from cynchrod.daemon import Front

bp = Blueprint("logs", __name__)
DEFAULT_TAIL = 200
MAX_TAIL = 2000
MAX_STREAMS = 256
#: Lines a client may fall behind its app before it loses the oldest (it alone).
QUEUE_LINES = 5000
#: A message holds the lines waiting, up to this many bytes of JSON ...
BATCH_BYTES = 64 * 1024
#: ... gathered for at most this long after the first (unless this many are already waiting).
BATCH_WAIT_S = 0.02
BATCH_LINES = 500
#: Lines are encoded once per app in pieces of about this size, which messages then join.
PIECE_BYTES = 16 * 1024
_streams = threading.BoundedSemaphore(MAX_STREAMS)

# WebSocket close codes (4000-4999 are the application's).
CLOSE_UNAUTHORIZED = 4401
CLOSE_NOT_FOUND = 4404
CLOSE_BUSY = 4429
CLOSE_NORMAL = 1000


def _tail() -> int:
    raw = request.args.get("tail", str(DEFAULT_TAIL))
    if not is_ascii_number(raw) or not 1 <= int(raw) <= MAX_TAIL:
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


_encode = json.encoder.encode_basestring_ascii


def encode_lines(lines: list[LogLine]) -> list[tuple[str, int]]:
    """``lines`` as pieces of a message's JSON array (``LogLine.to_json`` objects, comma
    separated, no brackets), each at most about ``PIECE_BYTES``, with its count of lines.
    Done once per batch for all the clients of the app."""
    pieces: list[tuple[str, int]] = []
    out: list[str] = []
    size = 0
    services: dict[str, str] = {}
    for line in lines:
        service = services.get(line.service)
        if service is None:
            service = services[line.service] = _encode(line.service)
        text = f'{{"service":{service},"timestamp":{_encode(line.timestamp)},"line":{_encode(line.line)}'
        if line.replica:
            text += f',"replica":{int(line.replica)}'
        if line.node:
            text += f',"node":{_encode(line.node)}'
        out.append(text + "}")
        size += len(text) + 2
        if size >= PIECE_BYTES:
            pieces.append((",".join(out), len(out)))
            out, size = [], 0
    if out:
        pieces.append((",".join(out), len(out)))
    return pieces


class _Subscriber:
    """One client's share of a hub: a bounded buffer of encoded pieces and a wake-up."""

    def __init__(self) -> None:
        self.pieces: collections.deque[tuple[str, int]] = collections.deque()
        self.lines = 0
        self.dropped = 0
        self.ready = threading.Event()
        self.ended = False

    def put(self, pieces: list[tuple[str, int]]) -> None:
        for piece in pieces:
            self.pieces.append(piece)
            self.lines += piece[1]
        while self.lines > QUEUE_LINES and len(self.pieces) > 1:
            _, n = self.pieces.popleft()  # this client reads slower than the app logs: it, alone, loses lines
            self.lines -= n
            self.dropped += n
        self.ready.set()

    def end(self) -> None:
        self.ended = True
        self.ready.set()


class _Hub:
    """One engine follower per app in this worker process, shared by all its clients:
    twenty clients of one app cost one set of engine streams and one JSON encoding per line."""

    def __init__(self, key: tuple[str, str], d: Front) -> None:
        self.key = key
        self.subscribers: set[_Subscriber] = set()
        self.ended = threading.Event()
        self.follower = d.runtime.follow(key[0], key[1], since=time.time(), ended=self.ended)
        self.reader = threading.Thread(target=self._read, daemon=True, name=f"logs-{key[0]}-{key[1]}")

    def _batches(self) -> Iterator[list[LogLine]]:
        batches = getattr(self.follower, "batches", None)
        if batches is not None:
            yield from batches()
        else:
            for line in self.follower:
                yield [line]

    def _read(self) -> None:
        try:
            for batch in self._batches():
                pieces = encode_lines(batch)
                with _hubs_lock:
                    for sub in self.subscribers:
                        sub.put(pieces)
        except CynchrodError:
            pass
        finally:
            with _hubs_lock:
                if _hubs.get(self.key) is self:
                    del _hubs[self.key]
                for sub in self.subscribers:
                    sub.end()

    def close(self) -> None:
        self.ended.set()
        self.follower.close()


_hubs: dict[tuple[str, str], _Hub] = {}
_hubs_lock = threading.Lock()


def _subscribe(d: Front, app: store.App) -> tuple[_Hub, _Subscriber]:
    sub = _Subscriber()
    with _hubs_lock:
        hub = _hubs.get(app.key)
        fresh = hub is None
        if hub is None:
            hub = _hubs[app.key] = _Hub(app.key, d)
        hub.subscribers.add(sub)
    if fresh:
        hub.reader.start()
    return hub, sub


def _unsubscribe(hub: _Hub, sub: _Subscriber) -> None:
    with _hubs_lock:
        hub.subscribers.discard(sub)
        last = not hub.subscribers
        if last and _hubs.get(hub.key) is hub:
            del _hubs[hub.key]
    if last:
        hub.close()
        hub.reader.join(5)


def _batch(sub: _Subscriber) -> str:
    """The lines waiting, as one JSON array (a message), at most about ``BATCH_BYTES`` of it."""
    out: list[str] = []
    size = 2
    with _hubs_lock:
        dropped, sub.dropped = sub.dropped, 0
        while sub.pieces and size < BATCH_BYTES:
            text, n = sub.pieces.popleft()
            sub.lines -= n
            out.append(text)
            size += len(text) + 1
        if sub.pieces:
            sub.ready.set()
    if dropped:
        out.insert(0, json.dumps({"service": "", "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                  "line": f"[cynchrod: {dropped} lines dropped: this client reads slower than "
                                          "the app writes]", "dropped": dropped}))
    return "[" + ",".join(out) + "]"


def _pump(ws: Any, d: Front, token: store.Token, app: store.App) -> None:
    try:
        hub, sub = _subscribe(d, app)
    except CynchrodError:
        ws.close(1011, "docker_unavailable")
        return
    last_check = time.monotonic()
    try:
        while ws.connected:
            if sub.ready.wait(0.5):
                # A few tens of milliseconds for more lines to join this message: a flood goes
                # in large messages, a trickle still arrives at once.
                if sub.lines < BATCH_LINES and not sub.ended:
                    time.sleep(BATCH_WAIT_S)
                sub.ready.clear()
                if sub.pieces or sub.dropped:
                    ws.send(_batch(sub))
                elif sub.ended:
                    break
            if time.monotonic() - last_check >= 1.0:
                last_check = time.monotonic()
                if not d.store.is_live_token(token.id):
                    ws.close(CLOSE_UNAUTHORIZED, "token_revoked")
                    return
                now = d.store.app(app.id)
                if now is None or now.status == store.REMOVED:
                    ws.close(CLOSE_NORMAL, "app_removed")
                    return
        if ws.connected:
            ws.close(CLOSE_NORMAL, "stream_ended")
    except ConnectionError:
        pass
    finally:
        _unsubscribe(hub, sub)
