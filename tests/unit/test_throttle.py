"""The authentication back-off's table (``cynchrod.api.throttle``): counts, back-off, bounds."""

from __future__ import annotations

from cynchrod.api import throttle


def _fail(table: throttle.Table, address: str, times: int, now: float) -> None:
    for _ in range(times):
        table.failed(address, now=now)


def test_an_address_is_refused_after_its_free_failures_and_backs_off_doubling() -> None:
    table = throttle.Table()
    _fail(table, "10.0.0.1", throttle.FREE - 1, 100.0)
    assert table.refused_for("10.0.0.1", now=100.0) is None
    table.failed("10.0.0.1", now=100.0)
    assert table.refused_for("10.0.0.1", now=100.0) == 1
    assert table.refused_for("10.0.0.1", now=101.0) is None
    table.failed("10.0.0.1", now=101.0)
    assert table.refused_for("10.0.0.1", now=101.0) == 2
    _fail(table, "10.0.0.1", 40, 103.0)  # the doubling stops at MAX_S (and does not overflow)
    assert table.refused_for("10.0.0.1", now=103.0) == throttle.MAX_S
    assert table.refused_for("10.0.0.2", now=103.0) is None  # others are not touched


def test_quiet_for_forget_s_an_address_starts_over() -> None:
    table = throttle.Table()
    _fail(table, "10.0.0.1", throttle.FREE + 3, 100.0)
    later = 100.0 + throttle.FORGET_S + 1
    table.failed("10.0.0.1", now=later)
    assert table.refused_for("10.0.0.1", now=later) is None


def test_ipv6_counts_per_64_and_ipv4_mapped_as_ipv4() -> None:
    table = throttle.Table()
    for i in range(throttle.FREE):
        table.failed(f"2001:db8::{i + 1:x}", now=100.0)
    assert table.refused_for("2001:db8::ffff:1234", now=100.0) == 1
    assert table.refused_for("2001:db8:0:1::1", now=100.0) is None
    _fail(table, "::ffff:192.0.2.7", throttle.FREE, 100.0)
    assert table.refused_for("192.0.2.7", now=100.0) == 1
    assert throttle.client_key("192.0.2.7") != throttle.client_key("::c000:207")
    _fail(table, None, throttle.FREE, 100.0)  # no address (a unix socket): one key for all
    assert table.refused_for(None, now=100.0) == 1


def test_the_table_is_bounded_and_the_newest_failures_are_kept() -> None:
    table = throttle.Table(slots=64)
    size = len(table._mem)
    for i in range(5000):  # far more addresses than records
        table.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", now=float(i))
    assert len(table._mem) == size == 64 * 40
    # The latest blocked address is still there, the earliest are forgotten.
    _fail(table, "192.0.2.1", throttle.FREE, 6000.0)
    assert table.refused_for("192.0.2.1", now=6000.0) == 1


def test_the_free_failures_are_a_setting() -> None:
    table = throttle.Table(free=3)
    _fail(table, "10.0.0.1", 2, 100.0)
    assert table.refused_for("10.0.0.1", now=100.0) is None
    table.failed("10.0.0.1", now=100.0)
    assert table.refused_for("10.0.0.1", now=100.0) == 1
