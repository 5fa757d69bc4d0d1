"""The Docker glue both drivers share (``local`` and ``swarm``; imports ``docker``): engine errors
converted into the project's, the base of a driver (its counted calls, its app's labels and
built images), builds, and the log bookkeeping (``Given``) that gives each line once.

Private to ``cynchrod.runtime``: nothing above the drivers imports it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import pathlib
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import docker
import docker.errors
import requests

from cynchrod import runtime
from cynchrod.core.errors import EngineConflict, EngineUnavailable, PermanentError, RuntimeFailure, UnitGone

log = logging.getLogger("cynchrod.runtime")

T = TypeVar("T")

#: Pinned, so that making a client asks the engine nothing (every engine since 20.10 speaks it).
API_VERSION = "1.41"
#: Deadline of one engine call on a request or pass path.
CALL_TIMEOUT_S = 30
#: Deadline of the liveness probe's ping: a healthy engine answers in milliseconds.
PING_TIMEOUT_S = 3.0
#: Per-container log cap: the json-file driver rotates, so no log grows without bound.
LOG_CONFIG = {"type": "json-file", "config": {"max-size": "10m", "max-file": "3"}}

def has_registry(image: str) -> bool:
    """True when the reference names a registry host (``host.tld/...``, ``host:port/...``)."""
    first, sep, _ = image.partition("/")
    return bool(sep) and ("." in first or ":" in first or first == "localhost")


def converted(call: Callable[[], T], what: str) -> T:
    """Run one engine call; every library error leaves as a ``CynchrodError``."""
    try:
        return call()
    except docker.errors.NotFound as exc:
        raise UnitGone(f"{what}: {exc.explanation or 'not found'}") from exc
    except docker.errors.APIError as exc:
        if exc.status_code == 409:
            raise Conflict(f"{what}: {exc.explanation}") from exc
        raise RuntimeFailure(f"{what}: {exc.explanation or exc}") from exc
    except (requests.RequestException, docker.errors.DockerException, OSError) as exc:
        raise EngineUnavailable(f"{what}: docker unreachable ({type(exc).__name__})") from exc


#: The engine answered 409; the caller looks at why (the tree's ``EngineConflict``).
Conflict = EngineConflict

def stamp_seconds(stamp: str) -> float:
    """An RFC 3339 nano timestamp as epoch seconds (for ``since``), or 0 when unreadable."""
    try:
        whole, _, frac = stamp.rstrip("Z").partition(".")
        base = time.mktime(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) - time.timezone
        return base + float(f"0.{frac or 0}")
    except ValueError:
        return 0.0


def stamp_key(stamp: str) -> str:
    """A timestamp that compares as text in time order: Docker's RFC 3339 nano form trims the
    fraction's trailing zeros (``.5Z`` would sort after ``.50001Z``), so it is padded to nine digits."""
    if len(stamp) == 30:
        return stamp
    whole, _, frac = stamp.rstrip("Z").partition(".")
    return f"{whole}.{frac:0<9}Z"


def key_at(seconds: float) -> str:
    """The ``stamp_key`` of a time in epoch seconds."""
    whole = int(seconds)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((seconds - whole) * 1e9):09d}Z"


