"""The Docker glue both drivers share (``local`` and ``swarm``; imports ``docker``): engine errors
converted into the project's, the base of a driver (its counted calls, its app's labels and
built images), builds, and the log bookkeeping (``Given``) that gives each line once.

Private to ``cynchrod.runtime``: nothing above the drivers imports it.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import pathlib
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar
from urllib.parse import quote

import docker
import docker.errors
import requests
import urllib3.exceptions

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
    with that timestamp is asked about (``verify``: how many lines the log holds with it,
    ``logged_at``); when no more than were given, it and the rest of the repeat are dropped.
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
#: The text of each piece but the last of a long line (moby's log copier's buffer, json-file's pieces).
PIECE_BYTES = 16 * 1024
#: What one read of a log stream asks the HTTP client for.
READ_BYTES = 64 * 1024

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
    services): each message ``<timestamp> [<details> ]<text>``, one multiplexed frame (as docker-py's
    ``logs(stream=True)`` and ``service_logs`` give them; ``EngineStream`` reads them itself).

    The engine cuts a line longer than 16 KiB into pieces, each its own message with its own copy
    of the head: every piece but the last lacks the final newline (moby's ``PartialLogMetaData``,
    as json-file stores it), and all of them carry the first piece's timestamp. Pieces are joined
    by their output (stdout, stderr: when the stream says) and head, so the outputs and the tasks of
    a service can interleave; only the first ``LINE_MAX_BYTES`` of a line are kept, the rest is
    dropped as it comes. A line the stream ends inside (a container's last output with no newline)
    is given by ``rest``."""

    __slots__ = ("_details", "_open")

    def __init__(self, *, details: bool = False) -> None:
        self._details = details
        #: Output and head -> (the head, the text kept so far, cut).
        self._open: dict[bytes, tuple[bytes, bytes, bool]] = {}

    def feed(self, frame: bytes) -> RawLine | None:
        """The line this message ends, or None (a piece kept, or an empty message)."""
        space = frame.find(b" ")
        if self._details and space >= 0:
            space = frame.find(b" ", space + 1)
        if space < 0:
            return None
        ended = frame.endswith(b"\n")
        head = frame[:space]
        return self.piece(head, head, frame[space + 1:len(frame) - 1 if ended else len(frame)], ended)

    def piece(self, key: bytes, head: bytes, text: bytes, ended: bool) -> RawLine | None:
        """The line a message (``head``, ``text`` without its newline, ``ended``: it had one) ends, or
        None; ``key`` names its line among those open (the head, with the output when known)."""
        begun = self._open.pop(key, None) if self._open else None
        if begun is not None:
            _, kept, cut = begun
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
        self._open[key] = (head, text, cut)
        if len(self._open) > MAX_OPEN:
            oldest = next(iter(self._open))
            head, kept, cut = self._open.pop(oldest)
            return head.decode("ascii", "replace"), _text(kept, cut), cut
        return None

    def rest(self) -> list[RawLine]:
        """The lines begun and not ended, as they are (the stream ended)."""
        out = [(head.decode("ascii", "replace"), _text(kept, cut), cut) for head, kept, cut in self._open.values()]
        self._open.clear()
        return out


#: One message of a log stream: the key of its line among those open (its output and head), its
#: head, its text without the newline, and whether it ended (had the newline).
Message = tuple[bytes, bytes, bytes, bool]


def _frames(data: bytes, chunks: Iterator[bytes], details: bool) -> Iterator[Message]:
    """The messages of a multiplexed stream (``data``, then ``chunks``), cut anywhere."""
    rest = b""
    for chunk in itertools.chain((data,), chunks):
        data = rest + chunk if rest else chunk
        size, at = len(data), 0
        while size - at >= 8:
            stop = at + 8 + int.from_bytes(data[at + 4:at + 8], "big")
            if stop > size:
                break
            output, start, at = data[at:at + 1], at + 8, stop
            space = data.find(b" ", start, stop)
            if details and space >= 0:
                space = data.find(b" ", space + 1, stop)
            if space < 0:
                continue
            head = data[start:space]
            ended = data[stop - 1] == 10
            yield output + head, head, data[space + 1:stop - 1 if ended else stop], ended
        rest = data[at:]


