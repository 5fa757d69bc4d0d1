"""The wire encoding of a log stream: lines as JSON pieces, WebSocket messages framed once.

Used by the hub (``hub``: one encoding per batch for all of a worker's clients of an app),
the relay (``relay``: the leader's messages handed on whole) and the pump (``pump``). Also
the WebSocket close codes the routes (``routes``) and the pump end a stream with.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from typing import Any

from cynchrod.runtime import CUT_MARK, LogLine

#: Lines are encoded once per app in pieces of about this size, which messages then join.
PIECE_BYTES = 16 * 1024
#: No WebSocket message is longer than this (its JSON array) ...
MESSAGE_BYTES = 64 * 1024
#: ... so no line's JSON object is longer than this: a line the runtime gave whole (up to 32 KiB of
#: text) whose escapes (control characters, ``\uXXXX`` for the rest of Unicode) make it longer is cut
#: further, with the runtime's marker and ``truncated``.
LINE_JSON_BYTES = MESSAGE_BYTES - 2

# WebSocket close codes (4000-4999 are the application's).
CLOSE_UNAUTHORIZED = 4401
CLOSE_NOT_FOUND = 4404
CLOSE_BUSY = 4429
CLOSE_NORMAL = 1000


_encode = json.encoder.encode_basestring_ascii


def encode_lines(lines: list[LogLine]) -> list[tuple[str, int]]:
    """``lines`` as pieces of a message's JSON array (``LogLine.to_json`` objects, comma
    separated, no brackets), each at most about ``PIECE_BYTES``, with its count of lines.
    Done once per batch for all the clients of the app."""
    pieces: list[tuple[str, int]] = []
    out: list[str] = []
    size = 0
    services: dict[str, str] = {}
    for line in lines:
        service = services.get(line.service)
        if service is None:
            service = services[line.service] = _encode(line.service)
        head = f'{{"service":{service},"timestamp":{_encode(line.timestamp)},"line":'
        tail = ""
        if line.replica:
            tail += f',"replica":{int(line.replica)}'
        if line.node:
            tail += f',"node":{_encode(line.node)}'
        body = _encode(line.line)
        if len(head) + len(body) + len(tail) + 18 > LINE_JSON_BYTES:
            body, cut = _fitted(line.line, LINE_JSON_BYTES - len(head) - len(tail) - 18)
        else:
            cut = line.truncated
        text = head + body + tail + (',"truncated":true}' if cut else "}")
        if out and size + len(text) > PIECE_BYTES:  # a long line starts a piece of its own
            pieces.append((",".join(out), len(out)))
            out, size = [], 0
        out.append(text)
        size += len(text) + 1
        if size >= PIECE_BYTES:
            pieces.append((",".join(out), len(out)))
            out, size = [], 0
    if out:
        pieces.append((",".join(out), len(out)))
    return pieces


def _fitted(line: str, room: int) -> tuple[str, bool]:
    """A line's JSON string in ``room`` bytes, its text cut (and marked as the runtime marks a cut)
    as little as that needs: True when it was cut."""
    mark = CUT_MARK if not line.endswith(CUT_MARK) else ""
    text = line.removesuffix(CUT_MARK)
    body = _encode(text + mark)
    while len(body) > room:
        keep = max(0, min(len(text) - 1, len(text) * (room - len(mark) - 2) // len(body)))
        text = text[:keep]
        body = _encode(text + CUT_MARK)
        mark = CUT_MARK
    return body, bool(mark) or line.endswith(CUT_MARK)


class Frame:
    """One WebSocket text message (a JSON array of lines), framed once for all of a worker's
    clients of the app: each client's socket gets these bytes as they are (``pump._send``), not a
    message framed (and compressed) by wsproto per client, which cost 70 µs a message a client.

    A client that negotiated permessage-deflate gets the message compressed once with a fresh
    context (RFC 7692 lets the server use no context takeover whatever was negotiated, and a
    message that refers to nothing before it is decoded by any client's decompressor); every
    data message of a stream is sent this way, so wsproto's own compression context is never
    used and cannot go out of step with the client's."""

    __slots__ = ("_deflated", "_plain", "lines", "payload")

    def __init__(self, payload: bytes, lines: int) -> None:
        self.payload, self.lines = payload, lines
        self._plain: bytes | None = None
        self._deflated: bytes | None = None

    def plain(self) -> bytes:
        if self._plain is None:
            self._plain = _frame(0x81, self.payload)  # FIN, text
        return self._plain

    def deflated(self) -> bytes:
        if self._deflated is None:
            packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
            body = packer.compress(self.payload) + packer.flush(zlib.Z_SYNC_FLUSH)
            self._deflated = _frame(0xC1, body[:-4] if body.endswith(b"\x00\x00\xff\xff") else body)  # FIN, RSV1
        return self._deflated


def _frame(first: int, body: bytes) -> bytes:
    """A server-to-client WebSocket frame (never masked, RFC 6455 5.1): first byte, length, body."""
    size = len(body)
    if size < 126:
        return struct.pack(">BB", first, size) + body
    if size < 1 << 16:
        return struct.pack(">BBH", first, 126, size) + body
    return struct.pack(">BBQ", first, 127, size) + body


def deflates(ws: Any) -> bool:
    """Whether this connection negotiated permessage-deflate (wsproto keeps the extensions
    it enabled in its frame protocol); False when that cannot be read (sent uncompressed,
    which is always valid)."""
    try:
        extensions = ws.ws.connection._proto.extensions
    except AttributeError:
        return False
    return any(getattr(ext, "name", "") == "permessage-deflate" for ext in extensions)


def dropped_frame(dropped: int) -> Frame:
    notice = json.dumps({"service": "", "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         "line": f"[cynchrod: {dropped} lines dropped: this client reads slower than "
                                 "the app writes]", "dropped": dropped})
    return Frame(f"[{notice}]".encode(), 0)
