"""The planner: a pure function from desired and observed state to actions.

``plan(desired, observed)`` does no I/O; the reconciler feeds it the specs of
one commit and the containers of one Docker list call, then applies what it
returns. Each action names the reason a person would want to read in
``cynchrod plan`` (which keys changed, why a container is removed).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping

from cynchrod import specs

CREATE = "create"
RECREATE = "recreate"
START = "start"
STOP = "stop"
REMOVE = "remove"
#: Order in which an app's actions are applied: make room before creating.
_ORDER = {REMOVE: 0, STOP: 1, RECREATE: 2, CREATE: 3, START: 4}


@dataclasses.dataclass(frozen=True)
class Observed:
    """One container carrying our labels, as one list call reports it."""

    id: str
    name: str
    org: str
    app: str
    service: str
    spec_hash: str
    #: Docker's state word: created, running, paused, restarting, exited, dead, removing.
    state: str
    #: The spec label (normalised service spec, JSON) for naming changed keys.
    spec_json: str = ""
    exit_code: int | None = None
    host_port: int | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.org, self.app)


@dataclasses.dataclass(frozen=True)
class Action:
    kind: str
    org: str
    app: str
    service: str
    reason: str
    #: The desired app (None when removing an app no commit declares).
    spec: specs.AppSpec | None = None
    container_id: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.org, self.app)

    @property
    def service_spec(self) -> specs.ServiceSpec | None:
        if self.spec is None:
            return None
        return next((s for s in self.spec.services if s.name == self.service), None)

    def describe(self) -> str:
        return f"{self.kind} {self.org}/{self.app}" + (
            f" [{self.service}]" if self.service != specs.MAIN_SERVICE else "") + f": {self.reason}"


def changed_keys(old_json: str, spec: specs.AppSpec, service: specs.ServiceSpec) -> list[str]:
    try:
        old = json.loads(old_json) if old_json else {}
    except ValueError:
        old = {}
    new = json.loads(service.canonical(restarted_at=spec.restarted_at))
    return sorted(k for k in new if old.get(k) != new[k]) or ["spec"]


def _best(containers: list[Observed], want_hash: str) -> Observed:
    """The container to keep among several for one service: matching and running first."""
    return sorted(containers, key=lambda c: (c.spec_hash != want_hash, c.state != "running", c.name))[0]


def plan_app(spec: specs.AppSpec | None, containers: Iterable[Observed], key: tuple[str, str]) -> list[Action]:
    org, app = key
    by_service: dict[str, list[Observed]] = {}
    for c in containers:
        by_service.setdefault(c.service, []).append(c)
    actions: list[Action] = []
    if spec is None:
        for service, group in by_service.items():
            for c in group:
                actions.append(Action(REMOVE, org, app, service, "no longer declared", container_id=c.id))
        return actions
    declared = {s.name: s for s in spec.services}
    for service, group in by_service.items():
        if service not in declared:
            for c in group:
                actions.append(Action(REMOVE, org, app, service, "service no longer declared", spec, c.id))
    for svc in spec.services:
        want = spec.service_hash(svc)
        group = by_service.get(svc.name, [])
        keep = _best(group, want) if group else None
        for extra in group:
            if extra is not keep:
                actions.append(Action(REMOVE, org, app, svc.name, "duplicate container", spec, extra.id))
        actions.extend(_plan_service(spec, svc, keep, want))
    rank = start_order(spec)
    return sorted(actions, key=lambda a: (_ORDER[a.kind], rank.get(a.service, -1), a.service))


def start_order(spec: specs.AppSpec) -> dict[str, int]:
    """Each service's place in start order: its ``depends_on`` first, then by name."""
    deps = {s.name: set(s.depends_on) for s in spec.services}
    order: dict[str, int] = {}
    while len(order) < len(deps):
        ready = sorted(n for n, d in deps.items() if n not in order and d <= set(order))
        if not ready:  # a cycle (refused by validation): fall back to name order
            ready = sorted(n for n in deps if n not in order)
        for name in ready:
            order[name] = len(order)
    return order


def _plan_service(spec: specs.AppSpec, service: specs.ServiceSpec, c: Observed | None, want: str) -> list[Action]:
    org, app, name = spec.org, spec.name, service.name
    if spec.state == "stopped":
        if c is not None and c.state in ("running", "restarting", "paused"):
            return [Action(STOP, org, app, name, "state: stopped", spec, c.id)]
        return []
    if c is None:
        return [Action(CREATE, org, app, name, "missing", spec)]
    if c.spec_hash != want:
        keys = ", ".join(changed_keys(c.spec_json, spec, service))
        return [Action(RECREATE, org, app, name, f"changed: {keys}", spec, c.id)]
    if c.state == "created":
        return [Action(RECREATE, org, app, name, "left in created by an interrupted apply", spec, c.id)]
    if c.state == "dead":
        return [Action(RECREATE, org, app, name, "container is dead", spec, c.id)]
    if c.state == "exited":
        why = f"exited with code {c.exit_code}" if c.exit_code is not None else "exited"
        return [Action(START, org, app, name, why, spec, c.id)]
    return []


def plan(desired: Mapping[tuple[str, str], specs.AppSpec], observed: Iterable[Observed]) -> list[Action]:
    """Actions that make ``observed`` match ``desired``, grouped by app, apps in name order."""
    by_app: dict[tuple[str, str], list[Observed]] = {}
    for c in observed:
        if c.state == "removing":
            continue
        by_app.setdefault(c.key, []).append(c)
    actions: list[Action] = []
    for key in sorted(set(desired) | set(by_app)):
        actions.extend(plan_app(desired.get(key), by_app.get(key, []), key))
    return actions