#: Bytes of a TTY's stream with no head in them (not the engine's) dropped at once, at most.
RAW_HEADLESS_BYTES = 4096


def _raw(data: bytes, chunks: Iterator[bytes], details: bool) -> Iterator[Message]:
    """The messages of a TTY's stream: one after the other, each ended by its newline or, a piece
    of a long line, after ``PIECE_BYTES`` of text; a TTY ends lines with ``\\r\\n``: the ``\\r`` goes."""
    at = 0
    while True:
        space = data.find(b" ", at)
        if details and space >= 0:
            space = data.find(b" ", space + 1)
        start = space + 1
        newline = data.find(b"\n", start, start + PIECE_BYTES) if space >= 0 else -1
        if newline >= 0:
            head = data[at:space]
            yield head, head, data[start:newline - 1 if newline > start and data[newline - 1] == 13 else newline], True
            at = newline + 1
            continue
        if space >= 0 and len(data) - start >= PIECE_BYTES:
            head = data[at:space]
            yield head, head, data[start:start + PIECE_BYTES], False
            at = start + PIECE_BYTES
            continue
        if space < 0 and len(data) - at > RAW_HEADLESS_BYTES:
            log.debug("log stream: %d bytes with no head dropped", len(data) - at)
            at = len(data)
        chunk = next(chunks, None)
        if chunk is None:
            if space >= 0:
                head = data[at:space]
                yield head, head, data[start:], False
            return
        data, at = data[at:] + chunk, 0


def _messages(chunks: Iterator[bytes], details: bool) -> Iterator[Message]:
    """The messages of a log stream read as ``chunks`` (any sizes): multiplexed frames, or a TTY's
    raw stream, told apart by the first byte (a frame's header starts with 0, 1 or 2, a message
    with its timestamp's first digit)."""
    first = next(chunks, b"")
    if first:
        yield from (_frames if first[0] <= 2 else _raw)(first, chunks, details)


def stream_lines(chunks: Iterable[bytes], *, details: bool = False,
                 counts: dict[str, int] | None = None) -> Iterator[RawLine]:
    """The whole lines (``Joiner``'s rules) of a log stream read as ``chunks`` of any sizes (see
    ``_messages``), as they end; pieces are joined per output (stdout, stderr) and head. ``counts``
    (when given) counts each source's messages (``source_of``)."""
    if counts is None:
        return _frame_lines(iter(chunks), details)

    def counted(messages: Iterator[Message], counts: dict[str, int]) -> Iterator[Message]:
        for message in messages:
            counts[message[1].partition(b" ")[2].decode("ascii", "replace")] += 1
            yield message

    return _joined(counted(_messages(iter(chunks), details), counts), Joiner(details=details))


def _joined(messages: Iterator[Message], joiner: Joiner) -> Iterator[RawLine]:
    """The lines of ``messages`` (``Joiner.piece``), as they end, then those the stream ended inside."""
    piece, opened, top = joiner.piece, joiner._open, LINE_MAX_BYTES
    for key, head, text, ended in messages:
        if ended and not opened and len(text) <= top:
            yield head.decode("ascii", "replace"), text.decode("utf-8", "replace"), False
            continue
        line = piece(key, head, text, ended)
        if line is not None:
            yield line
    yield from joiner.rest()


