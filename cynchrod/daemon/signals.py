"""``StopSignals``: SIGTERM and SIGINT as a flag that ends a wait at once.

A module of its own, importing only the standard library: ``serve`` uses it, and a test's child
process (tests/unit/test_stop_signals.py) imports it alone rather than the whole daemon.
"""

from __future__ import annotations

import contextlib
import select
import signal
import socket


class StopSignals:
    """Signals as a flag, and a byte on a socket pair that ends :meth:`wait` at once.

    The handler takes no lock. One that called ``threading.Event.set()`` (as this code once
    did) can run while this same thread holds that Event's lock inside its ``wait`` (Python
    runs handlers between bytecodes, and ``wait`` holds the lock across a few of them), and
    then blocks on it forever: a daemon that ignored SIGTERM for 30 s was seen once in CI.
    """

    def __init__(self, *signals: int) -> None:
        self.received: int | None = None
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        for sig in signals:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.received = signum

    def wait(self, timeout: float) -> bool:
        """True once a signal came; else after ``timeout`` s, False."""
        if self.received is None:
            select.select([self._r], [], [], timeout)
            with contextlib.suppress(BlockingIOError):
                while self._r.recv(4096):
                    pass
        return self.received is not None
