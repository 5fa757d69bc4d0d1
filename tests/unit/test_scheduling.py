"""Wake-ups on a fake clock: the scheduler's order and the webhook debounce, with no sleeps."""

from __future__ import annotations

import logging
import threading

import pytest

from cynchrod.shell.scheduling import DEBOUNCE_S, Scheduler, Wakeup, strongest


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, s: float) -> None:
        self.now += s


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def scheduler(clock: Clock) -> Scheduler:
    return Scheduler(clock=clock, threaded=False)


def test_calls_run_when_due_in_due_order_ties_in_call_order(clock: Clock, scheduler: Scheduler) -> None:
    ran: list[str] = []
    scheduler.call_later(2, lambda: ran.append("b"))
    scheduler.call_later(1, lambda: ran.append("a"))
    scheduler.call_later(2, lambda: ran.append("c"))
    scheduler.call_later(-5, lambda: ran.append("now"))  # a negative delay is now
    assert scheduler.run_due() == 1 and ran == ["now"]
    assert scheduler.due_in() == 1
    clock.advance(1.5)
    assert scheduler.run_due() == 1 and ran == ["now", "a"]
    clock.advance(0.5)
    assert scheduler.run_due() == 2 and ran == ["now", "a", "b", "c"]
    assert scheduler.due_in() is None and scheduler.run_due() == 0


def test_a_call_that_raises_is_logged_and_the_next_still_runs(
        clock: Clock, scheduler: Scheduler, caplog: pytest.LogCaptureFixture) -> None:
    ran: list[str] = []

    def boom() -> None:
        raise RuntimeError("boom")

    scheduler.call_later(0, boom)
    scheduler.call_later(0, lambda: ran.append("next"))
    with caplog.at_level(logging.ERROR, logger="cynchrod.reconciler"):
        assert scheduler.run_due() == 2
    assert ran == ["next"]
    assert "scheduled call failed" in caplog.text


def test_stop_drops_what_is_not_run(clock: Clock, scheduler: Scheduler) -> None:
    ran: list[str] = []
    scheduler.call_later(1, lambda: ran.append("late"))
    scheduler.stop()
    clock.advance(5)
    assert scheduler.run_due() == 0 and ran == []


def test_the_thread_runs_a_due_call_and_ends_on_stop() -> None:
    real = Scheduler()
    ran = threading.Event()
    real.call_later(0, ran.set)
    assert ran.wait(5)
    real.stop()
    assert real._thread is not None and not real._thread.is_alive()


def test_requests_before_a_wait_coalesce_into_one(scheduler: Scheduler) -> None:
    wakeup = Wakeup(scheduler)
    for trigger in ("poll", "webhook", "poll", "self-heal"):
        wakeup.request(trigger)
    assert wakeup.wait(0) == {"poll", "webhook", "self-heal"}
    assert wakeup.wait(0) == set()


def test_a_delayed_request_arrives_when_due(clock: Clock, scheduler: Scheduler) -> None:
    wakeup = Wakeup(scheduler)
    wakeup.request_at(4, "self-heal")
    clock.advance(3.9)
    scheduler.run_due()
    assert wakeup.wait(0) == set()
    clock.advance(0.1)
    scheduler.run_due()
    assert wakeup.wait(0) == {"self-heal"}


def test_a_lone_webhook_wakes_one_pass_and_no_trailing_one(clock: Clock, scheduler: Scheduler) -> None:
    wakeup = Wakeup(scheduler)
    wakeup.request_debounced("webhook")
    assert wakeup.wait(0) == {"webhook"}  # the leading edge: at once
    clock.advance(DEBOUNCE_S)
    scheduler.run_due()
    assert wakeup.wait(0) == set()
    wakeup.request_debounced("webhook")  # the burst is over: a new one leads again
    assert wakeup.wait(0) == {"webhook"}


def test_a_burst_is_one_pass_at_once_and_one_after_it_goes_quiet(clock: Clock, scheduler: Scheduler) -> None:
    wakeup = Wakeup(scheduler)
    wakeup.request_debounced("webhook")
    assert wakeup.wait(0) == {"webhook"}
    for _ in range(5):  # deliveries 0.3 s apart keep the burst open
        clock.advance(0.3)
        wakeup.request_debounced("webhook")
        scheduler.run_due()
        assert wakeup.wait(0) == set()
    clock.advance(DEBOUNCE_S - 0.01)
    scheduler.run_due()
    assert wakeup.wait(0) == set()
    clock.advance(0.01)
    scheduler.run_due()
    assert wakeup.wait(0) == {"webhook"}  # the trailing edge: one pass for the rest
    clock.advance(10)
    scheduler.run_due()
    assert wakeup.wait(0) == set() and scheduler.due_in() is None


def test_bursts_of_different_triggers_are_apart(clock: Clock, scheduler: Scheduler) -> None:
    wakeup = Wakeup(scheduler)
    wakeup.request_debounced("webhook")
    wakeup.request_debounced("watch", quiet_s=2)
    wakeup.request_debounced("watch", quiet_s=2)
    assert wakeup.wait(0) == {"webhook", "watch"}
    clock.advance(DEBOUNCE_S)
    scheduler.run_due()
    assert wakeup.wait(0) == set()  # the webhook's burst had no more
    clock.advance(2)
    scheduler.run_due()
    assert wakeup.wait(0) == {"watch"}


def test_a_waiter_is_woken_by_a_request_from_another_thread(scheduler: Scheduler) -> None:
    wakeup = Wakeup(scheduler)
    threading.Thread(target=wakeup.request, args=("api",)).start()
    assert wakeup.wait(10) == {"api"}


@pytest.mark.parametrize(("triggers", "expected"), [
    ({"poll", "self-heal"}, "self-heal"), ({"webhook", "api", "poll"}, "api"), (set(), "poll"),
    ({"stop"}, "poll"), ({"build", "watch"}, "watch")])
def test_a_pass_woken_by_several_is_the_strongest(triggers: set[str], expected: str) -> None:
    assert strongest(triggers) == expected
