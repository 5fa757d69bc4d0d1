"""The planner: a pure function from desired and observed state to actions.

``plan(desired, observed)`` does no I/O; ``decisions`` feeds it the specs of
one commit and the units of the runtime's view, and the reconciler applies what
it returns. Each action names the reason a person would want to read in
``cynchrod plan`` (which keys changed, why a unit is removed).

The words here are the runtime's (``cynchrod.runtime``): a *unit* is one replica
of one service of an app, in one of the states below, known by an opaque
``instance`` id. No engine vocabulary (containers, tasks) appears above the
runtime.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping

from cynchrod.core import specs

CREATE = "create"
RECREATE = "recreate"
START = "start"
STOP = "stop"
REMOVE = "remove"
#: Order in which an app's actions are applied: make room before creating.
_ORDER = {REMOVE: 0, STOP: 1, RECREATE: 2, CREATE: 3, START: 4}

#: Unit states, the same on every runtime.
RUNNING = "running"
EXITED = "exited"
CREATED = "created"
RESTARTING = "restarting"
OOM_KILLED = "oom-killed"
STATES = (RUNNING, EXITED, CREATED, RESTARTING, OOM_KILLED)

#: ``depends_on`` conditions (Compose's words): a dependent is created or started only once met.
SERVICE_STARTED = "service_started"
SERVICE_HEALTHY = "service_healthy"
SERVICE_COMPLETED = "service_completed_successfully"
CONDITIONS = (SERVICE_STARTED, SERVICE_HEALTHY, SERVICE_COMPLETED)


@dataclasses.dataclass(frozen=True)
class Unit:
    """One replica of one service of an app, as the runtime observes it."""

    org: str
    app: str
    service: str
    replica: int
    #: Opaque to everything above the runtime (a container id, a swarm task id ...).
    instance: str
    state: str
    spec_hash: str
    #: The spec label (normalised service spec, JSON) for naming changed keys.
    spec_json: str = ""
    exit_code: int | None = None
    #: The host port the unit is reachable on, when it publishes one.
    endpoint: int | None = None
    node: str = ""
    #: What the engine's healthcheck last said (``starting``, ``healthy``, ``unhealthy``); "" when
    #: it said nothing (no healthcheck, or not yet).
    health: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.org, self.app)

    @property
    def stopped(self) -> bool:
        return self.state in (EXITED, OOM_KILLED)


@dataclasses.dataclass(frozen=True)
class Action:
    kind: str
    org: str
    app: str
    service: str
    reason: str
    #: The desired app (None when removing an app no commit declares).
    spec: specs.AppSpec | None = None
    #: The unit acted on (None for a create).
    unit: Unit | None = None
    replica: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.org, self.app)

    @property
    def service_spec(self) -> specs.ServiceSpec | None:
        if self.spec is None:
            return None
        return next((s for s in self.spec.services if s.name == self.service), None)

    def describe(self) -> str:
        where = self.service if self.service != specs.MAIN_SERVICE else ""
        if self.replica:
            where = f"{where}#{self.replica}" if where else f"#{self.replica}"
        return f"{self.kind} {self.org}/{self.app}" + (f" [{where}]" if where else "") + f": {self.reason}"


def changed_keys(old_json: str, spec: specs.AppSpec, service: specs.ServiceSpec) -> list[str]:
    try:
        old = json.loads(old_json) if old_json else {}
    except ValueError:
        old = {}
    new = json.loads(service.canonical(restarted_at=spec.restarted_at))
    return sorted(k for k in new if old.get(k) != new[k]) or ["spec"]


def _best(units: list[Unit], want_hash: str) -> Unit:
    """The unit to keep among several for one replica: matching and running first."""
    return sorted(units, key=lambda u: (u.spec_hash != want_hash, u.state != RUNNING, u.instance))[0]


def plan_app(spec: specs.AppSpec | None, units: Iterable[Unit], key: tuple[str, str]) -> list[Action]:
    org, app = key
    by_slot: dict[tuple[str, int], list[Unit]] = {}
    for u in units:
        by_slot.setdefault((u.service, u.replica), []).append(u)
    actions: list[Action] = []
    if spec is None:
        for (service, replica), group in sorted(by_slot.items()):
            actions.extend(Action(REMOVE, org, app, service, "no longer declared", unit=u, replica=replica)
                           for u in group)
        return actions
    declared = {s.name: s for s in spec.services}
    for (service, replica), group in sorted(by_slot.items()):
        svc = declared.get(service)
        if svc is None:
            why = "service no longer declared"
        elif replica >= svc.replicas:
            why = f"replica {replica} is over replicas: {svc.replicas}"
        else:
            continue
        actions.extend(Action(REMOVE, org, app, service, why, spec, u, replica) for u in group)
    for svc in spec.services:
        want = spec.service_hash(svc)
        waits = bool(svc.depends_on_conditions) and spec.state != "stopped" and _waits(spec, svc, by_slot)
        for replica in range(svc.replicas):
            group = by_slot.get((svc.name, replica), [])
            keep = _best(group, want) if group else None
            actions.extend(Action(REMOVE, org, app, svc.name, "duplicate unit", spec, extra, replica)
                           for extra in group if extra is not keep)
            if not waits:  # else its dependency's condition holds it until a later pass
                actions.extend(_plan_unit(spec, svc, replica, keep, want))
    rank = start_order(spec)
    return sorted(actions, key=lambda a: (_ORDER[a.kind], rank.get(a.service, -1), a.service, a.replica))


def start_order(spec: specs.AppSpec) -> dict[str, int]:
    """Each service's place in start order: its ``depends_on`` first, then by name."""
    return spec.start_order