class Given:
    """What one container's log stream gave, so that the lines the engine sends again are
    dropped and none is lost.

    Two ways the engine repeats lines: a stream opened again after one ended asks for lines
    from a little before the last timestamp given (``since`` is a float; asking for one
    microsecond past it lost the rest of a group of lines, which share the timestamp of the
    read from the container that brought them); and when json-file rotates under a follower,
    the engine sends the new file's first lines (one to thousands, measured) a second time,
    a jump back in time. A jump back to a line given in the last ``WINDOW_S`` (its timestamp,
    to the nanosecond, is remembered that long), or further back than that, is a repeat: the
    lines older than the last one given, and as many of those with its timestamp as were
    given, are dropped until a newer line comes. Any other step back is a line: stdout and
    stderr are stamped apart, so their lines can be a little out of time order.

    A rotation's repeat need not step back: when the new file held only lines stamped with the
    last timestamp given (one line, in a flood), they come again with that same timestamp,
    like the rest of a read the engine sent in two parts. Such a line whose text was given
    with that timestamp is asked about (``verify``: how many lines the log holds with it, from
    its last lines); when no more than were given, it and the rest of the repeat are dropped.
    Without ``verify``, or past its budget (``VERIFY_BURST`` asks, then one a ``VERIFY_EVERY_S``:
    an app printing the same line twice in one write may cost the engine that many reads), such
    a line is given: a repeat may pass, a line is never lost."""

    WINDOW_S = 0.25
    MAX_REMEMBERED = 50_000
    #: Texts remembered (hashed) for the last timestamp (one read from the container: a few hundred).
    MAX_TEXTS = 2000
    VERIFY_EVERY_S = 1.0
    VERIFY_BURST = 5
    __slots__ = ("asked", "catching_up", "count", "last", "recent", "recent_keys", "skip", "texts", "verify")

    def __init__(self, verify: Callable[[str, int], int | None] | None = None) -> None:
        self.last, self.count, self.skip, self.catching_up = "", 0, 0, False
        self.recent: collections.deque[str] = collections.deque()
        self.recent_keys: set[str] = set()
        #: The hashes of the texts given with the last timestamp (an equal hash only costs a question).
        self.texts: set[int] = set()
        #: ``verify(key, given)``: the lines the log holds with this timestamp, None when unknown.
        self.verify = verify
        #: When ``verify`` was last asked, and how many asks that leaves (a token bucket).
        self.asked = (0.0, float(self.VERIFY_BURST))

    def reopened(self) -> None:
        self.skip, self.catching_up = self.count, self.count > 0

    def fresh(self, stamp: str, text: str = "") -> bool:
        key = stamp if len(stamp) == 30 else stamp_key(stamp)
        if key > self.last:
            self.last, self.count, self.catching_up = key, 1, False
            self.texts = {hash(text)}
        else:
            if not self.catching_up and self._repeats(key, text):
                self.reopened()  # a repeat of lines given: as a stream opened again
            if self.catching_up:
                if key < self.last:
                    return False
                if self.skip:
                    self.skip -= 1
                    return False
            if key == self.last:
                self.count += 1
                if len(self.texts) < self.MAX_TEXTS:
                    self.texts.add(hash(text))
        if key not in self.recent_keys:
            self.recent_keys.add(key)
            self.recent.append(key)
        return True

    def _repeats(self, key: str, text: str) -> bool:
        """Whether a line stamped no later than the last one given starts a repeat."""
        if key < self.last:
            return key in self.recent_keys or stamp_seconds(self.last) - stamp_seconds(key) > self.WINDOW_S
        if self.verify is None or hash(text) not in self.texts:
            return False
        # The log holds no more lines with this (the last) timestamp than were given?
        now = time.monotonic()
        at, left = self.asked
        left = min(float(self.VERIFY_BURST), left + (now - at) / self.VERIFY_EVERY_S)
        if left < 1:
            return False
        self.asked = (now, left - 1)
        logged = self.verify(key, self.count)
        return logged is not None and logged <= self.count

    def forget(self) -> None:
        """Forget the timestamps older than ``WINDOW_S`` before the last (once per read)."""
        recent = self.recent
        if len(recent) < 64:
            return
        cutoff = key_at(stamp_seconds(self.last) - self.WINDOW_S)
        while recent and (recent[0] < cutoff or len(recent) > self.MAX_REMEMBERED):
            self.recent_keys.discard(recent.popleft())

LINE_MAX_BYTES, CUT_MARK = runtime.LINE_MAX_BYTES, runtime.CUT_MARK
#: Lines begun and not ended (the engine's pieces of a long line) that one stream keeps open at most:
#: one per output (stdout, stderr) of each task; past this the oldest is given as it is.
MAX_OPEN = 64

#: A line read from an engine log stream: its head (``<timestamp>``, and `` <details>`` when asked
#: for), its text, and whether the text was cut at ``LINE_MAX_BYTES``.
RawLine = tuple[str, str, bool]


def _text(data: bytes, cut: bool) -> str:
    if not cut:
        return data.decode("utf-8", "replace")
    end = LINE_MAX_BYTES
    while end > 0 and data[end] & 0xC0 == 0x80:  # not inside a character
        end -= 1
    return data[:end].decode("utf-8", "replace") + CUT_MARK


