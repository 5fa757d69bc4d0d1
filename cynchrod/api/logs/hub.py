"""The hub of a log stream: one engine follower per app for all the API worker processes.

``subscribe`` gives a WebSocket client (``Client``, served by ``pump``) a share of its app's
``Hub``: the first worker with a client of the app follows the engine (the leader) and hands
its messages to the other workers through the relay (``relay``); each batch of lines is
encoded once (``frames``) and gathered into messages for at most ``BATCH_WAIT_S``. The
follower is closed with its app's last client in any worker (``unsubscribe``).
"""

from __future__ import annotations

import collections
import contextlib
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from cynchrod import store
from cynchrod.api.logs import relay
from cynchrod.api.logs.frames import MESSAGE_BYTES, Frame, deflates, encode_lines
from cynchrod.core.errors import CynchrodError
from cynchrod.runtime import LogStream

if TYPE_CHECKING:
    from cynchrod.shell.front import Front

#: Lines a client may fall behind its app before it loses the oldest (it alone).
QUEUE_LINES = 5000
#: A message holds the lines waiting, up to this many bytes of JSON (its whole payload) ...
BATCH_BYTES = MESSAGE_BYTES
#: ... gathered for at most this long after the first (unless this many are already waiting).
BATCH_WAIT_S = 0.05
BATCH_LINES = 500


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


class Client(_Subscriber):
    """A WebSocket client in this worker. While its pump waits with nothing queued, the hub
    writes each message to its socket itself (``offer``: one non-blocking send, no wake-up
    of the client's greenlet, no lock); what the socket does not take at once, and every
    message after it, waits for the pump. Twenty clients of an app then cost twenty sends
    a message, not twenty wake-ups, queue rounds and sends."""

    def __init__(self, ws: Any) -> None:
        super().__init__()
        self.ws = ws
        self.deflate = deflates(ws)
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


class _Peer(_Subscriber):
    """Another worker process following the app through this one: its pieces go down a socket."""

    def __init__(self, conn: socket.socket) -> None:
        super().__init__()
        self.conn = conn


class Hub:
    """One engine follower per app for all the API worker processes, shared by all its clients.

    The first worker with a client of the app binds the app's relay address and follows the
    engine (the leader); a worker that finds the address taken reads the leader's pieces
    from it instead. Either way, each batch of lines is JSON-encoded once, and its clients'
    messages join those pieces. When the leader closes (its clients and its peers all
    left) or dies, a worker still reading from it takes over: binding is the election.
    Twenty clients of one app, in any workers, cost one set of engine streams."""

    def __init__(self, key: tuple[str, str], d: Front) -> None:
        self.key, self.d = key, d
        self.address = relay.relay_address(d.settings.state, key)
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
        listener = relay.listen(self.address)
        if listener is None:
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
                    peer.conn.sendall(relay.pack(frames))
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
        unsubscribe(self, peer)

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
        upstream = relay.connect(self.address)
        if upstream is None:  # the leader is closing: the next round elects
            time.sleep(0.01)
            return
        self.upstream = upstream
        buf = b""
        try:
            while not self.ended.is_set():
                data = upstream.recv(65536)
                if not data:
                    return
                frames, buf = relay.unpack(buf + data)
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
            if isinstance(sub, Client):
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
                    if texts and size + len(text) + 2 > BATCH_BYTES:  # "[", the pieces, commas, "]"
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


_hubs: dict[tuple[str, str], Hub] = {}
_hubs_lock = threading.Lock()


def subscribe(d: Front, app: store.App, sub: _Subscriber) -> Hub:
    with _hubs_lock:
        hub = _hubs.get(app.key)
        fresh = hub is None
        if hub is None:
            hub = _hubs[app.key] = Hub(app.key, d)
        hub.subscribers.add(sub)
    if fresh:
        for thread in (hub.acceptor, hub.reader, hub.flusher):
            if thread is not None:
                thread.start()
    return hub


def unsubscribe(hub: Hub, sub: _Subscriber) -> None:
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


def take(sub: _Subscriber) -> tuple[list[Frame], int]:
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
