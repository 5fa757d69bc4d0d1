"""The runtime protocol: what the reconciler, builds and the API ask of a container engine.

Everything above this package speaks these words only: an app's *units* (one per
service replica), their state, an opaque *instance* id, an endpoint, log lines by
app, and *events*. Drivers implement ``Runtime``: ``local`` drives one Docker
Engine, ``swarm`` drives Docker Swarm services, ``memory`` is an in-memory engine
for the pure core's tests and simulations. Only the drivers (and their shared glue,
``_docker``) import ``docker``. ``StartFirst`` adds the steps of a start-first recreate,
which the edge's zero-downtime deploys drive (``edge.deploy``, a layer above this one;
the local driver has them).

Ownership is by labels: every object a driver makes carries ``LABEL_OWNER`` (the
``--owner`` namespace) and ``LABEL_INSTANCE`` (the identity of the state directory
that made it). A unit of the same owner made by another instance is never
listed, so it is never pruned (two daemons on one engine cannot destroy each
other's apps; see ``reconciler``).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from cynchrod.core import planning, specs

LABEL_OWNER = "io.cynchrod.owner"
LABEL_INSTANCE = "io.cynchrod.instance"
LABEL_ORG = "io.cynchrod.org"
LABEL_APP = "io.cynchrod.app"
LABEL_SERVICE = "io.cynchrod.service"
LABEL_REPLICA = "io.cynchrod.replica"
LABEL_HASH = "io.cynchrod.spec-hash"
LABEL_SPEC = "io.cynchrod.spec"
LABEL_PATH = "io.cynchrod.path"

Unit = planning.Unit
RUNNING, EXITED, CREATED, RESTARTING, OOM_KILLED = (
    planning.RUNNING, planning.EXITED, planning.CREATED, planning.RESTARTING, planning.OOM_KILLED)


def crashpoint(name: str) -> None:
    """Testing hook: ``CYNCHROD_CRASHPOINT=<name>`` SIGKILLs the process group here.

    The crash-safety tests use it to kill a real daemon between two engine calls
    (``after-create``: created, not started; ``after-remove``: the old container
    of a recreate is gone, the new one not made yet; ``swap-*``: the steps of a
    start-first recreate, ``edge.deploy``).
    """
    if os.environ.get("CYNCHROD_CRASHPOINT") == name:
        os.killpg(os.getpgrp(), signal.SIGKILL)


def owner_labels(owner: str) -> list[str]:
    """The label filter that finds every object of one owner (the one place it is written)."""
    return [f"{LABEL_OWNER}={owner}"]


def app_labels(owner: str, org: str, app: str) -> list[str]:
    return [*owner_labels(owner), f"{LABEL_ORG}={org}", f"{LABEL_APP}={app}"]


def unit_labels(owner: str, instance: str, spec: specs.AppSpec, service: specs.ServiceSpec,
                replica: int) -> dict[str, str]:
    """The labels of a unit: who made it, what it runs, and the hash that detects drift."""
    return {
        LABEL_OWNER: owner,
        LABEL_INSTANCE: instance,
        LABEL_ORG: spec.org,
        LABEL_APP: spec.name,
        LABEL_SERVICE: service.name,
        LABEL_REPLICA: str(replica),
        LABEL_HASH: spec.service_hash(service),
        LABEL_SPEC: service.canonical(restarted_at=spec.restarted_at),
        LABEL_PATH: spec.path,
    }


def unit_from_labels(labels: dict[str, str], *, instance: str, state: str, exit_code: int | None = None,
                     endpoint: int | None = None, node: str = "") -> Unit:
    replica = labels.get(LABEL_REPLICA, "0")
    return Unit(
        org=labels.get(LABEL_ORG, ""),
        app=labels.get(LABEL_APP, ""),
        service=labels.get(LABEL_SERVICE, specs.MAIN_SERVICE),
        replica=int(replica) if replica.isdecimal() else 0,
        instance=instance,
        state=state,
        spec_hash=labels.get(LABEL_HASH, ""),
        spec_json=labels.get(LABEL_SPEC, ""),
        exit_code=exit_code,
        endpoint=endpoint,
        node=node,
    )


def mine(labels: dict[str, str], *, owner: str, instance: str) -> bool:
    """Made by this owner and this instance (or by a daemon from before instances)."""
    return labels.get(LABEL_OWNER) == owner and labels.get(LABEL_INSTANCE, instance) == instance


#: The services of apps a read covers: (org, app, service).
Scope = frozenset[tuple[str, str, str]]


@dataclasses.dataclass(frozen=True)
class Listing:
    """What a ``STALE`` event's read found: every unit of the services in ``scope`` (all of
    them when None), in place of what the view held there."""

    units: tuple[Unit, ...]
    scope: Scope | None = None


@dataclasses.dataclass(frozen=True)
class Event:
    """A change the engine reported.

    ``RELIST``: the stream (re)connected, anything may have been missed, list
    everything again. ``STATE``: a unit's state changed (``unit`` is what the
    labels say, its endpoint unknown). ``GONE``: the instance no longer exists.
    ``STALE``: part of what the view holds may have changed, and the event cannot
    say how (an engine whose events name objects, not their state: Swarm's); the
    view calls ``read`` (the driver's own read of that part alone) and puts the
    ``Listing`` in place of what it held there.
    """

    kind: str
    instance: str = ""
    unit: Unit | None = None
    oom: bool = False
    read: Callable[[], Listing] | None = None


RELIST = "relist"
STATE = "state"
GONE = "gone"
STALE = "stale"


#: The longest log line the drivers give, in bytes of its text: the rest of a longer one is dropped
#: as it is read (a line is never held whole in memory) and the line ends with ``CUT_MARK``, its
#: ``truncated`` set. The engine's own 16 KiB pieces of a long line are joined first.
LINE_MAX_BYTES = 32 * 1024
CUT_MARK = " [cut by cynchrod: line longer than 32 KiB]"


@dataclasses.dataclass(frozen=True)
class LogLine:
    service: str
    timestamp: str
    line: str
    replica: int = 0
    #: The node a line came from (swarm), else "".
    node: str = ""
    #: The line was longer than the drivers give (32 KiB): its text ends with a marker saying so.
    truncated: bool = False

    def to_json(self) -> dict[str, str | int | bool]:
        out: dict[str, str | int | bool] = {"service": self.service, "timestamp": self.timestamp, "line": self.line}
        if self.replica:
            out["replica"] = self.replica
        if self.node:
            out["node"] = self.node
        if self.truncated:
            out["truncated"] = True
        return out


class Closable(Protocol):
    def close(self) -> None: ...


class EventStream(Closable, Protocol):
    """One subscription to the engine's events; ``close()`` from another thread ends it."""

    def __iter__(self) -> Iterator[Event]: ...


class LogStream(Closable, Protocol):
    """An app's live log lines, across restarts and redeploys, until the app is gone or ``close()``."""

    def __iter__(self) -> Iterator[LogLine]: ...

    def batches(self) -> Iterator[list[LogLine]]:
        """The same lines, a list per engine read (a flood costs a step per read, not per line)."""
        ...


class Runtime(Protocol):
    """A container engine, in the project's words. Errors are ``CynchrodError`` only."""

    owner: str
    instance: str

    def list_units(self) -> list[Unit]:
        """Every unit of this owner and instance: one list call (a relist)."""
        ...

    def watch(self) -> EventStream:
        """Subscribe to events; the stream's first event is ``RELIST``."""
        ...

    def apply(self, action: planning.Action) -> list[Unit]:
        """Carry out one action; return the units it left serving (to update the view)."""
        ...

    def exit_details(self, unit: Unit) -> tuple[int | None, bool]:
        """(exit code, OOM-killed) of a unit that stopped: called only when one is being healed."""
        ...

    def remove_app(self, org: str, app: str) -> None:
        """What a deleted app leaves besides its units: network, secrets, built images."""
        ...

    def tail(self, org: str, app: str, n: int) -> list[LogLine]:
        """The last ``n`` lines of every unit of the app, oldest first (a bounded read)."""
        ...

    def follow(self, org: str, app: str, *, since: float, ended: threading.Event | None = None) -> LogStream:
        """Lines from ``since`` on; follows the app through restarts until ``ended`` is set or ``close()``."""
        ...

    def image_exists(self, image: str) -> bool: ...

    def build_image(self, context: pathlib.Path, *, dockerfile: str, tag: str, args: dict[str, str],
                    org: str, app: str, log: Callable[[str], None], target: str = "") -> None:
        """Build an app's image (labelled as the app's), its output to ``log``; raises ``build_failed``.
        ``target``: the stage of a multi-stage Dockerfile ("": the last)."""
        ...

    def prune_images(self, org: str, app: str, *, keep: int) -> list[str]:
        """Remove the app's built images but the newest ``keep``; the ids removed."""
        ...

    def recover(self) -> int:
        """Put right what a killed daemon left half-done (before the first pass); how many
        objects it removed (0 for a driver with nothing to recover)."""
        ...

    def ping(self) -> None:
        """One cheap call under a short deadline (the liveness probe, outside passes, not counted
        as a pass's engine call); raises ``EngineUnavailable`` when the engine does not answer."""
        ...

    def close(self) -> None: ...


class StartFirst(Runtime, Protocol):
    """A runtime that can recreate a unit start-first: the steps ``edge.deploy`` drives for a
    zero-downtime deploy (start the new unit beside the old, wait until ready, switch the route,
    drain, remove the old) and for its recovery after a crash midway. The local driver has them."""

    def start_beside(self, action: planning.Action, *, labels: Mapping[str, str]) -> Unit:
        """A ``RECREATE``'s new unit, started beside ``action.unit`` (both run), carrying ``labels``."""
        ...

    def readiness(self, unit: Unit, service: specs.ServiceSpec) -> tuple[str | None, bool]:
        """(why it can never be ready, or None; ready now): one check."""
        ...

    def remove_unit(self, unit: Unit) -> None: ...

    def last_lines(self, unit: Unit, n: int) -> list[str]:
        """A unit's last ``n`` log lines, for an error message ([] when unknown)."""
        ...

    def crowded(self) -> list[list[tuple[Unit, dict[str, str]]]]:
        """The slots holding more than one unit (a start-first recreate killed midway), each
        unit with its labels."""
        ...