class Joiner:
    """Whole lines from the messages of an engine log stream (``timestamps``, and ``details`` for
    services), each message as docker-py's ``logs(stream=True)`` and ``service_logs`` give it: one
    multiplexed frame, ``<timestamp> [<details> ]<text>``.

    The engine cuts a line longer than 16 KiB into pieces, each its own message with its own copy
    of the head: every piece but the last lacks the final newline (moby's ``PartialLogMetaData``,
    as json-file stores it), and all of them carry the first piece's timestamp. Pieces are joined
    by their head, so stdout, stderr and the tasks of a service can interleave; only the first
    ``LINE_MAX_BYTES`` of a line are kept, the rest is dropped as it comes. A line the stream ends
    inside (a container's last output with no newline) is given by ``rest``."""

    __slots__ = ("_details", "_open")

    def __init__(self, *, details: bool = False) -> None:
        self._details = details
        #: Head -> (the text kept so far, cut).
        self._open: dict[bytes, tuple[bytes, bool]] = {}

    def feed(self, frame: bytes) -> RawLine | None:
        """The line this message ends, or None (a piece kept, or an empty message)."""
        space = frame.find(b" ")
        if self._details and space >= 0:
            space = frame.find(b" ", space + 1)
        if space < 0:
            return None
        ended = frame.endswith(b"\n")
        head, text = frame[:space], frame[space + 1:len(frame) - 1 if ended else len(frame)]
        begun = self._open.pop(head, None) if self._open else None
        if begun is not None:
            kept, cut = begun
            if not cut:
                kept += text[:LINE_MAX_BYTES + 1 - len(kept)]
                cut = len(kept) > LINE_MAX_BYTES
            text = kept
        else:
            cut = len(text) > LINE_MAX_BYTES
            if cut:
                text = text[:LINE_MAX_BYTES + 1]
        if ended:
            return head.decode("ascii", "replace"), _text(text, cut), cut
        self._open[head] = (text, cut)
        if len(self._open) > MAX_OPEN:
            oldest = next(iter(self._open))
            kept, cut = self._open.pop(oldest)
            return oldest.decode("ascii", "replace"), _text(kept, cut), cut
        return None

    def rest(self) -> list[RawLine]:
        """The lines begun and not ended, as they are (the stream ended)."""
        out = [(head.decode("ascii", "replace"), _text(kept, cut), cut) for head, (kept, cut) in self._open.items()]
        self._open.clear()
        return out


def whole_lines(frames: Iterable[bytes], *, details: bool = False) -> Iterator[RawLine]:
    """The lines of an engine log stream's messages (see ``Joiner``), as they end."""
    joiner = Joiner(details=details)
    feed = joiner.feed
    for frame in frames:
        line = feed(frame)
        if line is not None:
            yield line
    yield from joiner.rest()


def source_of(head: str) -> str:
    """What wrote a line, from its head: its details (a service's task), "" for a container."""
    return head.partition(" ")[2]


#: A tail reads at most this many times ``n + 1`` messages a log (its long lines' pieces count).
TAIL_READS = 4


def tail_lines(read: Callable[[int], Iterable[bytes]], n: int, *, details: bool = False) -> list[RawLine]:
    """The last ``n`` whole lines of a log, oldest first; ``read(k)`` gives its last ``k`` messages
    (of each source: a service's tasks). The first line of a source that gave all ``k`` may have
    begun before them (a piece of a long line): it is dropped, and the log read again with a
    larger ``k`` (up to ``TAIL_READS`` times ``n + 1``) while that leaves fewer than ``n`` lines."""
    asked = n + 1
    while True:
        counts: dict[str, int] = collections.defaultdict(int)

        def counted(frames: Iterable[bytes], counts: dict[str, int]) -> Iterator[bytes]:
            for frame in frames:
                space = frame.find(b" ")
                if details:
                    counts[frame[space + 1:frame.find(b" ", space + 1)].decode("ascii", "replace")] += 1
                else:
                    counts[""] += 1
                yield frame

        kept: dict[str, collections.deque[RawLine]] = {}
        for line in whole_lines(counted(read(asked), counts), details=details):
            source = source_of(line[0])
            if source not in kept:
                kept[source] = collections.deque(maxlen=n + 1)
            kept[source].append(line)
        lines: list[RawLine] = []
        short = False
        for source, got in kept.items():
            if counts[source] >= asked:  # its first line may be a piece of one begun earlier
                got.popleft()
                short = short or len(got) < n
            lines.extend(got)
        if not short or asked >= TAIL_READS * (n + 1):
            lines.sort(key=lambda line: stamp_key(line[0].partition(" ")[0]))
            return lines[-n:]
        asked *= TAIL_READS


