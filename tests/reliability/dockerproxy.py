"""A proxy on the Docker socket that can be cut off or made to hang (fault injection).

A daemon started with ``DOCKER_HOST=unix://<proxy.path>`` talks to the real engine
through it; ``down()`` closes every connection and refuses new ones (an engine
that went away), ``hang()`` accepts and never answers (a hung engine), ``freeze()`` keeps
every connection open and passes nothing either way (a paused dockerd: the event stream
just goes quiet), ``up()`` restores it.
"""

from __future__ import annotations

import contextlib
import pathlib
import socket
import threading

ENGINE = "/var/run/docker.sock"


class DockerProxy:
    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.mode = "up"
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._server: socket.socket | None = None
        self._listen()

    def _listen(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(self.path))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(client)
                mode = self.mode
            if mode in ("hang", "freeze"):
                continue  # held open, never answered
            engine = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            engine.connect(ENGINE)
            with self._lock:
                self._conns.append(engine)
            threading.Thread(target=self._pipe, args=(client, engine), daemon=True).start()
            threading.Thread(target=self._pipe, args=(engine, client), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if self.mode != "freeze":  # frozen: what is said is never heard
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def _drop_all(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def down(self) -> None:
        """The engine is gone: connections dropped, new ones refused."""
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._drop_all()

    def hang(self) -> None:
        """The engine hangs: open connections cut, new ones accepted and never answered."""
        with self._lock:
            self.mode = "hang"
        self._drop_all()
        if self._server is None:
            self._listen()

    def freeze(self) -> None:
        """The engine is paused: open connections stay open and silent, new ones are never answered."""
        with self._lock:
            self.mode = "freeze"

    def up(self) -> None:
        with self._lock:
            self.mode = "up"
        self._drop_all()
        if self._server is None:
            self._listen()

    def close(self) -> None:
        self.down()