def _frame_lines(chunks: Iterator[bytes], details: bool) -> Iterator[RawLine]:
    """``stream_lines`` without counts: for a multiplexed stream, ``_frames`` and the joining in one
    loop (a flood's cost is mostly a message's: a short line alone in its frame takes the first
    branch, and one generator stands between the HTTP client and the follower)."""
    joiner = Joiner(details=details)
    data = next(chunks, b"")
    if data and data[0] > 2:  # a TTY's raw stream
        yield from _joined(_raw(data, chunks, details), joiner)
        return
    piece, opened, top = joiner.piece, joiner._open, LINE_MAX_BYTES
    rest = b""
    for chunk in itertools.chain((data,), chunks):
        data = rest + chunk if rest else chunk
        size, at = len(data), 0
        while size - at >= 8:
            stop = at + 8 + int.from_bytes(data[at + 4:at + 8], "big")
            if stop > size:
                break
            start, at = at + 8, stop
            space = data.find(b" ", start, stop)
            if details and space >= 0:
                space = data.find(b" ", space + 1, stop)
            if space < 0:
                continue
            if data[stop - 1] == 10:
                if not opened and stop - space - 2 <= top:
                    yield data[start:space].decode("ascii", "replace"), data[space + 1:stop - 1].decode(
                        "utf-8", "replace"), False
                    continue
                line = piece(data[start - 8:start - 7] + data[start:space], data[start:space],
                             data[space + 1:stop - 1], True)
            else:
                line = piece(data[start - 8:start - 7] + data[start:space], data[start:space],
                             data[space + 1:stop], False)
            if line is not None:
                yield line
        rest = data[at:]
    yield from joiner.rest()


class EngineStream:
    """An engine log stream (``GET /containers/{id}/logs``, ``/services/{id}/logs``, with
    ``timestamps``) read through the client's public HTTP session (``requests``) in reads of up to
    ``READ_BYTES``, its messages parsed here (``stream_lines``): multiplexed frames (an 8-byte
    header: the output, three zero bytes, the length big-endian; then the message) or a TTY's raw
    stream. ``lines`` gives whole lines; iterating gives the messages, as docker-py's streams do.
    ``close`` (from any thread) ends a read blocked on it."""

    def __init__(self, response: requests.Response, *, details: bool) -> None:
        self.details = details
        self._response = response
        self._done = False
        connection = getattr(response.raw, "connection", None)
        #: The stream's socket: its deadline (the client's, for the answer's head) lifted, as docker-py
        #: does for its streams (a quiet app writes nothing for hours), and shut down by ``close``.
        self._sock = getattr(connection, "sock", None)
        if self._sock is not None:
            self._sock.settimeout(None)

    def close(self) -> None:
        if not self._done and self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        self._done = True
        self._response.close()

    def __enter__(self) -> EngineStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[bytes]:
        for _, head, text, ended in _messages(self._chunks(), self.details):
            yield head + b" " + text + (b"\n" if ended else b"")

    def _chunks(self) -> Iterator[bytes]:
        try:
            # The HTTP client's own reads (its chunked coding), undecoded (the engine never compresses
            # a log), its errors as ``requests``' (those ``converted`` knows).
            yield from self._response.raw.stream(READ_BYTES, decode_content=False)
        except urllib3.exceptions.HTTPError as exc:
            raise requests.ConnectionError(f"log stream broken: {exc}") from exc
        finally:
            self._done = True  # the connection goes back to the pool: ``close`` leaves its socket be
            self._response.close()

    def lines(self, counts: dict[str, int] | None = None) -> Iterator[RawLine]:
        """The stream's whole lines, as they end (``stream_lines``)."""
        return stream_lines(self._chunks(), details=self.details, counts=counts)


def _logs(api: Any, path: str, params: dict[str, Any], *, details: bool) -> EngineStream:
    """``GET`` an engine log stream through the client's session (its address, API version and
    deadline); an engine error leaves as docker-py's (``converted`` makes it the project's)."""
    response = api.get(f"{api.base_url}/v{api.api_version}{path}", params=params, stream=True,
                       timeout=api.timeout)
    try:
        response.raise_for_status()
    except requests.HTTPError as exc:
        try:
            docker.errors.create_api_error_from_http_exception(exc)
        finally:
            response.close()
    return EngineStream(response, details=details)


