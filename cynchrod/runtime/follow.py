"""What the drivers' live log followers share (``Runtime.follow``): one reader thread per
engine stream (a container's logs, a service's), attached by a scan of the app's units and
attached again when a stream ends (a restart, a redeploy, a replaced service), until the app is
deleted (``ended``) or ``close()``. Readers add each line to one list, which ``batches()`` takes
whole: a flood costs a list append a line and a wake-up a batch, not a queue round a line.

A driver says which streams an app has now (``_streams``): for each, a key (the stream's
identity: a container, a service), how to open it and how to read its lines (``_docker.followed``).
"""

from __future__ import annotations

import abc
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from cynchrod import runtime
from cynchrod.core.errors import RuntimeFailure, TemporaryError

log = logging.getLogger(__name__)

#: One engine stream of an app: its key, how to open it, how to read an open one.
Stream = tuple[str, Callable[[], Any], Callable[[Any], Iterator[runtime.LogLine]]]


class Follower(abc.ABC):
    """An app's live log lines, from every stream ``_streams`` names (see the module)."""

    #: Lines waiting at most (a slow client slows the readers: bounded memory, each line at most
    #: 32 KiB of text).
    PENDING_LINES = 5000
    #: How soon to scan again while nothing is followed (the app is being restarted) ...
    RESCAN_S = 0.5
    #: ... and while something is.
    RESCAN_FOLLOWING_S = 5.0

    def __init__(self, app: str, since: float, ended: threading.Event | None, client: Any) -> None:
        self._app = app
        self._start = since
        self._ended = ended or threading.Event()
        self._closed = threading.Event()
        #: The lines read and not yet taken, and the keys of the readers that ended (under ``_cond``).
        self._pending: list[runtime.LogLine] = []
        self._gone: list[str] = []
        self._cond = threading.Condition(threading.Lock())
        self._readers: dict[str, tuple[threading.Thread, Any]] = {}
        self._lock = threading.Lock()
        #: The engine client the streams are opened with (closed with the follower).
        self._client = client

    @abc.abstractmethod
    def _streams(self) -> Iterator[Stream]:
        """The app's streams now (one engine call); those already followed are skipped."""

    def _attach(self) -> None:
        for key, open_stream, read in self._streams():
            if key in self._readers:
                continue
            try:
                stream = open_stream()
            except RuntimeFailure:
                continue
            reader = threading.Thread(target=self._read, args=(key, read, stream), daemon=True,
                                      name=f"logs-{self._app}")
            with self._lock:
                if self._closed.is_set():
                    with contextlib.suppress(Exception):
                        stream.close()
                    return
                self._readers[key] = (reader, stream)
            reader.start()

    def _read(self, key: str, read: Callable[[Any], Iterator[runtime.LogLine]], stream: Any) -> None:
        cond, pending, limit, closed = self._cond, self._pending, self.PENDING_LINES, self._closed
        try:
            for line in read(stream):
                with cond:
                    while len(pending) >= limit:  # a slow client slows the readers: bounded memory
                        if closed.is_set():
                            return
                        cond.wait(0.25)
                    pending.append(line)
                    if len(pending) == 1:
                        cond.notify_all()
                if closed.is_set():
                    return
        except Exception as exc:  # a broken stream (closed, engine gone): the next scan attaches again
            log.debug("log stream %s of %s ended: %r", key, self._app, exc)
        finally:
            with cond:  # this reader ended: its unit may be back already (a restart)
                self._gone.append(key)
                cond.notify_all()

    def batches(self) -> Iterator[list[runtime.LogLine]]:
        """The lines as they came, a list of those waiting at each turn (one in a trickle, many in a flood)."""
        next_scan = 0.0
        while not self._closed.is_set():
            now = time.monotonic()
            if now >= next_scan:
                if self._ended.is_set():
                    return
                with contextlib.suppress(TemporaryError):
                    self._attach()
                next_scan = now + (self.RESCAN_S if not self._readers else self.RESCAN_FOLLOWING_S)
            with self._cond:
                if not self._pending and not self._gone:
                    self._cond.wait(0.25)
                batch, gone = self._pending[:], self._gone[:]
                self._pending.clear()
                self._gone.clear()
                if batch:
                    self._cond.notify_all()  # room for the readers
            if gone:
                with self._lock:
                    for key in gone:
                        self._readers.pop(key, None)
                next_scan = 0.0
            if batch:
                yield batch

    def __iter__(self) -> Iterator[runtime.LogLine]:
        for batch in self.batches():
            yield from batch

    def close(self) -> None:
        with self._lock:
            self._closed.set()
        with self._cond:
            self._cond.notify_all()
        with self._lock:
            readers = list(self._readers.values())
            self._readers.clear()
        for _, stream in readers:
            with contextlib.suppress(Exception):
                stream.close()
        with contextlib.suppress(Exception):
            self._client.close()
        for reader, _ in readers:
            reader.join(2)
