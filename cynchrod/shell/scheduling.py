"""Wake-ups: the coalescing trigger queue the daemon loop waits on, and its one timer thread.

Called by the reconciler (``Reconciler.wakeup``: its loop waits here between passes), and
through it by everything that wakes a pass: the timer, webhooks (debounced), watched files,
the API, finished builds, the engine's events and back-off retries (delayed). Both classes
take a clock, so their tests drive time by hand (``tests/unit/test_scheduling.py``):
``Scheduler(threaded=False)`` runs nothing by itself, and ``run_due()`` runs what is due.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable

from cynchrod.core.decisions import TRIGGERS

log = logging.getLogger("cynchrod.reconciler")  # the name the logs have always shown

#: Webhook bursts: deliveries closer than this coalesce into the pass that the first
#: one woke plus one more. Short, so that pushes made one after another are each
#: applied at once rather than held for the trailing pass.
DEBOUNCE_S = 0.5

Clock = Callable[[], float]


def strongest(triggers: Iterable[str]) -> str:
    """The trigger a pass woken by several is recorded under (``TRIGGERS`` order)."""
    found = set(triggers)
    return next((t for t in TRIGGERS if t in found), "poll")


class Scheduler:
    """One thread for every delayed call (back-off wake-ups, trailing webhook passes).

    Calls run in the order they fall due (ties: the order they were scheduled); one that
    raises is logged and the next still runs. With ``threaded=False`` no thread is
    started: the caller runs what is due with ``run_due()`` (the tests, on a fake clock).
    """

    def __init__(self, *, clock: Clock = time.monotonic, threaded: bool = True) -> None:
        self.clock = clock
        self._threaded = threaded
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (self.clock() + max(delay_s, 0.0), next(self._seq), fn))
            if self._threaded and self._thread is None and not self._stopped:
                self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
                self._thread.start()
            self._cond.notify()

    def due_in(self) -> float | None:
        """Seconds until the next call falls due (0 when one is due), None when none is scheduled."""
        with self._cond:
            return self._due_in()

    def _due_in(self) -> float | None:
        return max(self._heap[0][0] - self.clock(), 0.0) if self._heap else None

    def _pop_due(self) -> Callable[[], None] | None:
        if self._stopped or not self._heap or self._heap[0][0] > self.clock():
            return None
        return heapq.heappop(self._heap)[2]

    def run_due(self) -> int:
        """Run every call due now (and those they schedule that are due now too); how many ran."""
        ran = 0
        while True:
            with self._cond:
                fn = self._pop_due()
            if fn is None:
                return ran
            self._call(fn)
            ran += 1

    @staticmethod
    def _call(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            log.exception("scheduled call failed")

    def _run(self) -> None:
        while True:
            with self._cond:
                fn = self._pop_due()
                while fn is None:
                    if self._stopped:
                        return
                    self._cond.wait(self._due_in())
                    fn = self._pop_due()
            self._call(fn)

    def stop(self) -> None:
        """Drop every call not yet run; the thread ends (and no new one starts)."""
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(5)


@dataclasses.dataclass
class _Burst:
    last: float
    more: bool = False


class Wakeup:
    """A coalescing trigger queue: many requests before a pass become one pass."""

    def __init__(self, scheduler: Scheduler | None = None) -> None:
        self._cond = threading.Condition()
        self._pending: set[str] = set()
        self._bursts: dict[str, _Burst] = {}
        self.scheduler = scheduler or Scheduler()

    def request_debounced(self, trigger: str, quiet_s: float = DEBOUNCE_S) -> None:
        """Leading and trailing edge: the first request of a burst wakes a pass at once;
        the rest of the burst becomes one more pass once ``quiet_s`` passes without one."""
        with self._cond:
            burst = self._bursts.get(trigger)
            now = self.scheduler.clock()
            if burst is None:
                self._bursts[trigger] = _Burst(last=now)
                self._pending.add(trigger)
                self._cond.notify_all()
                self.scheduler.call_later(quiet_s, lambda: self._trailing(trigger, quiet_s))
            else:
                burst.last, burst.more = now, True

    def _trailing(self, trigger: str, quiet_s: float) -> None:
        with self._cond:
            burst = self._bursts[trigger]
            wait = burst.last + quiet_s - self.scheduler.clock()
            if wait > 0:
                self.scheduler.call_later(wait, lambda: self._trailing(trigger, quiet_s))
                return
            del self._bursts[trigger]
            if burst.more:
                self._pending.add(trigger)
                self._cond.notify_all()

    def request(self, trigger: str) -> None:
        with self._cond:
            self._pending.add(trigger)
            self._cond.notify_all()

    def request_at(self, delay_s: float, trigger: str) -> None:
        self.scheduler.call_later(delay_s, lambda: self.request(trigger))

    def wait(self, timeout: float) -> set[str]:
        """The triggers requested since the last call (waiting up to ``timeout`` s for one)."""
        with self._cond:
            if not self._pending:
                self._cond.wait(timeout)
            pending, self._pending = self._pending, set()
            return pending
