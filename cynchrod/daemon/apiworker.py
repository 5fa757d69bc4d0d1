"""The API's gunicorn worker: gevent, with connections spread evenly over the workers.

All workers accept from the one listening socket the gunicorn master made. A burst of
new connections (a client opening a pool of keep-alive connections) goes to whichever
worker the kernel wakes first, and a worker that wakes first keeps winning: 31 of 32
connections were seen in one worker of two, which then served them all on one core
while the other idled. Here each worker publishes how many connections it holds in a
slot of a small shared memory array (``Share``, made by the master before it forks);
a worker holding more than ``SLACK`` over the least loaded accepting worker leaves a
new connection to the others for ``HOLD_S`` at most (then takes it anyway, so a stuck
worker never costs more than that).

The Flask app is built in each worker (its store and sockets must not cross a fork),
then the objects made until then are moved out of the garbage collector's sight
(``gc.freeze``): a full collection then no longer walks every module's objects in
the middle of requests.
"""

from __future__ import annotations

import gc
import json
import mmap
import signal
import struct
import time
from functools import partial
from typing import Any

import gevent
import gevent.event
from gevent.pool import Pool
from gevent.server import StreamServer
from gunicorn import util
from gunicorn.http import errors as http_errors
from gunicorn.workers.ggevent import GeventWorker

from cynchrod.core.codes import Code

#: A worker takes a new connection while it holds at most this many more than another.
SLACK = 1
#: Longest a new connection is left to the other workers before this one takes it.
HOLD_S = 0.02
#: How often a holding worker looks again.
RECHECK_S = 0.002
#: How often a worker tells the master it is alive, and looks how its connections are doing
#: while it stops. A stop wakes it at once (``handle_exit``): gunicorn's loop looked only every
#: second, which was most of a daemon's stop (1.4 s of 1.6 s).
NOTIFY_S = 1.0
_SLOT = struct.Struct("q")


class Share:
    """Connections held per worker slot, in memory shared by the master and its workers;
    -1 marks a slot with no accepting worker. One writer per slot (its worker, or the master
    when it gives the slot out or takes it back)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._mem = mmap.mmap(-1, _SLOT.size * slots)
        for i in range(slots):
            self.set(i, -1)

    def get(self, slot: int) -> int:
        return int(_SLOT.unpack_from(self._mem, slot * _SLOT.size)[0])

    def set(self, slot: int, value: int) -> None:
        _SLOT.pack_into(self._mem, slot * _SLOT.size, value)

    def fewest_elsewhere(self, slot: int) -> int | None:
        """The fewest connections another accepting worker holds, or None when there is none."""
        others = [v for i in range(self.slots) if i != slot and (v := self.get(i)) >= 0]
        return min(others) if others else None

    # gunicorn server hooks (they run in the master)
    def pre_fork(self, arbiter: Any, worker: Any) -> None:
        used = {getattr(w, "slot", None) for w in arbiter.WORKERS.values()}
        worker.slot = next((i for i in range(self.slots) if i not in used), None)
        worker.share = self
        if worker.slot is not None:
            self.set(worker.slot, 0)

    def child_exit(self, arbiter: Any, worker: Any) -> None:
        if getattr(worker, "slot", None) is not None:
            self.set(worker.slot, -1)


class _Server(StreamServer):  # type: ignore[misc]
    """A listener that leaves a new connection to a less loaded worker (for ``HOLD_S`` at most)."""

    def __init__(self, *args: Any, share: Share | None, slot: int | None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.share, self.slot = share, slot
        self.held_since: float | None = None

    def do_read(self) -> Any:
        if self.share is not None and self.slot is not None:
            fewest = self.share.fewest_elsewhere(self.slot)
            if fewest is not None and self.share.get(self.slot) > fewest + SLACK:
                now = time.monotonic()
                if self.held_since is None:
                    self.held_since = now
                if now - self.held_since < HOLD_S:
                    # Not accepting for a moment: the others are woken for this connection too.
                    self.stop_accepting()
                    self._timer = self.loop.timer(RECHECK_S)
                    self._timer.start(self._start_accepting_if_started)
                    return None
        self.held_since = None
        return super().do_read()


#: Requests gunicorn refuses before the app sees them, answered as the app answers its errors
#: (JSON ``{"error", "message"}`` with a stable code) instead of gunicorn's HTML page:
#: (exception, code, reason phrase, message); the status is the registry's (``Code.http``).
#: Messages are fixed sentences: gunicorn's own text can quote the request line, and so a
#: ``?token=``. Every other request gunicorn cannot parse (a malformed request line, header or
#: chunk) is ``400 bad_request``.
FRONT_ERRORS: tuple[tuple[type[Exception], Code, str, str], ...] = (
    (http_errors.LimitRequestLine, Code.URI_TOO_LONG, "URI Too Long",
     "the request line (method, path and query string) is over {line} bytes"),
    (http_errors.LimitRequestHeaders, Code.HEADERS_TOO_LARGE, "Request Header Fields Too Large",
     "a header is over {field_size} bytes, or there are over {fields} headers"),
    (http_errors.ExpectationFailed, Code.EXPECTATION_FAILED, "Expectation Failed",
     "the only Expect the server knows is 100-continue"),
    (http_errors.UnsupportedTransferCoding, Code.NOT_IMPLEMENTED, "Not Implemented",
     "the only Transfer-Encoding the server knows is chunked"),
)
#: Errors of the app's own making that gunicorn finds (a header it may not send): a bug, a 500.
_APP_FAULTS = (http_errors.InvalidResponseHeader, http_errors.InvalidResponseHeaderName,
               http_errors.ConfigurationProblem)


def _status(code: Code) -> int:
    assert code.http is not None, code  # every code of this table has a status (tests/unit/test_error_tree.py)
    return code.http


def front_error(exc: BaseException) -> tuple[int, str, str, str]:
    """(status, reason, code, message) of what gunicorn's worker caught while serving a connection."""
    for kind, code, reason, message in FRONT_ERRORS:
        if isinstance(exc, kind):
            return _status(code), reason, code.value, message
    if isinstance(exc, http_errors.ParseException) and not isinstance(exc, _APP_FAULTS):
        return _status(Code.BAD_REQUEST), "Bad Request", Code.BAD_REQUEST.value, \
            "the request could not be parsed (a malformed request line, header or chunk)"
    return _status(Code.INTERNAL), "Internal Server Error", Code.INTERNAL.value, "internal error"


