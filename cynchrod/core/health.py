"""Readiness: whether a deployment's units are ready, from engine facts alone (pure).

Called by the reconciler's gates (``shell.gates``) for each app whose deployment is being judged;
the planner's ``depends_on`` conditions read the same facts (``planning.condition_met``). The facts
are what the runtime's event-fed view holds of each unit (its state, its exit code, the healthcheck
status the engine's ``health_status`` events report) plus the time the gate opened, the time now,
and — for a unit with a port and no healthcheck, once it has been up for ``min_ready`` — whether the
port accepted a connection (the one fact the shell must probe, ``Verdict.probe``). No clock, no I/O.

A unit is ready when its healthcheck reports healthy, or, without one, when it has stayed up
for ``min_ready`` seconds and its port, if any, accepts a connection. It fails the deployment
when it exits (``crashed``, with the exit code; a ``oneshot`` unit that exits 0 is
``completed``), when its healthcheck reports unhealthy, or when it is not ready within
``health_timeout`` (``unhealthy``). An app's verdict is its units' worst.

The app-level ``health`` the API, the dashboard and the CLI show (Argo CD's words) is
``app_health``: ``progressing`` while a deployment is under way, ``healthy`` when it runs (or
stopped on purpose), ``degraded`` when it failed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

from cynchrod.core import planning, specs

#: Defaults of the manifest keys ``min_ready`` and ``health_timeout`` (seconds).
MIN_READY_S = 2.0
HEALTH_TIMEOUT_S = 60.0
#: Once up for ``min_ready``, a port that refuses is asked again this often until the timeout.
PROBE_EVERY_S = 0.5

#: Unit and app verdicts, best first.
READY = "ready"
COMPLETED = "completed"
WAITING = "waiting"
UNHEALTHY = "unhealthy"
CRASHED = "crashed"
_RANK = {READY: 0, COMPLETED: 0, WAITING: 1, UNHEALTHY: 2, CRASHED: 3}

#: The healthcheck statuses the engine reports (``Unit.health``; "" when it has said none yet).
STARTING, HEALTHY_CHECK, UNHEALTHY_CHECK = "starting", "healthy", "unhealthy"

#: An app's health (``app_health``).
PROGRESSING = "progressing"
HEALTHY = "healthy"
DEGRADED = "degraded"
UNKNOWN = "unknown"

#: ``on_failure`` policies.
KEEP = "keep"
ROLLBACK = "rollback"


@dataclasses.dataclass(frozen=True)
class Policy:
    """How long a service's units have to become ready (the manifest's keys, defaults applied)."""

    min_ready: float = MIN_READY_S
    timeout: float = HEALTH_TIMEOUT_S

    @classmethod
    def of(cls, service: specs.ServiceSpec, *, min_ready: float = MIN_READY_S) -> Policy:
        """The service's own keys, else the defaults (``min_ready`` may be the operator's)."""
        return cls(min_ready=service.min_ready if service.min_ready is not None else min_ready,
                   timeout=service.health_timeout if service.health_timeout is not None else HEALTH_TIMEOUT_S)


@dataclasses.dataclass(frozen=True)
class Verdict:
    state: str
    #: Why (for an error message, or what it waits for).
    reason: str = ""
    service: str = ""
    exit_code: int | None = None
    #: Look again at this time (the clock the caller passes in); None: nothing to wait for.
    check_at: float | None = None
    #: The unit's port must be probed (it has been up for ``min_ready``): ask, then decide again.
    probe: bool = False

    @property
    def done(self) -> bool:
        return self.state != WAITING

    @property
    def failed(self) -> bool:
        return self.state in (UNHEALTHY, CRASHED)


def unit_verdict(unit: planning.Unit | None, service: specs.ServiceSpec, policy: Policy, *, since: float,
                 now: float, port_open: bool | None = None, up_since: float | None = None) -> Verdict:
    """One unit of ``service``, gated since ``since``: ready, completed, waiting, unhealthy or crashed.

    ``port_open`` is the answer of a probe the previous verdict asked for (None: not probed);
    ``up_since`` when its units were last started (``min_ready`` counts from it; default ``since``)."""
    name = service.name
    deadline = since + policy.timeout
    if unit is None or unit.state in (planning.CREATED, planning.RESTARTING):
        if now >= deadline:
            if unit is not None and unit.health == STARTING and service.healthcheck is not None:
                # Swarm: a task waiting for its healthcheck is still starting.
                return Verdict(UNHEALTHY, f"service {name} was not healthy within {policy.timeout:g}s", name)
            return Verdict(UNHEALTHY, f"service {name} did not start within {policy.timeout:g}s", name)
        return Verdict(WAITING, "starting", name, check_at=deadline)
    if unit.stopped:
        if unit.health == UNHEALTHY_CHECK:
            # Swarm stops a task whose healthcheck failed (and starts another in its slot).
            return Verdict(UNHEALTHY, f"service {name}: its healthcheck reports unhealthy "
                                      f"(the task was stopped with code {unit.exit_code})", name,
                           exit_code=unit.exit_code)
        if unit.exit_code == 0 and service.oneshot and unit.state != planning.OOM_KILLED:
            return Verdict(COMPLETED, f"service {name} completed", name, exit_code=0)
        if unit.state == planning.OOM_KILLED:
            why = f"service {name} was killed for exceeding its memory limit of {service.memory} MB"
        else:
            why = f"service {name} exited with code {unit.exit_code}" if unit.exit_code is not None \
                else f"service {name} exited"
        return Verdict(CRASHED, why, name, exit_code=unit.exit_code)
    # Running.
    if service.oneshot:
        if now >= deadline:
            return Verdict(UNHEALTHY, f"service {name} (oneshot) did not complete within {policy.timeout:g}s", name)
        return Verdict(WAITING, "running to completion", name, check_at=deadline)
    if service.healthcheck is not None:
        if unit.health == HEALTHY_CHECK:
            return Verdict(READY, "healthy", name)
        if unit.health == UNHEALTHY_CHECK:
            return Verdict(UNHEALTHY, f"service {name}: its healthcheck reports unhealthy", name)
        if now >= deadline:
            return Verdict(UNHEALTHY, f"service {name} was not healthy within {policy.timeout:g}s", name)
        return Verdict(WAITING, "waiting for its healthcheck", name, check_at=deadline)
    up_at = (since if up_since is None else up_since) + policy.min_ready
    if now < up_at:
        return Verdict(WAITING, f"up for {policy.min_ready:g}s", name, check_at=up_at)
    if service.port is None or port_open:
        return Verdict(READY, "up", name)
    if port_open is None:
        return Verdict(WAITING, f"port {service.port}", name, probe=True)
    if now >= deadline:
        return Verdict(UNHEALTHY, f"service {name} did not accept connections on port {service.port} "
                                  f"within {policy.timeout:g}s", name)
    return Verdict(WAITING, f"port {service.port} to accept connections", name,
                   check_at=min(now + PROBE_EVERY_S, deadline))


def app_verdict(verdicts: Iterable[Verdict]) -> Verdict:
    """The worst of an app's unit verdicts; waiting ones look again at the earliest time asked."""
    found = list(verdicts)
    if not found:
        return Verdict(READY)
    worst = max(found, key=lambda v: _RANK[v.state])
    if worst.state == WAITING:
        times = [v.check_at for v in found if v.state == WAITING and v.check_at is not None]
        return dataclasses.replace(worst, check_at=min(times) if times else None,
                                   probe=any(v.probe for v in found))
    if worst.state in (READY, COMPLETED):
        return Verdict(READY if any(v.state == READY for v in found) else COMPLETED)
    return worst


