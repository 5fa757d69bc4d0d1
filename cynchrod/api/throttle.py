"""Back-off for clients that fail to authenticate: per client address, shared by the API workers.

A client address whose credentials (a bearer token, a dashboard sign-in, a log stream's
``?token=`` or ``?ticket=``) were wrong ``FREE`` times (``--auth-failures``) is refused with ``429
too_many_attempts`` and ``Retry-After`` for ``BASE_S`` seconds, doubling with each further
failure up to ``MAX_S``; ``FORGET_S`` without a failure and it starts over. While an
address is refused, its requests are not checked at all (a correct token from it waits
too: a success does not reset the count, or one valid token would buy unlimited guesses at
the others). Requests that authenticate are never counted or slowed: they cost one lookup
in memory.

The table lives in an anonymous shared memory map made by gunicorn's master before it
forks (``cynchrod.daemon.apiserver``), so every worker process sees the same counts; a
``Table()`` made inside one process (tests, one worker) is that process's alone. It is a
fixed array of ``SLOTS`` records (40 bytes each, 160 KiB in all): ``WAYS`` records per set,
the set chosen by a keyed hash of the address (the key is random per daemon, so an attacker
cannot aim at one set); a new address takes its set's least recently failed record. Memory
is bounded whatever the number of addresses; an address evicted by others is forgotten,
which only ever favours it. IPv6 addresses count by their /64 (one host holds a whole /64).
"""

from __future__ import annotations

import hashlib
import ipaddress
import mmap
import multiprocessing
import secrets
import struct
import time

#: Failures an address may make before it is refused.
FREE = 10
#: The first refusal's length; each further failure doubles it, up to ``MAX_S``.
BASE_S = 1.0
MAX_S = 60.0
#: Seconds without a failure after which an address starts over.
FORGET_S = 15 * 60.0
#: Records in the table, and per set.
SLOTS = 4096
WAYS = 8
#: Longest wait for the table's lock (held for microseconds): past it, the request goes on
#: unthrottled rather than stall a worker (a worker killed while holding it cannot block the others).
LOCK_WAIT_S = 0.05

# key (16 bytes), failures, last failure, refused until (epoch seconds)
_RECORD = struct.Struct("16sddd")
_EMPTY = bytes(16)


def client_key(address: str | None) -> bytes:
    """16 bytes per client: an IPv4 address, an IPv6 address's /64, or a digest of anything else."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return hashlib.blake2b((address or "?").encode(), digest_size=16).digest()
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return ip.packed[:8] + bytes(8)
    v4 = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else ip
    assert v4 is not None
    return b"\xff" * 12 + v4.packed  # never an IPv6 /64 key (their last 8 bytes are zero)


class Table:
    """Failure counts per client address, in memory shared with processes forked after it was made."""

    def __init__(self, slots: int = SLOTS, *, free: int = FREE) -> None:
        #: Failures an address may make before it is refused (``--auth-failures``).
        self.free = free
        self.sets = max(1, slots // WAYS)
        self._mem = mmap.mmap(-1, _RECORD.size * self.sets * WAYS)
        self._lock = multiprocessing.get_context("fork").Lock()
        self._salt = secrets.token_bytes(16)

    def _set(self, key: bytes) -> int:
        return int.from_bytes(hashlib.blake2b(key, digest_size=8, key=self._salt).digest(), "big") % self.sets

    def _find(self, key: bytes) -> tuple[int, tuple[bytes, float, float, float] | None]:
        """The record's offset and its values if ``key`` has one, else the offset to take and None."""
        base = self._set(key) * WAYS
        oldest, oldest_at = base, float("inf")
        for i in range(base, base + WAYS):
            offset = i * _RECORD.size
            record = _RECORD.unpack_from(self._mem, offset)
            if record[0] == key:
                return offset, record
            at = -1.0 if record[0] == _EMPTY else record[2]
            if at < oldest_at:
                oldest, oldest_at = i, at
        return oldest * _RECORD.size, None

    def refused_for(self, address: str | None, *, now: float | None = None) -> int | None:
        """Seconds (rounded up, at least 1) this client must wait before it may try again, or None."""
        now = time.time() if now is None else now
        if not self._lock.acquire(timeout=LOCK_WAIT_S):
            return None
        try:
            _, record = self._find(client_key(address))
        finally:
            self._lock.release()
        if record is None or record[3] <= now:
            return None
        return max(1, int(-(-(record[3] - now) // 1)))

    def failed(self, address: str | None, *, now: float | None = None) -> None:
        """Count one failure of this client; past ``FREE`` of them, it is refused for a while."""
        now = time.time() if now is None else now
        key = client_key(address)
        if not self._lock.acquire(timeout=LOCK_WAIT_S):
            return
        try:
            offset, record = self._find(key)
            failures = 0.0 if record is None or now - record[2] > FORGET_S else record[1]
            failures += 1
            until = record[3] if record is not None else 0.0
            if failures >= self.free:
                until = max(until, now + min(MAX_S, BASE_S * 2 ** min(failures - self.free, 32)))
            _RECORD.pack_into(self._mem, offset, key, failures, now, until)
        finally:
            self._lock.release()