def _plan_unit(spec: specs.AppSpec, service: specs.ServiceSpec, replica: int, u: Unit | None,
               want: str) -> list[Action]:
    org, app, name = spec.org, spec.name, service.name
    if spec.state == "stopped":
        if u is not None and u.state in (RUNNING, RESTARTING):
            return [Action(STOP, org, app, name, "state: stopped", spec, u, replica)]
        return []
    if u is None:
        return [Action(CREATE, org, app, name, "missing", spec, None, replica)]
    if u.spec_hash != want:
        keys = ", ".join(changed_keys(u.spec_json, spec, service))
        return [Action(RECREATE, org, app, name, f"changed: {keys}", spec, u, replica)]
    if u.state == CREATED:
        return [Action(RECREATE, org, app, name, "left in created by an interrupted apply", spec, u, replica)]
    if u.state == OOM_KILLED:
        return [Action(START, org, app, name, "killed for exceeding its memory limit", spec, u, replica)]
    if u.state == EXITED and service.oneshot and u.exit_code == 0:
        return []  # a oneshot unit that completed stays so
    if u.state == EXITED:
        why = f"exited with code {u.exit_code}" if u.exit_code is not None else "exited"
        return [Action(START, org, app, name, why, spec, u, replica)]
    return []


def condition_met(condition: str, units: Iterable[Unit], service: specs.ServiceSpec) -> bool:
    """A ``depends_on`` condition on ``service``, given its units of the current spec (every replica)."""
    units = list(units)
    if len(units) < service.replicas:
        return False
    if condition == SERVICE_COMPLETED:
        return all(u.stopped and u.exit_code == 0 and u.state != OOM_KILLED for u in units)
    if condition == SERVICE_HEALTHY:
        return all(u.state == RUNNING and (service.healthcheck is None or u.health == "healthy") for u in units)
    return True  # service_started: started in order, as before


def _waits(spec: specs.AppSpec, service: specs.ServiceSpec, by_slot: Mapping[tuple[str, int], list[Unit]]) -> bool:
    """``service`` has a ``depends_on`` condition its dependency's units of this spec do not meet yet."""
    for name, condition in service.depends_on_conditions:
        dep = next((s for s in spec.services if s.name == name), None)
        if dep is None:
            continue
        want = spec.service_hash(dep)
        units = [u for r in range(dep.replicas) for u in by_slot.get((name, r), []) if u.spec_hash == want]
        if not condition_met(condition, units, dep):
            return True
    return False


def plan(desired: Mapping[tuple[str, str], specs.AppSpec], observed: Iterable[Unit]) -> list[Action]:
    """Actions that make ``observed`` match ``desired``, grouped by app, apps in name order."""
    by_app: dict[tuple[str, str], list[Unit]] = {}
    for u in observed:
        by_app.setdefault(u.key, []).append(u)
    actions: list[Action] = []
    for key in sorted(set(desired) | set(by_app)):
        actions.extend(plan_app(desired.get(key), by_app.get(key, []), key))
    return actions