def judge(spec: specs.AppSpec, units: Sequence[planning.Unit], *, since: float, now: float,
          min_ready: float = MIN_READY_S, ports: Mapping[str, bool] | None = None,
          up_since: float | None = None, ended: Sequence[planning.Unit] = ()) -> Verdict:
    """A deployment of ``spec`` gated since ``since``: its units of this spec, every replica.

    ``ports`` holds probe answers by unit instance. Units of another spec (an old version
    still being replaced) do not count. ``ended``: units of the deployment that ended since it
    began, whose slot the engine has already given to a replacement (Swarm restarts a failed
    task itself): each decides its slot over the replacement."""
    ports = ports or {}
    mine: dict[tuple[str, int], planning.Unit] = {}
    for u in [*units, *ended]:
        service = next((s for s in spec.services if s.name == u.service), None)
        if service is not None and u.spec_hash == spec.service_hash(service):
            mine[(u.service, u.replica)] = u
    verdicts = []
    for service in spec.services:
        policy = Policy.of(service, min_ready=min_ready)
        for replica in range(service.replicas):
            unit = mine.get((service.name, replica))
            verdicts.append(unit_verdict(unit, service, policy, since=since, now=now, up_since=up_since,
                                         port_open=ports.get(unit.instance) if unit is not None else None))
    return app_verdict(verdicts)


def app_health(status: str) -> str:
    """The app's health in Argo CD's words, from its status (``decisions``' words)."""
    if status in ("queued", "pending", "deploying"):
        return PROGRESSING
    if status in ("running", "stopped", "completed"):
        return HEALTHY
    if status == "failed":
        return DEGRADED
    return UNKNOWN
