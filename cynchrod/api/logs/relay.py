"""The cross-process relay of a log stream: how one API worker hands an app's messages to the others.

The worker that leads an app (``hub.Hub``) listens on the app's relay address, an abstract
Unix socket; the other workers connect to it and read the leader's messages as records
(``pack``/``unpack``: a payload's length and its count of lines, then the payload), which
they give on to their clients as they are. Binding the address is the election.
"""

from __future__ import annotations

import hashlib
import pathlib
import socket
import struct

from cynchrod.api.logs.frames import Frame

_RELAYED = struct.Struct(">II")  # a relayed message: its payload's length, its count of lines


def relay_address(state: pathlib.Path, key: tuple[str, str]) -> str:
    """The abstract Unix socket through which one worker relays an app's lines to the others
    (Linux's abstract namespace: no file, released when its holder closes it or dies)."""
    digest = hashlib.sha256(f"{state.resolve()}\0{key[0]}\0{key[1]}".encode()).hexdigest()[:40]
    return f"\0cynchrod-logs-{digest}"


def listen(address: str) -> socket.socket | None:
    """The app's relay socket, listening; None when another worker holds it (it leads)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(address)
        listener.listen(64)
    except OSError:
        listener.close()
        return None
    return listener


def connect(address: str) -> socket.socket | None:
    """A connection to the leader; None when there is none (it is closing: the next round elects)."""
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        upstream.connect(address)
    except OSError:
        upstream.close()
        return None
    return upstream


def pack(frames: list[Frame]) -> bytes:
    """Messages as the records a peer reads."""
    return b"".join(_RELAYED.pack(len(f.payload), f.lines) + f.payload for f in frames)


def unpack(buf: bytes) -> tuple[list[Frame], bytes]:
    """The whole records at the start of ``buf`` as messages, and the bytes of a record not yet whole."""
    frames, pos = [], 0
    while len(buf) - pos >= _RELAYED.size:
        size, n = _RELAYED.unpack_from(buf, pos)
        if len(buf) - pos - _RELAYED.size < size:
            break
        start = pos + _RELAYED.size
        frames.append(Frame(buf[start:start + size], n))
        pos = start + size
    return frames, buf[pos:]
