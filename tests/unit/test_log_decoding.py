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
