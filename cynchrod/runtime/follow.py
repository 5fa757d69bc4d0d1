"""What the drivers' live log followers share (``Runtime.follow``): one reader thread per
engine stream (a container's logs, a service's), attached by a scan of the app's units and
attached again when a stream ends (a restart, a redeploy, a replaced service), lines queued
in lists as each read brought them, until the app is deleted (``ended``) or ``close()``.

A driver says which streams an app has now (``_streams``): for each, a key (the stream's
identity: a container, a service), how to open it and how to read it into lists of lines.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from cynchrod import runtime
from cynchrod.core.errors import RuntimeFailure, TemporaryError

log = logging.getLogger(__name__)

#: One engine stream of an app: its key, how to open it, how to read an open one.
Stream = tuple[str, Callable[[], Any], Callable[[Any], Iterator[list[runtime.LogLine]]]]


class Follower(abc.ABC):
    """An app's live log lines, from every stream ``_streams`` names (see the module)."""

    #: Lists of lines queued at most (a slow client slows the readers: bounded memory).
    QUEUE_BATCHES = 200
    #: How soon to scan again while nothing is followed (the app is being restarted) ...
    RESCAN_S = 0.5
    #: ... and while something is.
    RESCAN_FOLLOWING_S = 5.0

    def __init__(self, app: str, since: float, ended: threading.Event | None, client: Any) -> None:
        self._app = app
        self._start = since
        self._ended = ended or threading.Event()
        self._closed = threading.Event()
        self._lines: queue.Queue[list[runtime.LogLine] | str] = queue.Queue(maxsize=self.QUEUE_BATCHES)
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

    def _read(self, key: str, read: Callable[[Any], Iterator[list[runtime.LogLine]]], stream: Any) -> None:
        try:
            for batch in read(stream):
                if batch and not self._put(batch):
                    return
        except Exception as exc:  # a broken stream (closed, engine gone): the next scan attaches again
            log.debug("log stream %s of %s ended: %r", key, self._app, exc)
        finally:
            self._put(key)  # this reader ended

    def _put(self, item: list[runtime.LogLine] | str) -> bool:
        while not self._closed.is_set():
            try:
                self._lines.put(item, timeout=0.25)  # a slow client slows the readers: bounded memory
                return True
            except queue.Full:
                continue
        return False

    def batches(self) -> Iterator[list[runtime.LogLine]]:
        """The lines as they came, a list per engine read."""
        next_scan = 0.0
        while not self._closed.is_set():
            now = time.monotonic()
            if now >= next_scan:
                if self._ended.is_set():
                    return
                with contextlib.suppress(TemporaryError):
                    self._attach()
                next_scan = now + (self.RESCAN_S if not self._readers else self.RESCAN_FOLLOWING_S)
            try:
                item = self._lines.get(timeout=0.25)
            except queue.Empty:
                continue
            if isinstance(item, str):  # a reader ended: its unit may be back already (a restart)
                with self._lock:
                    self._readers.pop(item, None)
                next_scan = 0.0
                continue
            yield item

    def __iter__(self) -> Iterator[runtime.LogLine]:
        for batch in self.batches():
            yield from batch

    def close(self) -> None:
        with self._lock:
            self._closed.set()
            readers = list(self._readers.values())
            self._readers.clear()
        for _, stream in readers:
            with contextlib.suppress(Exception):
                stream.close()
        with contextlib.suppress(Exception):
            self._client.close()
        for reader, _ in readers:
            reader.join(2)
