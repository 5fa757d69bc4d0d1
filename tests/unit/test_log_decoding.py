"""Decoding Docker's followed log response (chunked HTTP carrying multiplexed frames) and
encoding lines for the WebSocket, against the plain definitions, with reads cut anywhere."""

from __future__ import annotations

import json
import random

from cynchrod.api.logs import PIECE_BYTES, encode_lines
from cynchrod.runtime import LogLine
from cynchrod.runtime.local import _Dechunk, _Frames


def frame(payload: bytes, stream: int = 1) -> bytes:
    return bytes([stream, 0, 0, 0]) + len(payload).to_bytes(4, "big") + payload


def chunked(parts: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n" % len(p) + p + b"\r\n" for p in parts) + b"0\r\n\r\n"


def cut(data: bytes, rng: random.Random) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        step = rng.choice([1, 2, 3, 7, 9, 64, 1000])
        out.append(data[pos:pos + step])
        pos += step
    return out


def test_frames_in_chunks_decode_whole_however_the_reads_are_cut() -> None:
    rng = random.Random(15)
    lines = [f"2026-11-29T20:00:{i % 60:02d}.{i:09d}Z line {i} é\u2603".encode() for i in range(500)]
    lines.append(b"x" * 20000)  # longer than one read
    frames = [frame(line + b"\n", stream=1 + i % 2) for i, line in enumerate(lines)]
    # A chunk may hold several frames or part of one (the engine flushes per line, but the
    # transfer coding does not promise it).
    stream = b"".join(frames)
    parts, pos = [], 0
    while pos < len(stream):
        step = rng.choice([5, 8, 40, 300])
        parts.append(stream[pos:pos + step])
        pos += step
    body = chunked(parts) + b"trailing bytes after the last chunk are not data"
    for _ in range(5):
        chunks, decoded = _Dechunk(), _Frames()
        payload = b"".join(decoded.feed(chunks.feed(piece)) for piece in cut(body, rng))
        assert chunks.done
        assert payload.split(b"\n")[:-1] == lines


def test_chunk_extensions_and_an_empty_read() -> None:
    chunks = _Dechunk()
    assert chunks.feed(b"") == b""
    assert chunks.feed(b"3;ext=1\r\nabc\r\n") == b"abc"
    assert not chunks.done
    assert chunks.feed(b"0\r\n\r\n") == b""
    assert chunks.done


def test_encoded_pieces_are_the_lines_json() -> None:
    kinds = [lambda i: LogLine("web", "2026-11-29T20:00:00.1Z", f'line {i} "quoted" \\ \t \u2603 \x00'),
             lambda i: LogLine("db", "2026-11-29T20:00:00.2Z", "", replica=2),
             lambda i: LogLine("api", "2026-11-29T20:00:00.3Z", f"x{i}", node="node-1")]
    lines = [kinds[i % 3](i) for i in range(3000)]
    pieces = encode_lines(lines)
    assert len(pieces) > 1
    assert all(len(text) < PIECE_BYTES + 200 for text, _ in pieces)
    assert sum(n for _, n in pieces) == len(lines)
    decoded = json.loads("[" + ",".join(text for text, _ in pieces) + "]")
    assert decoded == [line.to_json() for line in lines]
    assert encode_lines([]) == []


def stamp(ns: int) -> str:
    """Docker's form: RFC 3339 with the fraction's trailing zeros trimmed."""
    frac = f"{ns:09d}".rstrip("0")
    return f"2026-11-29T22:54:26{'.' + frac if frac else ''}Z"


def test_a_stream_opened_again_gives_no_line_twice_and_loses_none() -> None:
    """The engine's stream of one container, ended and opened again from a little before the
    last line given: lines sharing timestamps (one read from the container stamps them all)."""
    from cynchrod.runtime._docker import Given

    lines = [(stamp(ns), f"line {i}") for i, ns in enumerate([100, 100, 100, 200, 500000000, 500000000, 500000001,
                                                            600000000, 600000000, 700000000])]
    given, out = Given(), []
    for s, text in lines[:8]:  # ... up to the first line at .6
        if given.fresh(s):
            out.append(text)
    given.reopened()
    for s, text in lines[5:]:  # the new stream starts a little earlier
        if given.fresh(s):
            out.append(text)
    assert out == [text for _, text in lines]
    # Trailing zeros trimmed still sort in time order: .5 after .000000100, before .500000001.
    assert stamp(500000000) == "2026-11-29T22:54:26.5Z"


def test_a_repeat_after_a_rotation_is_dropped_and_a_line_out_of_order_is_kept() -> None:
    """json-file rotating under a follower: the engine sends the new file's first lines again
    (measured: 32 lines over 0.3 ms, 1,325 over 28 ms). A stderr line stamped a little before
    the stdout line given last is a line, not a repeat: its timestamp was never given."""
    from cynchrod.runtime._docker import Given

    given = Given()
    sent = [(100, "a"), (200, "b"), (200, "c"), (5000, "out"), (4000, "err"), (9000, "d")]
    assert [given.fresh(stamp(ns)) for ns, _ in sent] == [True] * 6
    # The rotation: back to the line at 200, then every line given again, then new ones.
    assert [given.fresh(stamp(ns)) for ns, _ in sent[1:]] == [False] * 5
    assert given.fresh(stamp(9500)) is True
    assert given.fresh(stamp(9400)) is True  # never given: a line a little out of order
    # Far back (more than WINDOW_S), whatever it is, is a repeat.
    assert given.fresh(stamp(300_000_000)) is True
    assert given.fresh(stamp(100)) is False


def test_remembered_timestamps_are_bounded() -> None:
    from cynchrod.runtime._docker import Given

    given = Given()
    for ns in range(0, 900_000_000, 100_000):  # 9,000 lines over 0.9 s
        given.fresh(stamp(ns))
        if ns % 10_000_000 == 0:
            given.forget()
    given.forget()
    assert len(given.recent) == len(given.recent_keys) <= 2600  # about WINDOW_S of them


def test_a_flowing_stream_is_given_as_the_engine_sends_it() -> None:
    """Past the point where it was opened, nothing is filtered: stdout and stderr lines may be a
    little out of time order, and lines may share a timestamp and a text (two blank lines)."""
    from cynchrod.runtime._docker import Given

    given = Given()
    sent = [stamp(7), stamp(7), stamp(9), stamp(8), stamp(9)]
    assert [given.fresh(s) for s in sent] == [True] * 5
    given.reopened()
    assert [given.fresh(s) for s in [stamp(8), stamp(9), stamp(9), stamp(9), stamp(10)]] == [False, False, False,
                                                                                             True, True]


def test_lines_sharing_a_timestamp_are_all_given() -> None:
    from cynchrod.runtime._docker import Given

    given = Given()
    assert [given.fresh(stamp(7)) for _ in range(5)] == [True] * 5
    given.reopened()
    assert [given.fresh(stamp(7)) for _ in range(6)] == [False] * 5 + [True]  # the five again, then a sixth


class Log:
    """``Given``'s question to the engine, answered from a list of the timestamps it holds."""

    def __init__(self, stamps: list[str]) -> None:
        self.stamps = stamps
        self.asked: list[tuple[str, int]] = []

    def __call__(self, key: str, given: int) -> int | None:
        from cynchrod.runtime._docker import stamp_key

        self.asked.append((key, given))
        return [stamp_key(s) for s in self.stamps].count(key)


def test_a_repeat_with_the_last_timestamp_is_dropped_when_the_log_holds_no_more() -> None:
    """A rotation whose new file held only lines stamped like the last one given: they come
    again with that timestamp. The log holds as many such lines as were given: a repeat."""
    from cynchrod.runtime._docker import Given, stamp_key

    log = Log([stamp(100), stamp(200), stamp(200), stamp(200)])
    given = Given(log)
    sent = [(100, "a"), (200, "b"), (200, "c"), (200, "d")]
    assert [given.fresh(stamp(ns), text) for ns, text in sent] == [True] * 4
    assert log.asked == []  # a line not seen with that timestamp is never asked about
    # The new file held "c" and "d": both again, then a newer line.
    assert [given.fresh(stamp(200), text) for text in ("c", "d")] == [False, False]
    assert log.asked == [(stamp_key(stamp(200)), 3)]
    assert given.fresh(stamp(300), "e") is True
    # A line in another stamp's texts is nothing: "e" at 300 is the last, "b" was at 200.
    assert given.fresh(stamp(300), "b") is True


def test_a_line_repeating_the_one_before_in_the_same_read_is_given() -> None:
    """Two blank lines written at once share a timestamp; the engine may send them in two
    parts. The log holds both: the second is a line, not a repeat."""
    from cynchrod.runtime._docker import Given

    log = Log([stamp(100), stamp(100)])
    given = Given(log)
    assert given.fresh(stamp(100), "") is True
    assert given.fresh(stamp(100), "") is True
    assert len(log.asked) == 1


def test_without_an_answer_or_past_the_budget_a_possible_repeat_is_given() -> None:
    """No engine to ask (the Swarm follower), an answer that does not reach back, or more
    questions than the budget: the line is given. A repeat may pass; a line is never lost."""
    from cynchrod.runtime._docker import Given

    given = Given()
    assert [given.fresh(stamp(100), "a") for _ in range(2)] == [True, True]
    unknown = Given(lambda key, n: None)
    assert [unknown.fresh(stamp(100), "a") for _ in range(2)] == [True, True]
    asked: list[str] = []

    def one_line(key: str, n: int) -> int:  # the log holds one line a timestamp: every second line repeats
        asked.append(key)
        return 1

    budget, answers = Given(one_line), []
    for i in range(1, Given.VERIFY_BURST + 4):
        assert budget.fresh(stamp(i * 100), "a") is True
        answers.append(budget.fresh(stamp(i * 100), "a"))
    # The first VERIFY_BURST asks (in a moment: none earned back) find the repeats; then they pass.
    assert answers == [False] * Given.VERIFY_BURST + [True] * 3
    assert len(asked) == Given.VERIFY_BURST


def test_a_service_stream_is_opened_again_from_before_its_least_chatty_task() -> None:
    """Swarm: one stream a service, a ``Given`` a task. Opened again from a little before the
    newest line given, a task whose last line given is older lost what it wrote in between;
    from before the oldest (within ``REOPEN_LOOKBACK_S`` of the newest) it loses nothing."""
    from cynchrod.runtime._docker import Given, stamp_seconds
    from cynchrod.runtime.swarm import REOPEN_LOOKBACK_S, reopen_since

    quiet, chatty = Given(), Given()
    assert quiet.fresh(stamp(100_000_000)) and chatty.fresh(stamp(900_000_000))
    since = reopen_since([quiet.last, chatty.last], start=0.0)
    assert since == stamp_seconds(stamp(100_000_000)) - 0.001
    # Opened again from there: each task drops what it gave and keeps what it had not.
    quiet.reopened()
    chatty.reopened()
    assert [quiet.fresh(stamp(ns)) for ns in (100_000_000, 500_000_000)] == [False, True]
    assert [chatty.fresh(stamp(ns)) for ns in (300_000_000, 900_000_000, 950_000_000)] == [False, False, True]
    # A task quiet (or gone) for long is not waited for; nothing given: the follower's start.
    old = "2026-11-29T22:40:00Z"
    assert reopen_since([old, chatty.last], 7.0) == stamp_seconds(chatty.last) - REOPEN_LOOKBACK_S - 0.001
    assert reopen_since(["", ""], 7.0) == 7.0
