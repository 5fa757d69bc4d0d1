"""Zero-downtime deploys: a runtime behind the edge (``Deployer``), which drives the runtime's
start-first steps (``runtime.StartFirst``) and switches the edge's routes between them.

Made by ``shell.front.make_runtime`` around the daemon's one-host runtime; the reconciler calls its
``apply`` like any runtime's, and the daemon its ``recover`` before the first pass. It speaks
to the runtime through the protocol only, so another driver takes the same path once it has the
start-first steps.

A unit an app's ``domain`` or a service's ``domain`` routes to is recreated start-first when it
has no ``hostPort`` (it cannot be bound twice) and is running: the new unit starts beside the old
one, labelled with its generation (``io.cynchrod.generation``, a clock reading) and its domains;
once ready (``StartFirst.readiness``) the route is switched, the old unit drains for ``drain``
seconds, then is stopped and removed. A new unit that is never ready within ``ready_timeout`` is
removed and the deployment fails ``not_ready`` with its last log lines; the old one never stopped
serving. A routed unit created or started otherwise (a first deploy, a stop-first recreate, a
start) is waited for until ready before the pass routes to it, so its first requests are not 502s;
one never ready is routed all the same (it is the only version there is) and the log says why.

A daemon killed midway leaves two units in one slot: ``recover`` keeps the newest one if it is
ready (switching the route to it), else the older one, and removes the other.
"""

from __future__ import annotations

import json
import logging
import pathlib
import threading
import time
from collections.abc import Callable, Sequence

from cynchrod import edge as edge_mod
from cynchrod import runtime
from cynchrod.core import planning, specs
from cynchrod.core.errors import PermanentError

log = logging.getLogger("cynchrod.edge")

#: Labels of a unit started beside its old one: its generation (the newest wins after a
#: crash) and the domains routed to it (comma-separated).
LABEL_GENERATION = "io.cynchrod.generation"
LABEL_DOMAIN = "io.cynchrod.domain"
#: Lines of a never-ready unit's log in its ``not_ready`` error.
NOT_READY_LINES = 20


def service_of(unit: runtime.Unit) -> specs.ServiceSpec | None:
    """The service spec a unit was made from (its spec label), enough for its readiness check."""
    try:
        body = json.loads(unit.spec_json)
        health = body.get("healthcheck")
        return specs.ServiceSpec(name=body["name"], image=body["image"], port=body.get("port"),
                                 healthcheck=specs.Healthcheck(test=tuple(health["test"])) if health else None)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


