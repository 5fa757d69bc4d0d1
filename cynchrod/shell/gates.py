"""Health-gated deploys: each acted-on app's deployment stays ``deploying`` until its units are ready.

Owned by the reconciler. A gate opens when a pass has applied an app's actions (``open``); each
later pass judges the open gates before it decides (``judge``), from the units of the view, which
the engine's events keep current (``start``, ``die``, ``health_status``): no polling loop. The
verdict is ``core.health``'s; this module only fetches the facts it asks for (a port probe through
the runtime's ``readiness``, once a unit has been up for ``min_ready``) and records the outcome:

* ready → the deployment is ``running`` (``completed`` when every unit is a oneshot that exited 0);
* crashed / unhealthy → the deployment is ``crashed`` / ``unhealthy`` with the reason and the failing
  unit's last log lines (kept in the deployment row: its log outlives the container), the app
  ``failed``; a crashed unit is then healed as any dead unit is (backed off, ``crash_loop``); an
  unhealthy one is left running for inspection (``on_failure: keep``) or replaced by the last
  healthy spec (``on_failure: rollback``, see ``rollbacks``);
* still waiting → a wake-up at the time the verdict names (``min_ready`` over, the timeout).

On Swarm the same verdicts come from task states: the driver's ``ended`` gives the tasks of the
deployment that ended on their own (the swarm restarts a failed task in its slot itself), judged with
the units (``health.judge(ended=)``); ports are not probed there (``_probe``).

A gate that failed or completed is kept (its status stands over ``running``) until the app's spec
changes. Each gate is also written to its app's row (``apps.gate``: spec hash, status, error,
``serving``, open deployment) whenever it changes, and read back by the first pass of a restarted
daemon (``judge`` with the rows) for the apps whose declared spec is still the one it judged: a
failed or completed verdict stands (a rollback is put back in place, not the failed spec deployed
again), and a deployment that was still being judged is judged again (``store.interrupt_unfinished``
leaves it ``deploying``), its ``health_timeout`` and ``min_ready`` counted from the restart. A gate
whose spec changed while the daemon was down is dropped (an open one's deployment ``superseded``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping

from cynchrod import runtime, store
from cynchrod.core import decisions, health, planning, specs
from cynchrod.core.codes import Code
from cynchrod.core.errors import CynchrodError

log = logging.getLogger("cynchrod.reconciler")


def default_min_ready() -> float:
    """``CYNCHROD_MIN_READY`` (seconds; tests set it small), else ``health.MIN_READY_S``."""
    raw = os.environ.get("CYNCHROD_MIN_READY", "")
    try:
        value = float(raw)
    except ValueError:
        return health.MIN_READY_S
    return value if 0 <= value <= 3600 else health.MIN_READY_S


@dataclasses.dataclass(frozen=True)
class Gate:
    spec: specs.AppSpec
    deployment: int | None
    since: float
    #: When the last pass started some of its units (``min_ready`` counts from it): a dependent
    #: held by a ``depends_on`` condition starts in a later pass of the same deployment.
    started: float = 0.0
    status: str = decisions.DEPLOYING
    error: str | None = None
    serving: str | None = None
    #: (code, message) the deployment records once ready: why a healed unit had died (``oom_killed``).
    note: tuple[str, str] | None = None

    @property
    def open(self) -> bool:
        return self.status == decisions.DEPLOYING

    def view(self) -> decisions.Gate:
        return decisions.Gate(self.spec.hash, self.status, self.error, self.serving)


class Gates:
    def __init__(self, *, rt: runtime.Runtime, db: store.Store, clock: Callable[[], float],
                 wake: Callable[[float], None], book: Callable[[Callable[[], object]], object],
                 min_ready: float | None = None) -> None:
        self.runtime = rt
        self.store = db
        self._clock = clock
        self._wake = wake
        self._book = book
        self.min_ready = default_min_ready() if min_ready is None else min_ready
        #: Deployments are gated on a runtime that can say whether a unit's port accepts (the
        #: one-host driver's ``readiness``, which the edge's zero-downtime path uses too) and whose
        #: events carry healthcheck statuses, and on one that says which of an app's units ended
        #: since it deployed them (Swarm's ``ended``: the swarm replaces a failed task itself);
        #: on others (the in-memory engine) a deployment is ``running`` once applied, as before.
        self.enabled = callable(getattr(rt, "readiness", None)) or callable(getattr(rt, "ended", None))
        self._gates: dict[tuple[str, str], Gate] = {}
        #: Called with (app key, failed gate) when a deployment fails its gate (the rollback hook).
        self.on_failed: Callable[[tuple[str, str], Gate], None] | None = None
        #: Called with (app key, spec) when a deployment passes it (the last healthy spec).
        self.on_ready: Callable[[tuple[str, str], specs.AppSpec], None] | None = None
        #: What each app's row holds in ``gate`` (None: nothing), read once from the rows.
        self._stored: dict[tuple[str, str], str] = {}
        self._restored = False

    # -- reads -------------------------------------------------------------------

    def decided(self) -> dict[tuple[str, str], decisions.Gate]:
        """What the decisions read: each gated app's status over ``running``."""
        return {key: gate.view() for key, gate in self._gates.items()}

    def pending(self) -> float | None:
        """Seconds until an open gate should be judged again (0: now), None when none is open."""
        if not any(g.open for g in self._gates.values()):
            return None
        return 0.0

    def watches(self, key: tuple[str, str]) -> bool:
        gate = self._gates.get(key)
        return gate is not None and gate.open

    # -- writers -------------------------------------------------------------------

    def deployment_of(self, spec: specs.AppSpec) -> int | None:
        """The deployment of ``spec`` still being judged: a later pass's actions for it (a dependent
        a condition held) continue it rather than open another."""
        gate = self._gates.get(spec.key)
        return gate.deployment if gate is not None and gate.open and gate.spec.hash == spec.hash else None

    def open(self, spec: specs.AppSpec, deployment: int | None, units: list[planning.Unit], *,
             note: tuple[str, str] | None = None) -> str:
        """A pass applied ``spec``: judge it at once; the app's status to record now."""
        now = self._clock()
        gate = self._gates.get(spec.key)
        if gate is not None and gate.open and gate.spec.hash == spec.hash and gate.deployment == deployment:
            self._gates[spec.key] = dataclasses.replace(gate, started=now)
        else:
            self._gates[spec.key] = Gate(spec, deployment, now, started=now, note=note)
        status = self._judge(spec.key, units)
        self._persist(spec.key)
        return status

    def forget(self, key: tuple[str, str]) -> None:
        self._gates.pop(key, None)
        self._stored.pop(key, None)  # the row is removed

    def judge(self, desired: Mapping[tuple[str, str], specs.AppSpec], units: Iterable[planning.Unit],
              rows: Mapping[tuple[str, str], store.App] | None = None) -> None:
        """Before a pass decides: every open gate judged from the view's units; a gate whose
        spec is no longer the desired one is closed (its deployment superseded). The first call
        with ``rows`` reads back the gates a previous daemon left in them (``restore``)."""
        if rows is not None and not self._restored:
            self.restore(desired, rows)
        if not self._gates:
            return
        by_app: dict[tuple[str, str], list[planning.Unit]] = {}
        for u in units:
            if u.key in self._gates:
                by_app.setdefault(u.key, []).append(u)
        for key, gate in list(self._gates.items()):
            spec = desired.get(key)
            if spec is None or spec.hash != gate.spec.hash:
                del self._gates[key]
                self._persist(key)
                if gate.open and gate.deployment is not None:
                    deployment = gate.deployment
                    self._book(lambda d=deployment: self.store.finish_deployment(  # type: ignore[misc]
                        d, status=decisions.FAILED, error_code=Code.SUPERSEDED,
                        error="a newer spec was deployed before this one was ready"))
                continue
            if gate.open:
                self._judge(key, by_app.get(key, []))
                self._persist(key)

    def restore(self, desired: Mapping[tuple[str, str], specs.AppSpec],
                rows: Mapping[tuple[str, str], store.App]) -> None:
        """The gates a previous daemon left in the rows, for the apps whose declared spec is still
        the one judged; a failed one that had rolled back is handed to ``on_failed`` again (which
        puts the last healthy spec back in place of the declared one)."""
        self._restored = True
        if not self.enabled:
            return
        now = self._clock()
        rolled: list[tuple[tuple[str, str], Gate]] = []
        for key, row in rows.items():
            if not row.gate:
                continue
            self._stored[key] = row.gate
            try:
                data = json.loads(row.gate)
                spec_hash, status = str(data["hash"]), str(data["status"])
                deployment = data.get("deployment")
            except (ValueError, KeyError, TypeError):
                self._persist(key)  # unreadable: dropped
                continue
            spec = desired.get(key)
            if spec is None or spec.hash != spec_hash or key in self._gates \
                    or status not in (decisions.DEPLOYING, decisions.FAILED, decisions.COMPLETED):
                if status == decisions.DEPLOYING and isinstance(deployment, int) and key not in self._gates:
                    self._book(lambda d=deployment: self.store.finish_deployment(  # type: ignore[misc]
                        d, status=decisions.FAILED, error_code=Code.SUPERSEDED,
                        error="a newer spec was deployed before this one was ready"))
                if key not in self._gates:
                    self._persist(key)
                continue
            gate = Gate(spec, deployment if isinstance(deployment, int) else None, now, started=now, status=status,
                        error=data.get("error"))
            self._gates[key] = gate
            log.info("%s/%s: its readiness gate read back (%s)", *key, status)
            if status == decisions.FAILED and data.get("serving") == decisions.PREVIOUS:
                rolled.append((key, gate))
        for key, gate in rolled:
            if self.on_failed is not None:
                self.on_failed(key, gate)

    def _persist(self, key: tuple[str, str]) -> None:
        """Write the app's gate to its row when it changed (``apps.gate``; None: no gate)."""
        gate = self._gates.get(key)
        text = None if gate is None else json.dumps({
            "hash": gate.spec.hash, "status": gate.status, "error": gate.error, "serving": gate.serving,
            "deployment": gate.deployment}, sort_keys=True)
        if text == self._stored.get(key):
            return
        if text is None:
            self._stored.pop(key, None)
        else:
            self._stored[key] = text
        self._book(lambda: self.store.set_gate(*key, text))

    # -- judging -------------------------------------------------------------------

    def _judge(self, key: tuple[str, str], units: list[planning.Unit]) -> str:
        gate = self._gates[key]
        now = self._clock()
        ended = self._ended(gate.spec)
        verdict = health.judge(gate.spec, units, since=gate.since, now=now, min_ready=self.min_ready,
                               up_since=gate.started, ended=ended)
        if verdict.probe:
            verdict = health.judge(gate.spec, units, since=gate.since, now=now, min_ready=self.min_ready,
                                   up_since=gate.started, ports=self._probe(gate.spec, units), ended=ended)
        if verdict.state == health.WAITING:
            if verdict.check_at is not None:
                self._wake(max(verdict.check_at - now, 0.0))
            return decisions.DEPLOYING
        if verdict.failed:
            return self._failed(key, gate, verdict)
        status = decisions.COMPLETED if verdict.state == health.COMPLETED else decisions.RUNNING
        if gate.deployment is not None:
            deployment = gate.deployment
            note = gate.note
            self._book(lambda: self.store.finish_deployment(deployment, status=status,
                                                            error_code=note[0] if note else None,
                                                            error=note[1] if note else None))
        if status == decisions.COMPLETED:
            self._gates[key] = dataclasses.replace(gate, status=status, deployment=None)
        else:
            del self._gates[key]
        if self.on_ready is not None:
            self.on_ready(key, gate.spec)
        log.info("%s/%s is %s", *key, "ready" if status == decisions.RUNNING else "completed")
        return status

    def _failed(self, key: tuple[str, str], gate: Gate, verdict: health.Verdict) -> str:
        code = Code.CRASHED if verdict.state == health.CRASHED else Code.UNHEALTHY
        lines = self._last_lines(gate.spec, verdict.service)
        error = f"{code}: {verdict.reason}"
        log.warning("%s/%s failed its readiness: %s", *key, error)
        if gate.deployment is not None:
            deployment = gate.deployment
            self._book(lambda: self.store.finish_deployment(deployment, status=str(code), error_code=code,
                                                            error=verdict.reason, log=lines))
        failed = dataclasses.replace(gate, status=decisions.FAILED, error=error, deployment=None)
        self._gates[key] = failed
        if self.on_failed is not None:
            self.on_failed(key, failed)
        return decisions.FAILED

    def mark(self, key: tuple[str, str], **changes: object) -> None:
        gate = self._gates.get(key)
        if gate is not None:
            self._gates[key] = dataclasses.replace(gate, **changes)  # type: ignore[arg-type]
            self._persist(key)

    def _ended(self, spec: specs.AppSpec) -> list[planning.Unit]:
        """The units of the app that ended since they were deployed, on a runtime that restarts
        them itself (Swarm's ``ended``: read from what its event feed last read, no engine call)."""
        ended = getattr(self.runtime, "ended", None)
        return list(ended(spec.org, spec.name)) if ended is not None else []

    def _probe(self, spec: specs.AppSpec, units: list[planning.Unit]) -> dict[str, bool]:
        """Whether each running unit's port accepts a connection now (the runtime's own readiness
        check, as the edge's zero-downtime path uses it). A runtime without one (Swarm: a task's
        port is published on its node, which the manager's daemon may not reach) accepts it: the
        unit has stayed up ``min_ready``, which the swarm's own update monitor watches too."""
        readiness = getattr(self.runtime, "readiness", None)
        ports: dict[str, bool] = {}
        for u in units:
            service = next((s for s in spec.services if s.name == u.service), None)
            if service is None or service.port is None or service.healthcheck is not None \
                    or u.state != planning.RUNNING:
                continue
            if readiness is None:
                ports[u.instance] = True
                continue
            try:
                ports[u.instance] = bool(readiness(u, service)[1])
            except CynchrodError:
                ports[u.instance] = False
        return ports

    def _last_lines(self, spec: specs.AppSpec, service: str) -> list[str]:
        """The failing service's last lines (bounded), read while its unit still exists."""
        try:
            lines = self.runtime.tail(spec.org, spec.name, store.LOG_LINES * max(len(spec.services), 1))
        except CynchrodError as exc:
            return [f"(its log could not be read: {exc})"]
        return [line.line for line in lines if not service or line.service == service][-store.LOG_LINES:]
