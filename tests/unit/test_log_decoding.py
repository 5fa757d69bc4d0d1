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
    from cynchrod.runtime.local import _Given

    lines = [(stamp(ns), f"line {i}") for i, ns in enumerate([100, 100, 100, 200, 500000000, 500000000, 500000001,
                                                            600000000, 600000000, 700000000])]
    given, out = _Given(), []
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
    from cynchrod.runtime.local import _Given

    given = _Given()
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
    from cynchrod.runtime.local import _Given

    given = _Given()
    for ns in range(0, 900_000_000, 100_000):  # 9,000 lines over 0.9 s
        given.fresh(stamp(ns))
        if ns % 10_000_000 == 0:
            given.forget()
    given.forget()
    assert len(given.recent) == len(given.recent_keys) <= 2600  # about WINDOW_S of them


def test_a_flowing_stream_is_given_as_the_engine_sends_it() -> None:
    """Past the point where it was opened, nothing is filtered: stdout and stderr lines may be a
    little out of time order, and lines may share a timestamp and a text (two blank lines)."""
    from cynchrod.runtime.local import _Given

    given = _Given()
    sent = [stamp(7), stamp(7), stamp(9), stamp(8), stamp(9)]
    assert [given.fresh(s) for s in sent] == [True] * 5
    given.reopened()
    assert [given.fresh(s) for s in [stamp(8), stamp(9), stamp(9), stamp(9), stamp(10)]] == [False, False, False,
                                                                                             True, True]


def test_lines_sharing_a_timestamp_are_all_given() -> None:
    from cynchrod.runtime.local import _Given

    given = _Given()
    assert [given.fresh(stamp(7)) for _ in range(5)] == [True] * 5
    given.reopened()
    assert [given.fresh(stamp(7)) for _ in range(6)] == [False] * 5 + [True]  # the five again, then a sixth
