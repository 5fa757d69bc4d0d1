"""How the API worker processes reach the one reconciler process.

A UNIX stream socket in the state directory (mode 0600, so only the daemon's
user may use it): one JSON request line, one JSON reply line, then the
connection closes. The reconciler process serves it (``ChannelServer``, a
thread per connection, each bounded by a timeout); a worker calls it
(``Channel``) to wake a pass, and for what only the reconciler's memory holds:
its health, an app's units as its view of the engine has them, and a preview
of the next pass. Every call has a deadline; a reconciler that does not answer
in time is ``reconciler_unavailable`` (a temporary error), never a hung worker.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import socket
import tempfile
import threading
from collections.abc import Callable
from typing import Any

from cynchrod.core.errors import ReconcilerUnavailable as ReconcilerUnavailable

log = logging.getLogger("cynchrod.channel")
SOCKET_NAME = "reconciler.sock"
#: A request line is small (an op and an app's name); anything longer is refused.
MAX_REQUEST = 64 * 1024
CALL_TIMEOUT_S = 5.0

Handler = Callable[[dict[str, Any]], Any]


def socket_path(state: pathlib.Path) -> pathlib.Path:
    """``state/reconciler.sock``; a state dir whose path is too long for a UNIX socket
    name (about 107 bytes) gets one in the temporary directory, named after it."""
    path = state.resolve() / SOCKET_NAME
    if len(os.fsencode(path)) < 100:
        return path
    digest = hashlib.sha256(os.fsencode(state.resolve())).hexdigest()[:16]
    return pathlib.Path(tempfile.gettempdir()) / f"cynchrod-{digest}.sock"


class ChannelServer:
    """The reconciler process's end: ``handlers`` maps an op to a function of the request."""

    def __init__(self, path: pathlib.Path, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self._sock.bind(str(path))
        finally:
            os.umask(old)
        self._sock.listen(128)
        self._sock.settimeout(0.5)
        self._thread: threading.Thread | None = None

    def start(self, stop: threading.Event) -> None:
        self._thread = threading.Thread(target=self._serve, args=(stop,), name="channel", daemon=True)
        self._thread.start()

    def _serve(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), name="channel-call", daemon=True).start()
        self.close()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(CALL_TIMEOUT_S)
            try:
                request = json.loads(_read_line(conn))
                handler = self.handlers.get(str(request.get("op")))
                if handler is None:
                    reply: dict[str, Any] = {"error": "unknown op"}
                else:
                    reply = {"ok": handler(request)}
            except (OSError, ValueError, AttributeError) as exc:
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            except Exception as exc:  # a failing handler is that call's error, never the channel's end
                log.exception("channel call failed")
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(reply, separators=(",", ":")).encode() + b"\n")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _read_line(conn: socket.socket, limit: int = MAX_REQUEST) -> bytes:
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            raise ValueError("request too long")
    return data.split(b"\n", 1)[0]


class Channel:
    """A worker's end. Safe from any thread or greenlet: one connection per call."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def call(self, op: str, timeout: float = CALL_TIMEOUT_S, **args: Any) -> Any:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(timeout)
                conn.connect(str(self.path))
                conn.sendall(json.dumps({"op": op, **args}, separators=(",", ":")).encode() + b"\n")
                line = _read_line(conn, limit=64 * 1024 * 1024)
        except OSError as exc:
            raise ReconcilerUnavailable(f"the reconciler process did not answer ({op}): {exc}") from exc
        try:
            reply = json.loads(line)
        except ValueError as exc:
            raise ReconcilerUnavailable(f"the reconciler process did not answer ({op})") from exc
        if "error" in reply:
            raise ReconcilerUnavailable(f"the reconciler could not answer {op}: {reply['error']}")
        return reply.get("ok")

    def wake(self, trigger: str, *, debounced: bool = False) -> None:
        """Ask for a pass; a reconciler that is not up is woken by its next poll anyway."""
        try:
            self.call("wake", timeout=2.0, trigger=trigger, debounced=debounced)
        except ReconcilerUnavailable as exc:
            log.warning("could not wake the reconciler (%s): the next poll picks the change up", exc)
