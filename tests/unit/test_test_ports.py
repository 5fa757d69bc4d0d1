"""The suite's own port picks (``tests.helpers.free_port``): each xdist worker has a block of its
own below the kernel's ephemeral range, so no outgoing connection and no other worker can take a
port between its pick and the server's bind (two Caddy instances once came up on each other's ports)."""

from __future__ import annotations

import pathlib
import socket

import pytest

from tests import helpers


def _block(monkeypatch: pytest.MonkeyPatch, worker: str | None) -> range:
    if worker is None:
        monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    else:
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    return helpers._port_block()


def test_workers_have_disjoint_blocks_below_the_ephemeral_range(monkeypatch: pytest.MonkeyPatch) -> None:
    first_ephemeral = int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    blocks = [_block(monkeypatch, None)] + [_block(monkeypatch, f"gw{i}") for i in range(8)]
    seen: set[int] = set()
    for block in blocks:
        assert block.stop <= first_ephemeral
        assert not seen & set(block)
        seen |= set(block)


def test_a_port_is_not_handed_out_twice_and_a_held_one_is_skipped() -> None:
    first = helpers.free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", first + 1))  # the next in line is held by someone
        second = helpers.free_port()
    assert second not in (first, first + 1)
