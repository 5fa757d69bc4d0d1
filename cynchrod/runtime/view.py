"""The event-fed view of the engine (the informer pattern of controller-runtime).

Owned by the reconciler; read by every pass (``snapshot``) and updated by three
writers: a full relist (at start-up, after every event-stream reconnect, and when
``resync_s`` has passed), the engine's events in between (one thread, ``run``),
and the results of the reconciler's own actions (``put`` / ``drop``). A pass with
nothing to do therefore costs no engine call, and a death updates the view
itself before it wakes the pass, so the pass never sees a stale ``running``.
An action's result is what the action read while it ran (``acting``): a death or
a removal the events told in the meantime is newer, and ``put`` keeps it (a
container that exits as it starts stays dead in the view, and its event's wake-up
finds it so).

Both drivers feed it. The one-host engine's events carry the unit (``STATE``,
``GONE``). Swarm's name a service or a node but not what became of its tasks, so
the swarm driver's events are ``STALE``: the view reads again that part alone
(the driver's own read, on the event thread) and puts it in place, with the same
rule as a relist: what an action or an event said after the read began is kept,
so a read never undoes a newer fact. Either way the view changes, then wakes the
pass.

Without the event thread (``cynchrod sync``, tests that drive passes by hand) the
view is not *live* and every snapshot relists: one list call, as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from cynchrod import runtime
from cynchrod.core import planning
from cynchrod.core.errors import CynchrodError

log = logging.getLogger("cynchrod.view")  # the name the logs have always shown
RESYNC_S = 300.0
RECONNECT_S = 1.0


class View:
    def __init__(self, rt: runtime.Runtime, *, resync_s: float = RESYNC_S,
                 on_change: Callable[[runtime.Event], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.runtime = rt
        self.resync_s = resync_s
        self.on_change = on_change or (lambda event: None)
        self._clock = clock
        self._lock = threading.Lock()
        self._units: dict[str, runtime.Unit] = {}
        self._oom: set[str] = set()
        self._listed_at: float | None = None
        self._live = False
        self._stream: runtime.EventStream | None = None
        self._stopping = threading.Event()
        self.relists = 0
        #: Event sequence, and the last sequence that touched each instance: a relist
        #: keeps what events said about an instance after the list call started.
        self._seq = 0
        self._touched: dict[str, int] = {}
        #: While actions are open (``acting``): the sequence each began at, and the last
        #: sequence at which an event or a read changed each instance since the oldest began.
        self._open: list[int] = []
        self._heard: dict[str, int] = {}
        self._index: dict[tuple[str, str], list[runtime.Unit]] = {}
        self._index_seq = (-1, -1)
        #: Why the engine could not be watched, while it cannot (for /healthz).
        self.error: str | None = None

    # -- reads ----------------------------------------------------------------

    def snapshot(self) -> list[runtime.Unit]:
        """The units now, relisting only when the view is not live or a resync is due."""
        with self._lock:
            due = (not self._live or self._listed_at is None
                   or self._clock() - self._listed_at >= self.resync_s)
        if due:
            self.relist()
        with self._lock:
            return list(self._units.values())

    def app_units(self, org: str, app: str) -> list[runtime.Unit]:
        """One app's units, from an index rebuilt at most once per change of the view."""
        with self._lock:
            if self._index_seq != (self._seq, self.relists):
                index: dict[tuple[str, str], list[runtime.Unit]] = {}
                for u in self._units.values():
                    index.setdefault(u.key, []).append(u)
                self._index, self._index_seq = index, (self._seq, self.relists)
            return list(self._index.get((org, app), ()))

    # -- writers --------------------------------------------------------------

    def relist(self) -> None:
        with self._lock:
            started = self._seq
        units = self.runtime.list_units()  # raises: the pass fails, the view stays as it was
        self._install(units, None, started)
        with self._lock:
            self._listed_at = self._clock()
            self.relists += 1

    def _install(self, units: Iterable[runtime.Unit], scope: runtime.Scope | None, started: int) -> bool:
        """Put what a read that began at event sequence ``started`` found in place of what the
        view holds in ``scope`` (everything when None); what an action or an event said about an
        instance after the read began is kept. True when the view changed."""
        with self._lock:
            held = self._units if scope is None else {
                i: u for i, u in self._units.items() if (u.org, u.app, u.service) in scope}
            newer = {i for i, seq in self._touched.items() if seq > started}
            fresh: dict[str, runtime.Unit] = {}
            for u in units:
                if u.instance in newer:
                    continue
                old = held.get(u.instance)
                if u.state == planning.EXITED and u.instance in self._oom:
                    u = dataclasses.replace(u, state=planning.OOM_KILLED)
                if u.endpoint is None and old is not None:
                    u = dataclasses.replace(u, endpoint=old.endpoint)
                # The same unit stays the same object: what a pass keeps per unit stays valid.
                fresh[u.instance] = old if old == u else u
            for instance in newer:
                if instance in held:
                    fresh[instance] = held[instance]
            changed = fresh != held
            if changed:
                # What this read says is newer than what a read that began before it says.
                self._seq += 1
                for instance in {i for i in held.keys() | fresh.keys() if held.get(i) != fresh.get(i)}:
                    self._touched[instance] = self._seq
                    self._hear(instance)
            if scope is None:
                self._units = fresh
                self._oom &= fresh.keys()
            else:
                for instance in held:
                    del self._units[instance]
                self._units.update(fresh)
                self._oom -= held.keys() - fresh.keys()
            self._touched = {i: seq for i, seq in self._touched.items() if seq > started}
            return changed

    @contextlib.contextmanager
    def acting(self) -> Iterator[int]:
        """Brackets one action on the engine; yields the sequence it began at, for ``put``."""
        with self._lock:
            since = self._seq
            self._open.append(since)
        try:
            yield since
        finally:
            with self._lock:
                self._open.remove(since)
                if not self._open:
                    self._heard.clear()

    def _hear(self, instance: str) -> None:
        """An event or a read changed ``instance`` (under the lock): newer than any open action's reading."""
        if self._open:
            self._heard[instance] = self._seq

    def put(self, units: Iterable[runtime.Unit], *, since: int) -> None:
        """What an action left serving, as the action read it after sequence ``since`` (``acting``).

        An instance an event or a read changed after ``since`` keeps what they said (a
        container that died before its start's result is put stays dead; one removed meanwhile
        stays gone); the action's reading only fills in what an event does not carry (the
        host port, the node)."""
        with self._lock:
            self._seq += 1
            for u in units:
                if self._heard.get(u.instance, -1) > since:
                    newer = self._units.get(u.instance)
                    if newer is None:
                        continue
                    u = dataclasses.replace(newer, endpoint=newer.endpoint or u.endpoint, node=newer.node or u.node)
                else:
                    self._oom.discard(u.instance)
                self._units[u.instance] = u
                self._touched[u.instance] = self._seq

    def drop(self, instances: Iterable[str]) -> None:
        """Units an action removed."""
        with self._lock:
            self._seq += 1
            for instance in instances:
                self._units.pop(instance, None)
                self._touched[instance] = self._seq

    def apply_event(self, event: runtime.Event) -> None:
        if event.kind == runtime.RELIST:
            self.relist()
            self.on_change(event)
            return
        if event.kind == runtime.STALE:
            assert event.read is not None
            with self._lock:
                started = self._seq
            found = event.read()  # raises: the stream reconnects, and relists
            if self._install(found.units, found.scope, started):
                self.on_change(event)
            return
        with self._lock:
            self._seq += 1
            self._touched[event.instance] = self._seq
            self._hear(event.instance)
            old = self._units.get(event.instance)
            if event.kind == runtime.GONE:
                self._units.pop(event.instance, None)
                self._oom.discard(event.instance)
            elif event.oom:
                self._oom.add(event.instance)
                if old is not None and old.state == planning.EXITED:
                    self._units[event.instance] = dataclasses.replace(old, state=planning.OOM_KILLED)
            elif event.unit is not None:
                unit = event.unit
                if unit.state == planning.RUNNING:
                    self._oom.discard(event.instance)
                elif event.instance in self._oom:
                    unit = dataclasses.replace(unit, state=planning.OOM_KILLED)
                if old is not None:
                    unit = dataclasses.replace(unit, endpoint=old.endpoint, node=old.node or unit.node)
                self._units[event.instance] = unit
        self.on_change(event)

    # -- the event thread -------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Follow the engine's events until ``stop``; reconnect (and relist) after a break."""
        self._stopping = stop
        while not stop.is_set():
            stream = self.runtime.watch()
            self._stream = stream
            try:
                for event in stream:
                    if stop.is_set():
                        break
                    self.apply_event(event)
                    if event.kind == runtime.RELIST:
                        with self._lock:
                            self._live = True
                        self.error = None
            except CynchrodError as exc:
                if not stop.is_set():
                    self.error = str(exc)
                    log.warning("engine events: %s; reconnecting", exc)
            except Exception as exc:  # this thread must outlive any one bad event
                self.error = f"{type(exc).__name__}: {exc}"
                log.exception("engine events crashed; reconnecting")
            finally:
                with self._lock:
                    self._live = False
                stream.close()
                self._stream = None
            stop.wait(RECONNECT_S)

    def lost(self, reason: str) -> None:
        """The engine stopped answering (the liveness probe's ping failed): what the view holds
        can no longer be trusted. The next snapshot relists, and a stream that hangs on a frozen
        engine is closed, so the event thread reconnects and relists when the engine is back."""
        with self._lock:
            self._live = False
        self.error = reason
        stream = self._stream
        if stream is not None:
            stream.close()

    def stop(self) -> None:
        self._stopping.set()
        stream = self._stream
        if stream is not None:
            stream.close()