def followed(frames: Iterable[bytes], *, details: bool = False,
             line_of: Callable[[RawLine], tuple[runtime.LogLine, Given]]) -> Iterator[runtime.LogLine]:
    """A followed stream's lines (``whole_lines``), each given once: ``line_of`` makes a line and
    names the ``Given`` of its source (a container, a service's task). Both drivers' followers read
    their engine streams through this."""
    since_forget = 0
    for raw in whole_lines(frames, details=details):
        line, given = line_of(raw)
        if given.fresh(line.timestamp, line.line):
            yield line
        since_forget += 1
        if since_forget >= 256:
            since_forget = 0
            given.forget()


@contextlib.contextmanager
def build_errors(log: Callable[[str], None]) -> Iterator[None]:
    """The engine's errors during a build (and a push) as ``build_failed`` (logged to the
    build's log) or, when the engine cannot be reached, ``EngineUnavailable``."""
    try:
        yield
    except (docker.errors.APIError, docker.errors.BuildError) as exc:
        log(str(exc))
        raise PermanentError(str(exc), code="build_failed") from exc
    except (requests.RequestException, docker.errors.DockerException, OSError) as exc:
        raise EngineUnavailable(f"build: docker unreachable ({type(exc).__name__})") from exc


def run_build(api: Any, *, context: pathlib.Path, dockerfile: str, tag: str, args: dict[str, str],
              labels: dict[str, str], log: Callable[[str], None]) -> None:
    """``docker build`` on ``api``, its output streamed to ``log``; an error it reports raises
    ``build_failed`` (the engine's own errors are the caller's to convert)."""
    for chunk in api.build(path=str(context), dockerfile=dockerfile, tag=tag, buildargs=args or None,
                           labels=labels, rm=True, forcerm=True, decode=True):
        if "stream" in chunk:
            for line in str(chunk["stream"]).splitlines():
                if line.strip():
                    log(line)
        if "error" in chunk:
            log(str(chunk["error"]).rstrip())
            raise PermanentError(str(chunk["error"]).strip(), code="build_failed")


class Driver:
    """What both drivers are made of: a client's low-level API for one owner and one instance,
    and a count of the engine calls made through ``_call``."""

    owner: str
    instance: str
    api: Any
    #: Engine calls made so far: the driver's own count (the tests and bench/ read it), not the protocol's.
    calls: int
    #: Where each call's time goes at DEBUG (the driver's own logger).
    _log = log

    def _call(self, call: Callable[[], T], what: str) -> T:
        self.calls += 1
        if not self._log.isEnabledFor(logging.DEBUG):
            return converted(call, what)
        started = time.perf_counter()
        try:
            return converted(call, what)
        finally:
            self._log.debug("engine %s: %.1f ms", what.split(" ", 1)[0], (time.perf_counter() - started) * 1000)

    def ping(self) -> None:
        """``GET /_ping`` under ``PING_TIMEOUT_S`` (the client's own timeout is a pass's, far longer);
        not counted in ``calls``: it is the liveness probe's, never a pass's."""
        def call() -> None:
            response = self.api.get(f"{self.api.base_url}/_ping", timeout=PING_TIMEOUT_S)
            response.raise_for_status()

        try:
            call()
        except (requests.RequestException, docker.errors.DockerException, OSError) as exc:
            raise EngineUnavailable(f"the engine did not answer a ping within {PING_TIMEOUT_S:g}s "
                                    f"({type(exc).__name__})") from exc

    def _app_labels(self, org: str, app: str) -> dict[str, str]:
        return {runtime.LABEL_OWNER: self.owner, runtime.LABEL_INSTANCE: self.instance,
                runtime.LABEL_ORG: org, runtime.LABEL_APP: app}

    def _app_filter(self, org: str, app: str) -> dict[str, list[str]]:
        return {"label": runtime.app_labels(self.owner, org, app)}

    def _app_images(self, org: str, app: str) -> list[dict[str, Any]]:
        """The images built for one app (they carry its labels): one list call."""
        images: list[dict[str, Any]] = self._call(lambda: self.api.images(filters=self._app_filter(org, app)),
                                                  "list images")
        return images

    def _build(self, context: pathlib.Path, *, dockerfile: str, tag: str, args: dict[str, str], org: str,
               app: str, log: Callable[[str], None]) -> None:
        """``docker build`` of an app's image with its labels, output to ``log``; raises ``build_failed``."""
        with build_errors(log):
            run_build(self.api, context=context, dockerfile=dockerfile, tag=tag, args=args,
                      labels=self._app_labels(org, app), log=log)
