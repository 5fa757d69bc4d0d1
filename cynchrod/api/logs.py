"""Logs: a bounded tail over HTTP and a live stream over a WebSocket (flask-sock).

Both go through the runtime protocol (``Runtime.tail`` / ``Runtime.follow``), so
they work the same on every runtime. One engine follower per app for all the API
worker processes (``_Hub``: the first worker with a client of the app follows the
engine and relays to the others through an abstract Unix socket) feeds every
client of that app. Each batch of lines is JSON-encoded once per worker, and each
WebSocket message is a JSON array of line objects: the lines gathered for at most
``BATCH_WAIT_S`` after the first and at most about ``BATCH_BYTES``, made once for
all the worker's clients of the app. The stream follows the app through restarts
and redeploys; it ends when the app is deleted (``1000 app_removed``), the token is
revoked (checked every second), or the client leaves; the follower is closed with
its last client in any worker: nothing outlives the sockets.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import pathlib
import socket
import struct
import threading
import time
import zlib
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Response, jsonify, request

from cynchrod import store
from cynchrod.api import ApiError, is_ascii_number, sock
from cynchrod.api.auth import bearer, daemon, visible_app
from cynchrod.core.errors import CynchrodError
from cynchrod.runtime import LogLine, LogStream
from cynchrod.shell.front import TICKET_TTL_S

if TYPE_CHECKING:
    from cynchrod.shell.front import Front

bp = Blueprint("logs", __name__)
DEFAULT_TAIL = 200
MAX_TAIL = 2000
MAX_STREAMS = 256
#: Lines a client may fall behind its app before it loses the oldest (it alone).
QUEUE_LINES = 5000
#: A message holds the lines waiting, up to this many bytes of JSON ...
BATCH_BYTES = 64 * 1024
#: ... gathered for at most this long after the first (unless this many are already waiting).
BATCH_WAIT_S = 0.05
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


class Frame:
    """One WebSocket text message (a JSON array of lines), framed once for all of a worker's
    clients of the app: each client's socket gets these bytes as they are (``_send``), not a
    message framed (and compressed) by wsproto per client, which cost 70 µs a message a client.

    A client that negotiated permessage-deflate gets the message compressed once with a fresh
    context (RFC 7692 lets the server use no context takeover whatever was negotiated, and a
    message that refers to nothing before it is decoded by any client's decompressor); every
    data message of a stream is sent this way, so wsproto's own compression context is never
    used and cannot go out of step with the client's."""

    __slots__ = ("_deflated", "_plain", "lines", "payload")

    def __init__(self, payload: bytes, lines: int) -> None:
        self.payload, self.lines = payload, lines
        self._plain: bytes | None = None
        self._deflated: bytes | None = None

    def plain(self) -> bytes:
        if self._plain is None:
            self._plain = _frame(0x81, self.payload)  # FIN, text
        return self._plain

    def deflated(self) -> bytes:
        if self._deflated is None:
            packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
            body = packer.compress(self.payload) + packer.flush(zlib.Z_SYNC_FLUSH)
            self._deflated = _frame(0xC1, body[:-4] if body.endswith(b"\x00\x00\xff\xff") else body)  # FIN, RSV1
        return self._deflated


def _frame(first: int, body: bytes) -> bytes:
    """A server-to-client WebSocket frame (never masked, RFC 6455 5.1): first byte, length, body."""
    size = len(body)
    if size < 126:
        return struct.pack(">BB", first, size) + body
    if size < 1 << 16:
        return struct.pack(">BBH", first, 126, size) + body
    return struct.pack(">BBQ", first, 127, size) + body


def _deflates(ws: Any) -> bool:
    """Whether this connection negotiated permessage-deflate (wsproto keeps the extensions
    it enabled in its frame protocol); False when that cannot be read (sent uncompressed,
    which is always valid)."""
    try:
        extensions = ws.ws.connection._proto.extensions
    except AttributeError:
        return False
    return any(getattr(ext, "name", "") == "permessage-deflate" for ext in extensions)


class _Subscriber:
    """One client's (or another worker's) share of a hub: a bounded buffer of messages and a wake-up."""

    def __init__(self) -> None:
        self.pieces: collections.deque[Frame] = collections.deque()
        self.lines = 0
        self.dropped = 0
        self.ready = threading.Event()
        self.ended = False

    def put(self, frames: list[Frame]) -> None:
        for frame in frames:
            self.pieces.append(frame)
            self.lines += frame.lines
        while self.lines > QUEUE_LINES and len(self.pieces) > 1:
            n = self.pieces.popleft().lines  # this client reads slower than the app logs: it, alone, loses lines
            self.lines -= n
            self.dropped += n
        self.ready.set()

    def end(self) -> None:
        self.ended = True
        self.ready.set()


class _Client(_Subscriber):
    """A WebSocket client in this worker. While its pump waits with nothing queued, the hub
    writes each message to its socket itself (``offer``: one non-blocking send, no wake-up
    of the client's greenlet, no lock); what the socket does not take at once, and every
    message after it, waits for the pump. Twenty clients of an app then cost twenty sends
    a message, not twenty wake-ups, queue rounds and sends."""

    def __init__(self, ws: Any) -> None:
        super().__init__()
        self.ws = ws
        self.deflate = _deflates(ws)
        # gevent's socket wraps a non-blocking native one, which never waits: None elsewhere, and
        # for a TLS socket (its native socket carries records, not frames; the API serves plain
        # HTTP today, behind the edge or a proxy for TLS).
        self.raw: socket.socket | None = (None if hasattr(ws.sock, "getpeercert")
                                          else getattr(ws.sock, "_sock", None))
        #: The pump is waiting for lines: nothing of this client's is being written.
        self.idle = False
        #: Bytes of a message the socket took only part of: written before anything else.
        self.rest = b""

    def data(self, frames: list[Frame]) -> bytes:
        return b"".join(frame.deflated() if self.deflate else frame.plain() for frame in frames)

    def offer(self, frames: list[Frame]) -> None:
        if not (self.idle and self.raw is not None and not self.pieces and not self.rest and not self.dropped):
            self.put(frames)
            return
        data = self.data(frames)
        try:
            sent = self.raw.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:  # gone: the pump finds out when it writes
            self.put(frames)
            return
        if sent < len(data):
            self.rest = data[sent:]
            self.ready.set()


_RELAYED = struct.Struct(">II")  # a relayed message: its payload's length, its count of lines


def relay_address(state: pathlib.Path, key: tuple[str, str]) -> str:
    """The abstract Unix socket through which one worker relays an app's lines to the others
    (Linux's abstract namespace: no file, released when its holder closes it or dies)."""
    digest = hashlib.sha256(f"{state.resolve()}\0{key[0]}\0{key[1]}".encode()).hexdigest()[:40]
    return f"\0cynchrod-logs-{digest}"


class _Peer(_Subscriber):
    """Another worker process following the app through this one: its pieces go down a socket."""

    def __init__(self, conn: socket.socket) -> None:
        super().__init__()
        self.conn = conn


class _Hub:
    """One engine follower per app for all the API worker processes, shared by all its clients.

    The first worker with a client of the app binds the app's relay address and follows the
    engine (the leader); a worker that finds the address taken reads the leader's pieces
    from it instead. Either way, each batch of lines is JSON-encoded once, and its clients'
    messages join those pieces. When the leader closes (its clients and its peers all
    left) or dies, a worker still reading from it takes over: binding is the election.
    Twenty clients of one app, in any workers, cost one set of engine streams."""

    def __init__(self, key: tuple[str, str], d: Front) -> None:
        self.key, self.d = key, d
        self.address = relay_address(d.settings.state, key)
        self.subscribers: set[_Subscriber] = set()
        self.ended = threading.Event()
        self.follower: LogStream | None = None
        self.acceptor: threading.Thread | None = None
        self.listener: socket.socket | None = None
        self.upstream: socket.socket | None = None
        #: Pieces not yet given to this worker's clients, gathered for a message.
        self.pending: list[tuple[str, int]] = []
        self.pending_lines = 0
        self.pending_ready = threading.Event()
        self._lead(start=False)  # a first engine follower that cannot be made is the client's error at once
        self.reader = threading.Thread(target=self._run, daemon=True, name=f"logs-{key[0]}-{key[1]}")
        self.flusher = threading.Thread(target=self._flush, daemon=True, name=f"logs-out-{key[0]}-{key[1]}")

    # -- leading ----------------------------------------------------------------

    def _lead(self, *, start: bool = True) -> bool:
        """Bind the relay address and follow the engine; False when another worker leads.
        ``start=False``: the caller starts ``acceptor`` (``Thread.start`` waits for the thread,
        so it is never called under ``_hubs_lock``)."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.address)
            listener.listen(64)
        except OSError:
            listener.close()
            return False
        try:
            self.follower = self.d.runtime.follow(self.key[0], self.key[1], since=time.time(), ended=self.ended)
        except BaseException:
            listener.close()
            raise
        self.listener = listener
        self.acceptor = threading.Thread(target=self._accept, args=(listener,), daemon=True, name="logs-relay")
        if start:
            self.acceptor.start()
        return True

    def _accept(self, listener: socket.socket) -> None:
        while not self.ended.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            peer = _Peer(conn)
            with _hubs_lock:
                if self.ended.is_set():
                    conn.close()
                    return
                self.subscribers.add(peer)
            threading.Thread(target=self._send_to, args=(peer,), daemon=True, name="logs-relay-out").start()
            threading.Thread(target=self._watch, args=(peer,), daemon=True, name="logs-relay-eof").start()

    def _send_to(self, peer: _Peer) -> None:
        try:
            while not peer.ended:
                peer.ready.wait(0.5)
                with _hubs_lock:
                    peer.ready.clear()
                    frames, peer.lines = list(peer.pieces), 0
                    peer.pieces.clear()
                if frames:
                    peer.conn.sendall(b"".join(_RELAYED.pack(len(f.payload), f.lines) + f.payload for f in frames))
        except OSError:
            pass
        finally:
            self._drop(peer)

    def _watch(self, peer: _Peer) -> None:
        """A peer never writes: end of file is its worker gone or its last client left."""
        with contextlib.suppress(OSError):
            peer.conn.recv(1)
        peer.end()
        self._drop(peer)

    def _drop(self, peer: _Peer) -> None:
        with contextlib.suppress(OSError):
            peer.conn.close()
        _unsubscribe(self, peer)

    # -- reading ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self.ended.is_set():
                if self.follower is not None or self._lead():
                    self._follow()
                    return
                self._relay()  # until the leader goes; then try to lead
        except CynchrodError:
            pass
        finally:
            with _hubs_lock:
                if _hubs.get(self.key) is self:
                    del _hubs[self.key]
                for sub in self.subscribers:
                    sub.end()

    def _follow(self) -> None:
        assert self.follower is not None
        for batch in self.follower.batches():
            self._publish(encode_lines(batch))

    def _relay(self) -> None:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(self.address)
        except OSError:  # the leader is closing: the next round elects
            upstream.close()
            time.sleep(0.01)
            return
        self.upstream = upstream
        buf = b""
        try:
            while not self.ended.is_set():
                data = upstream.recv(65536)
                if not data:
                    return
                buf += data
                frames, pos = [], 0
                while len(buf) - pos >= _RELAYED.size:
                    size, n = _RELAYED.unpack_from(buf, pos)
                    if len(buf) - pos - _RELAYED.size < size:
                        break
                    start = pos + _RELAYED.size
                    frames.append(Frame(buf[start:start + size], n))
                    pos = start + size
                buf = buf[pos:]
                if frames:
                    with _hubs_lock:
                        self._deliver(frames)  # messages made by the leader, given on as they are
        except OSError:
            return
        finally:
            self.upstream = None
            upstream.close()

    def _publish(self, pieces: list[tuple[str, int]]) -> None:
        """Lines read from the engine, gathered for ``_flush``."""
        with _hubs_lock:
            self.pending.extend(pieces)
            self.pending_lines += sum(n for _, n in pieces)
        self.pending_ready.set()

    def _deliver(self, frames: list[Frame]) -> None:
        """Messages to this worker's clients and to the other workers (held: ``_hubs_lock``)."""
        for sub in self.subscribers:
            if isinstance(sub, _Client):
                sub.offer(frames)
            else:
                sub.put(frames)

    def _flush(self) -> None:
        """Every client's messages, made once by the leader: the lines gathered for at most
        ``BATCH_WAIT_S`` after the first (a flood goes in large messages, a trickle still
        arrives at once), joined into messages of at most about ``BATCH_BYTES``, given to each
        client here and relayed whole to the other workers, which give them on at once (one
        relay write a message, not one an engine read)."""
        while not self.ended.is_set():
            if not self.pending_ready.wait(0.5):
                continue
            if self.pending_lines < BATCH_LINES:
                time.sleep(BATCH_WAIT_S)
            with _hubs_lock:
                self.pending_ready.clear()
                pieces, self.pending, self.pending_lines = self.pending, [], 0
                messages: list[tuple[str, int]] = []
                texts: list[str] = []
                size = lines = 0
                for text, n in pieces:
                    if texts and size + len(text) > BATCH_BYTES:
                        messages.append((",".join(texts), lines))
                        texts, size, lines = [], 0, 0
                    texts.append(text)
                    size += len(text) + 1
                    lines += n
                if texts:
                    messages.append((",".join(texts), lines))
                self._deliver([Frame(f"[{text}]".encode(), n) for text, n in messages])

    def close(self) -> None:
        with _hubs_lock:
            self.ended.set()
            self.pending_ready.set()
            peers = [sub for sub in self.subscribers if isinstance(sub, _Peer)]
        for closable in (self.listener, self.upstream, *(p.conn for p in peers)):
            if closable is not None:
                with contextlib.suppress(OSError):
                    closable.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    closable.close()
        if self.follower is not None:
            self.follower.close()


_hubs: dict[tuple[str, str], _Hub] = {}
_hubs_lock = threading.Lock()


def _subscribe(d: Front, app: store.App, sub: _Subscriber) -> _Hub:
    with _hubs_lock:
        hub = _hubs.get(app.key)
        fresh = hub is None
        if hub is None:
            hub = _hubs[app.key] = _Hub(app.key, d)
        hub.subscribers.add(sub)
    if fresh:
        for thread in (hub.acceptor, hub.reader, hub.flusher):
            if thread is not None:
                thread.start()
    return hub


def _unsubscribe(hub: _Hub, sub: _Subscriber) -> None:
    with _hubs_lock:
        if sub not in hub.subscribers:
            return
        hub.subscribers.discard(sub)
        last = not hub.subscribers
        if last and _hubs.get(hub.key) is hub:
            del _hubs[hub.key]
    if last:
        hub.close()
        if threading.current_thread() is not hub.reader:
            with contextlib.suppress(RuntimeError):  # not started yet
                hub.reader.join(5)


def _take(sub: _Subscriber) -> tuple[list[Frame], int]:
    """The frames waiting (at most about ``BATCH_BYTES`` of them) and the lines dropped since the last."""
    out: list[Frame] = []
    size = 0
    with _hubs_lock:
        dropped, sub.dropped = sub.dropped, 0
        while sub.pieces and size < BATCH_BYTES:
            frame = sub.pieces.popleft()
            sub.lines -= frame.lines
            out.append(frame)
            size += len(frame.payload)
        if sub.pieces:
            sub.ready.set()
    return out, dropped


def _dropped_frame(dropped: int) -> Frame:
    notice = json.dumps({"service": "", "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         "line": f"[cynchrod: {dropped} lines dropped: this client reads slower than "
                                 "the app writes]", "dropped": dropped})
    return Frame(f"[{notice}]".encode(), 0)


def _send(sub: _Client, frames: list[Frame]) -> None:
    """What the hub could not write at once, then these frames, written to this client's socket."""
    if not sub.ws.connected:
        raise ConnectionError("the client left")
    rest, sub.rest = sub.rest, b""
    sub.ws.sock.sendall(rest + sub.data(frames))


def _pump(ws: Any, d: Front, token: store.Token, app: store.App) -> None:
    sub = _Client(ws)
    try:
        hub = _subscribe(d, app, sub)
    except CynchrodError:
        ws.close(1011, "docker_unavailable")
        return
    last_check = time.monotonic()
    try:
        while ws.connected:
            sub.idle = True  # the hub may write to the socket while this waits (``_Client.offer``)
            woke = sub.ready.wait(0.5)
            sub.idle = False
            if woke:  # the hub gathered lines it could not write itself (``_Hub._flush``)
                sub.ready.clear()
                if sub.pieces or sub.dropped or sub.rest:
                    frames, dropped = _take(sub)
                    _send(sub, [_dropped_frame(dropped), *frames] if dropped else frames)
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
    except OSError:  # the client left (a reset, a broken pipe, the socket closed by its reader)
        pass
    finally:
        _unsubscribe(hub, sub)
