"""Liveness of what the daemon depends on but cannot see fail by itself: the engine and the edge.

A frozen engine (a paused or wedged dockerd) accepts connections and never answers: the event
stream just goes quiet, and a pass with nothing to do makes no engine call, so self-healing
would stop unseen. A killed Caddy likewise shows only at the next route change. One thread
(``run``, started by the daemon) probes both every ``every_s``:

* the engine with one cheap call under a short deadline (``Runtime.ping``); a failure marks the
  view lost (``View.lost``: the hung stream is closed and reconnects, and the next snapshot
  relists), so the passes stop trusting what they last saw;
* the edge by re-asserting its routes (``Edge.reassert``: a read of our servers, a write only
  when Caddy lost them, so a restarted Caddy gets its routes back within one probe).

Each change of state is logged once and written to the store's meta (``ENGINE_META``,
``EDGE_META``), which every API worker reads: ``/healthz`` names the problem
(``docker_unavailable``, ``edge_unavailable``), ``/metrics`` has ``cynchrod_engine_up`` and
``cynchrod_edge_up``, and apps shown while the engine cannot be seen are ``unknown``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from cynchrod import store
from cynchrod.core.codes import Code
from cynchrod.core.errors import CynchrodError

log = logging.getLogger("cynchrod.liveness")

#: How often the engine and the edge are probed.
PROBE_S = 5.0
#: Failed probes in a row before a dependency is down: one slow answer on a loaded host is not
#: an outage (a frozen engine shows within about three probes: 2 x (5 s + the 3 s ping deadline)).
FAILURES_TO_DOWN = 2
ENGINE_META = "engine"
EDGE_META = "edge"


class Probe:
    """One dependency's state: up, or down since when and why; a change is logged and stored once."""

    def __init__(self, *, name: str, meta: str, code: Code, check: Callable[[], object],
                 on_down: Callable[[str], None] = lambda reason: None, db: store.Store) -> None:
        self.name, self.meta, self.code = name, meta, code
        self._check, self._on_down, self._db = check, on_down, db
        self.error: str | None = None
        self.failures = 0
        #: Nothing stored by this process yet: the first probe stores its finding either way
        #: (a state left by an earlier run says nothing of now).
        self._stored = False

    def probe(self) -> None:
        try:
            self._check()
        except CynchrodError as exc:
            reason = exc.message
            self.failures += 1
            if self.failures < FAILURES_TO_DOWN and self.error is None:
                log.info("%s did not answer a probe (%s); down if the next fails too", self.name, reason)
                return
            if self.error is None or not self._stored:
                log.warning("%s unavailable: %s", self.name, reason)
                self._on_down(reason)
                self._store({"up": False, "error": reason, "since": store.now()})
            self.error = reason
            return
        self.failures = 0
        if self.error is not None or not self._stored:
            if self.error is not None:
                log.info("%s available again", self.name)
            self.error = None
            self._store({"up": True, "error": None, "since": store.now()})

    def _store(self, value: dict[str, Any]) -> None:
        try:
            self._db.set_meta(self.meta, value)
            self._stored = True
        except CynchrodError as exc:  # a full disk: /healthz says so on its own (state_unwritable)
            log.warning("%s state not recorded: %s", self.name, exc)

    def problem(self) -> dict[str, str] | None:
        error = self.error
        return None if error is None else {"code": self.code.value, "message": f"{self.name}: {error}"}


class Liveness:
    def __init__(self, probes: list[Probe], *, every_s: float = PROBE_S) -> None:
        self.probes = probes
        self.every_s = every_s

    def probe(self) -> None:
        for p in self.probes:
            try:
                p.probe()
            except Exception:  # this thread must outlive any one bad probe
                log.exception("probing %s failed", p.name)

    def problems(self) -> list[dict[str, str]]:
        return [found for p in self.probes if (found := p.problem()) is not None]

    def run(self, stop: threading.Event) -> None:
        self.probe()
        while not stop.wait(self.every_s):
            self.probe()

    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stop,), name="liveness", daemon=True)
        thread.start()
        return thread


def engine_up(db: store.Store) -> bool:
    """What the reconciler last found of the engine (for the API workers: one meta read)."""
    state = db.meta(ENGINE_META) or {}
    return bool(state.get("up", True))


def down(db: store.Store) -> dict[str, Any]:
    """Each dependency found down by the reconciler's probes, by meta key, with why and since when."""
    found = {}
    for key in (ENGINE_META, EDGE_META):
        state = db.meta(key) or {}
        if state.get("up", True) is False:
            found[key] = state
    return found