def _log_params(follow: bool, since: float | None, tail: int | None) -> dict[str, Any]:
    params: dict[str, Any] = {"stdout": 1, "stderr": 1, "timestamps": 1, "follow": int(follow),
                              "tail": "all" if tail is None else tail}
    if since is not None and since > 0:
        params["since"] = since
    return params


def container_logs(api: Any, container: str, *, follow: bool = False, since: float | None = None,
                   tail: int | None = None) -> EngineStream:
    """A container's log (stdout and stderr, timestamped), whatever its TTY."""
    return _logs(api, f"/containers/{quote(container, safe='')}/logs", _log_params(follow, since, tail),
                 details=False)


def service_logs(api: Any, service: str, *, follow: bool = False, since: float | None = None,
                 tail: int | None = None) -> EngineStream:
    """A service's log (every task's, stdout and stderr, timestamped, with details)."""
    params = _log_params(follow, since, tail)
    params["details"] = 1
    return _logs(api, f"/services/{quote(service, safe='')}/logs", params, details=True)


def logged_at(read: Callable[..., Any], key: str, given: int, *, tail: int,
              stamp: Callable[[str], str | None], details: bool = False) -> int | None:
    """How many lines a log holds stamped ``key`` (a ``stamp_key``): ``Given``'s ``verify``, for
    both drivers. ``read(tail=...)`` / ``read(since=...)`` opens the log; ``stamp(head)`` is a line's
    ``stamp_key``, or None for a line of another source (a service's other tasks).

    From the log's last ``given + tail`` lines, or, when they do not reach back past ``key`` (the
    app wrote on while the follower was behind), from a read that begins just before it (the engine
    skips what is older) and stops once the lines are ``Given.WINDOW_S`` past it (stdout and stderr
    are stamped apart). None when the engine fails."""
    want = given + tail
    try:
        with read(tail=want) as frames:
            keys = [k for head, _, _ in whole_lines(frames, details=details) if (k := stamp(head)) is not None]
        if len(keys) < want or keys[0] < key:
            return keys.count(key)
        seconds = stamp_seconds(key)
        past, count = key_at(seconds + Given.WINDOW_S), 0
        with read(since=seconds - 0.001) as frames:
            for head, _, _ in whole_lines(frames, details=details):
                found = stamp(head)
                if found is not None and found > past:
                    break
                count += found == key
        return count
    except (requests.RequestException, docker.errors.DockerException, OSError):
        return None


def whole_lines(frames: Iterable[bytes], *, details: bool = False) -> Iterator[RawLine]:
    """The lines of an engine log stream's messages (see ``Joiner``), as they end; an ``EngineStream``
    is read as it comes (its own ``lines``)."""
    if isinstance(frames, EngineStream):
        return frames.lines()
    return _fed(frames, Joiner(details=details))


def _fed(frames: Iterable[bytes], joiner: Joiner) -> Iterator[RawLine]:
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
        frames = read(asked)
        lines_read = (frames.lines(counts) if isinstance(frames, EngineStream)
                      else whole_lines(counted(frames, counts), details=details))
        for line in lines_read:
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
              labels: dict[str, str], log: Callable[[str], None], target: str = "") -> None:
    """``docker build`` on ``api``, its output streamed to ``log``; an error it reports raises
    ``build_failed`` (the engine's own errors are the caller's to convert). Never pulls: a ``FROM``
    image must be on the engine or named with a registry."""
    for chunk in api.build(path=str(context), dockerfile=dockerfile, tag=tag, buildargs=args or None,
                           labels=labels, rm=True, forcerm=True, decode=True, target=target or None):
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
               app: str, log: Callable[[str], None], target: str = "") -> None:
        """``docker build`` of an app's image with its labels, output to ``log``; raises ``build_failed``."""
        with build_errors(log):
            run_build(self.api, context=context, dockerfile=dockerfile, tag=tag, args=args,
                      labels=self._app_labels(org, app), log=log, target=target)