class Worker(GeventWorker):  # type: ignore[misc]
    """gunicorn's gevent worker; ``keepalive`` bounds the wait for a request's line and
    headers (the first request's too), the app bounds the body."""

    slot: int | None = None
    share: Share | None = None
    #: Set by SIGTERM; made in the worker process (gevent is patched in by then).
    _stopping: gevent.event.Event

    def init_signals(self) -> None:
        self._stopping = gevent.event.Event()  # before the handler that sets it
        super().init_signals()
        # A terminal's Ctrl-C reaches every process of the group; the master stops its workers
        # (SIGTERM, graceful) when the daemon stops it. SIGINT here printed a SystemExit traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def handle_exit(self, sig: int, frame: Any) -> None:
        """SIGTERM: stop now rather than at the loop's next look (gunicorn's own handle_quit
        spawns from its signal handler too: scheduling a callback on the hub is safe there)."""
        super().handle_exit(sig, frame)
        self._stopping.set()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        gc.collect()
        gc.freeze()

    def _held(self, delta: int) -> None:
        if self.share is not None and self.slot is not None and self.share.get(self.slot) >= 0:
            self.share.set(self.slot, self.share.get(self.slot) + delta)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            # The other connections' turn: a client that sends its next request at once on a
            # kept-alive connection finds it already readable, so without this its greenlet
            # never waits and serves that one connection while the others starve (wrk -t4:
            # p50 0.5 ms, p99 0.9 s).
            gevent.sleep(0)

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """gunicorn's ``Worker.handle_error`` (its HTML page) answered as JSON, like the app's errors."""
        status, reason, code, message = front_error(exc)
        if status == 500:
            # As gunicorn logs it, but with the path only: the query string can carry ?token=.
            self.log.exception("Error handling request %s", getattr(req, "path", None) or "(no URI read)")
        else:
            self.log.warning("refused a request from %s: %s %s (%s)", (addr or ("",))[0], status, code,
                             type(exc).__name__)
        limits = {"line": self.cfg.limit_request_line, "fields": self.cfg.limit_request_fields,
                  "field_size": self.cfg.limit_request_field_size}
        body = json.dumps({"error": code, "message": message.format(**limits)}).encode()
        head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
        try:
            util.write_nonblock(client, head + body)
        except Exception:  # the client is gone: nothing to tell it
            self.log.debug("Failed to send error message.")

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        self._held(1)
        try:
            super().handle(listener, client, addr)
        finally:
            self._held(-1)

    def run(self) -> None:
        try:
            self._serve()
        finally:
            # Frozen objects are otherwise only freed while the interpreter tears its modules
            # down, when logging's weakref callbacks find gevent's half gone ("Exception ignored").
            gc.unfreeze()

    def _serve(self) -> None:
        # gunicorn's GeventWorker.run, with the balancing listener and a stop that wakes the loop.
        servers = []
        for s in self.sockets:
            s.setblocking(1)
            server = _Server(s, handle=partial(self.handle, s), spawn=Pool(self.worker_connections),
                             share=self.share, slot=self.slot)
            server.max_accept = 1
            server.start()
            servers.append(server)
        while self.alive:
            self.notify()
            self._stopping.wait(NOTIFY_S)
        if self.share is not None and self.slot is not None:
            self.share.set(self.slot, -1)  # no longer accepting: the others stop leaving connections to it
        for server in servers:
            server.close()
        started = time.time()
        while time.time() - started <= self.cfg.graceful_timeout:
            if all(server.pool.free_count() == server.pool.size for server in servers):
                return
            self.notify()
            gevent.sleep(0.05)
        self.log.warning("Worker graceful timeout (pid:%s)", self.pid)
        for server in servers:
            server.stop(timeout=1)
