"""A log stream's messages, framed once and written by the hub to idle clients' sockets
(``cynchrod.api.logs.hub.Client``), on a real socket pair."""

from __future__ import annotations

import socket
import zlib

from gevent import socket as gsocket

from cynchrod.api import logs
from cynchrod.api.logs import hub


class _Ws:
    """What ``hub.Client`` reads of flask-sock's WebSocket: its socket (no extension negotiated)."""

    def __init__(self, sock: gsocket.socket) -> None:
        self.sock = sock
        self.connected = True
        self.ws = None


def test_an_idle_client_is_written_to_at_once_and_a_busy_one_queues() -> None:
    ours, theirs = gsocket.socketpair()
    theirs.settimeout(5)
    client = hub.Client(_Ws(ours))
    frame = logs.Frame(b'[{"service":"main","timestamp":"t","line":"x"}]', 1)
    client.idle = True
    client.offer([frame])
    assert theirs.recv(1000) == frame.plain() and not client.pieces and not client.rest
    client.idle = False  # its pump is writing: the message waits for it, in order
    client.offer([frame])
    assert list(client.pieces) == [frame] and client.ready.is_set()
    ours.close()
    theirs.close()


def test_what_a_full_socket_does_not_take_waits_for_the_pump() -> None:
    ours, theirs = gsocket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client = hub.Client(_Ws(ours))
    client.idle = True
    big = logs.Frame(b"[" + b'"x",' * 250_000 + b'"x"]', 250_001)
    client.offer([big])
    assert client.rest and client.ready.is_set()  # the socket took part of it
    client.offer([big])  # a later message never overtakes the rest of an earlier one
    assert list(client.pieces) == [big]
    ours.close()
    theirs.close()


def test_frames_are_valid_websocket_frames() -> None:
    payload = b"[" + b'"line",' * 30 + b'"end"]'
    plain = logs.Frame(payload, 31).plain()
    assert plain[0] == 0x81 and plain[1] == 126 and int.from_bytes(plain[2:4], "big") == len(payload)
    assert plain[4:] == payload
    deflated = logs.Frame(payload, 31).deflated()
    assert deflated[0] == 0xC1  # FIN, RSV1 (compressed), text
    size, body = deflated[1], deflated[2:]
    assert size == len(body) < len(payload)
    assert zlib.decompressobj(-zlib.MAX_WBITS).decompress(body + b"\x00\x00\xff\xff") == payload
    assert logs.Frame(b"x" * 70_000, 1).plain()[1] == 127