class Deployer:
    """A ``runtime.Runtime`` that recreates routed units start-first behind ``edge`` (see the module).

    With no edge it routes nothing and recreates nothing start-first, but still puts right a
    swap that a crash interrupted (a daemon restarted without ``--edge``)."""

    def __init__(self, rt: runtime.StartFirst, edge: edge_mod.Edge | None, *, ready_timeout: float = 60.0,
                 drain: float = 2.0) -> None:
        self.runtime = rt
        self.edge = edge
        self.owner, self.instance = rt.owner, rt.instance
        self.ready_timeout = ready_timeout
        self.drain = drain

    # -- the runtime, as it is ------------------------------------------------------

    def list_units(self) -> list[runtime.Unit]:
        return self.runtime.list_units()

    def watch(self) -> runtime.EventStream:
        return self.runtime.watch()

    def exit_details(self, unit: runtime.Unit) -> tuple[int | None, bool]:
        return self.runtime.exit_details(unit)

    def remove_app(self, org: str, app: str) -> None:
        self.runtime.remove_app(org, app)

    def tail(self, org: str, app: str, n: int) -> list[runtime.LogLine]:
        return self.runtime.tail(org, app, n)

    def follow(self, org: str, app: str, *, since: float, ended: threading.Event | None = None) -> runtime.LogStream:
        return self.runtime.follow(org, app, since=since, ended=ended)

    def image_exists(self, image: str) -> bool:
        return self.runtime.image_exists(image)

    def build_image(self, context: pathlib.Path, *, dockerfile: str, tag: str, args: dict[str, str],
                    org: str, app: str, log: Callable[[str], None], target: str = "") -> None:
        self.runtime.build_image(context, dockerfile=dockerfile, tag=tag, args=args, org=org, app=app, log=log,
                                 target=target)

    def prune_images(self, org: str, app: str, *, keep: int) -> list[str]:
        return self.runtime.prune_images(org, app, keep=keep)

    def ping(self) -> None:
        self.runtime.ping()

    def readiness(self, unit: runtime.Unit, service: specs.ServiceSpec) -> tuple[str | None, bool]:
        """The driver's one readiness check (the reconciler's gates probe a unit's port with it)."""
        return self.runtime.readiness(unit, service)

    def close(self) -> None:
        self.runtime.close()

    # -- acting -------------------------------------------------------------------

    def apply(self, action: planning.Action) -> list[runtime.Unit]:
        """Carry out one action: a routed recreate start-first, anything else by the runtime,
        a routed unit it leaves serving waited for until ready."""
        spec, service, old = action.spec, action.service_spec, action.unit
        if (action.kind == planning.RECREATE and spec is not None and service is not None and old is not None
                and self.start_first(spec, service, old)):
            return [self._swap(action, spec, service, old)]
        served = self.runtime.apply(action)
        if spec is not None and service is not None and action.kind not in (planning.REMOVE, planning.STOP):
            for unit in served:
                self._ready_before_routed(unit, spec, service)
        return served

    def start_first(self, spec: specs.AppSpec, service: specs.ServiceSpec, old: runtime.Unit) -> bool:
        """Recreate beside the old unit: this service's domain is routed, no host port is bound
        (it cannot be bound twice), and the old unit is serving."""
        return (self.edge is not None and bool(edge_mod.domains_of(spec, service.name)) and not service.host_port
                and old.state == planning.RUNNING and spec.state != "stopped")

    def _ready_before_routed(self, unit: runtime.Unit, spec: specs.AppSpec, service: specs.ServiceSpec) -> None:
        """A unit the edge will route to (its routes are set once the pass's actions are done)
        is waited for until ready, so a first deploy or a stop-first one is not a 502 while
        its server starts. One that is never ready is routed all the same after
        ``ready_timeout`` (it is the only version there is); the log says why."""
        if self.edge is None or not edge_mod.domains_of(spec, service.name) or spec.state == "stopped":
            return
        failure = self._wait_ready(unit, service)
        if failure is not None:
            log.warning("%s/%s: %s is routed though not ready: %s", spec.org, spec.name, service.name, failure)

    def _swap(self, action: planning.Action, spec: specs.AppSpec, service: specs.ServiceSpec,
              old: runtime.Unit) -> runtime.Unit:
        """Start the new unit beside ``old``, wait until ready, switch the route, drain, remove ``old``."""
        domains = edge_mod.domains_of(spec, service.name)
        assert domains and service.port is not None
        labels = {LABEL_GENERATION: str(time.time_ns()), LABEL_DOMAIN: ",".join(domains)}
        new = self.runtime.start_beside(action, labels=labels)
        runtime.crashpoint("swap-after-start")
        failure = self._wait_ready(new, service)
        if failure is not None:
            lines = self.runtime.last_lines(new, NOT_READY_LINES)
            self.runtime.remove_unit(new)
            raise PermanentError(f"the new container of {spec.org}/{spec.name} was not ready within "
                                 f"{self.ready_timeout:g}s ({failure}); the old one keeps serving. Last log "
                                 "lines:\n" + "\n".join(lines), code="not_ready")
        runtime.crashpoint("swap-ready")
        assert new.endpoint is not None
        self._switch(domains, old.endpoint, new.endpoint, spec.org, spec.name)
        runtime.crashpoint("swap-after-switch")
        time.sleep(self.drain)
        self.runtime.remove_unit(old)
        runtime.crashpoint("swap-after-remove-old")
        return new

    def _switch(self, domains: Sequence[str], old: int | None, new: int, org: str, app: str) -> None:
        if self.edge is None:
            return
        try:
            self.edge.switch(domains, old, new, org=org, app=app)
        except edge_mod.EdgeUnavailable as exc:
            # The edge serves nothing now anyway; the pass re-asserts the route once it answers.
            log.warning("%s/%s: the route could not be switched (%s); the next pass re-asserts it",
                        org, app, exc)

    def _wait_ready(self, unit: runtime.Unit, service: specs.ServiceSpec) -> str | None:
        """None once the unit is ready, else why not (it exited, unhealthy, timed out)."""
        deadline = time.monotonic() + self.ready_timeout
        while True:
            failure, ready = self.runtime.readiness(unit, service)
            if ready or failure is not None:
                return failure
            if time.monotonic() >= deadline:
                return "timed out" + (" waiting for its healthcheck" if service.healthcheck else
                                      f" waiting for port {service.port} to accept connections")
            time.sleep(0.1)  # a readiness poll of the engine and the port, bounded by the deadline

    # -- after a crash ------------------------------------------------------------

    def recover(self) -> int:
        """After a crash mid-swap: one unit per slot again, the route on the one kept.

        The newest (by generation) is kept when it is running and ready now, and the
        route switched to it; else the older one is kept. Returns how many were removed.
        """
        removed = 0
        for group in self.runtime.crowded():
            if not any(LABEL_GENERATION in labels for _, labels in group):
                continue
            group = sorted(group, key=lambda ul: int(ul[1].get(LABEL_GENERATION, "0") or 0))
            (newest, labels), olds = group[-1], [u for u, _ in group[:-1]]
            service = service_of(newest)
            ready = (newest.state == planning.RUNNING and service is not None
                     and self.runtime.readiness(newest, service)[1])
            keep, drop = (newest, olds) if ready else (olds[-1], [newest, *olds[:-1]])
            domains = [d for d in labels.get(LABEL_DOMAIN, "").split(",") if d]
            if domains and keep.endpoint:
                for other in drop:
                    self._switch(domains, other.endpoint, keep.endpoint, newest.org, newest.app)
                if ready:
                    time.sleep(self.drain)
            log.warning("%s/%s: a swap was interrupted; kept the %s container, removing %d", newest.org,
                        newest.app, "new" if ready else "old", len(drop))
            for other in drop:
                self.runtime.remove_unit(other)
                removed += 1
        return removed + self.runtime.recover()


def _conforms(rt: Deployer) -> runtime.Runtime:
    return rt  # mypy checks that a deployer is a Runtime
