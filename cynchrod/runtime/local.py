"""The one-host driver: the ``Runtime`` protocol on one Docker Engine (imports ``docker``).

Over 500 lines on purpose: it is the whole of one engine's mapping (units, networks, secrets'
mounts, the start-first steps, events and logs), and what both drivers share is already in
``_docker``; splitting it further would spread one mapping over modules that call each other.

Created by the daemon (and ``cynchrod sync``); called by the reconciler's
workers (``apply``), the view (``list_units``, ``watch``), builds and the API
(``tail``, ``follow``). Every docker, requests and socket error is converted here (``_docker``)
into the project's error tree; nothing above sees a docker type.

A unit is a container named ``<owner>_<org>_<app>[_<service>][-<replica>]``.
Recreate is remove-then-create, not rename-and-swap: a published host port
cannot be bound twice, and with no rename there is no half-renamed state to
recover. A crash between the two steps leaves the unit missing (created next
pass); a crash between create and start leaves it ``created``, which the planner
sweeps.

**Start-first.** For a zero-downtime recreate (driven by ``edge.deploy``) the
driver starts the new container beside the old one under the slot's other name
(``<name>.b``, and back) with the labels it is given (``start_beside``), says
whether a container is ready (``readiness``: its healthcheck, else its port
accepts TCP connections on its container address), removes one
(``remove_unit``), and lists the slots a crash midway left holding two
(``crowded``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import pathlib
import re
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import docker
import docker.errors
import requests

from cynchrod import runtime
from cynchrod.core import health, planning, specs
from cynchrod.core.errors import (
    CynchrodError,
    EngineUnavailable,
    PermanentError,
    RuntimeFailure,
    TemporaryError,
    UnitGone,
)
from cynchrod.runtime import _docker, follow

log = logging.getLogger(__name__)

PULL_TIMEOUT_S = 300
#: The other name of a slot, for a container started beside its old one (``start_beside``), and back.
ALT_SUFFIX = ".b"
_EXIT_RE = re.compile(r"Exited \((-?\d+)\)")
#: A listed container's healthcheck status, in its ``Status`` ("Up 3 seconds (healthy)").
_HEALTH_RE = re.compile(r"\((healthy|unhealthy|health: starting)\)")
_STATE = {"running": planning.RUNNING, "paused": planning.RUNNING, "restarting": planning.RESTARTING,
          "exited": planning.EXITED, "created": planning.CREATED, "dead": planning.CREATED}


def fault(step: str, container_id: str, api: Any) -> None:
    """Testing hook: ``CYNCHROD_FAULT=<kill|remove>@<step>`` hurts the container just
    before the engine call of ``step`` (``stop``, ``remove``, ``start``, ``port``), as a
    person or the OOM killer might. The fault-injection tests show each such race is
    the app's own retried error, never a crashed pass."""
    spec = os.environ.get("CYNCHROD_FAULT", "")
    what, _, at = spec.partition("@")
    if at != step or not container_id:
        return
    with contextlib.suppress(Exception):
        if what == "remove":
            api.remove_container(container_id, force=True)
        elif what == "kill":
            api.kill(container_id)


class _EventStream:
    """The engine's events for our units; ``close()`` from another thread ends it."""

    def __init__(self, rt: LocalRuntime) -> None:
        self._rt = rt
        self._client: Any = None
        self._stream: Any = None
        self._closed = threading.Event()

    def __iter__(self) -> Iterator[runtime.Event]:
        try:
            self._client = rt_client(self._rt, timeout=None)
            self._stream = _docker.converted(lambda: self._client.api.events(
                filters={"type": "container", "event": ["start", "die", "oom", "destroy", "pause", "unpause",
                                                         "health_status"],
                         "label": runtime.owner_labels(self._rt.owner)}, decode=True), "events")
        except RuntimeFailure:
            self.close()
            raise
        if self._closed.is_set():
            return
        # Subscribed first, then relisted: nothing between the two is missed.
        yield runtime.Event(runtime.RELIST)
        try:
            for raw in self._stream:
                event = self._rt.event(raw)
                if event is not None:
                    yield event
        except (requests.RequestException, docker.errors.DockerException, OSError, AttributeError, ValueError):
            if not self._closed.is_set():
                raise EngineUnavailable("event stream broke") from None

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(Exception):
            if self._stream is not None:
                self._stream.close()
        with contextlib.suppress(Exception):
            if self._client is not None:
                self._client.close()


def rt_client(rt: LocalRuntime, *, timeout: float | None) -> docker.DockerClient:
    """Another connection to the same engine (streams need their own, with no read
    timeout); the API version is the one already negotiated, so making it asks nothing."""
    return _docker.converted(lambda: docker.DockerClient.from_env(version=rt.api.api_version, timeout=timeout),
                     "connect")


class _AppLogs(follow.Follower):
    """An app's live log lines: one reader per running container (``follow.Follower``), its
    engine stream read through ``_docker.followed`` (whole lines, each once)."""

    #: Lines read past those given when ``_docker.Given`` asks how many the log holds with a timestamp
    #: (a read from the file's end, within ``_docker.Given``'s budget of questions).
    VERIFY_TAIL = 2000

    def __init__(self, rt: LocalRuntime, org: str, app: str, since: float, ended: threading.Event | None) -> None:
        # A deadline for opening each stream (a hung engine), none once it flows (docker-py lifts it).
        super().__init__(app, since, ended, rt_client(rt, timeout=rt.stream_timeout))
        self._rt, self._org = rt, org
        #: What each container's stream gave (its last timestamp), to re-attach after it.
        self._given: dict[str, _docker.Given] = {}

    def _open(self, instance: str, since: float) -> Any:
        # Closed from another thread, docker-py's stream shuts the socket down, which ends the
        # read blocked on it (for a quiet app, one that would otherwise wait forever).
        return _docker.container_logs(self._client.api, instance, follow=True, since=since)

    def _streams(self) -> Iterator[follow.Stream]:
        """Every running container of the app (one list call)."""
        for unit in self._rt.app_units(self._org, self._app):
            if unit.state != planning.RUNNING or unit.instance in self._readers:
                continue
            given = self._given.get(unit.instance)
            # From a little before the last line given (``since`` is a float): ``_docker.Given`` drops the repeats.
            since = _docker.stamp_seconds(given.last) - 0.001 if given is not None and given.last else self._start
            yield (unit.instance, functools.partial(self._opened, unit.instance, since),
                   functools.partial(self._lines_of, unit))

    def _opened(self, instance: str, since: float) -> Any:
        return _docker.converted(lambda: self._open(instance, since), "logs")

    def _lines_of(self, unit: runtime.Unit, stream: Any) -> Iterator[runtime.LogLine]:
        service, replica, node = unit.service, unit.replica, unit.node
        given = self._given.get(unit.instance)
        if given is None:
            given = self._given[unit.instance] = _docker.Given(functools.partial(self._logged_at, unit.instance))
        given.reopened()
        LogLine = runtime.LogLine

        def line_of(raw: _docker.RawLine) -> tuple[runtime.LogLine, _docker.Given]:
            return LogLine(service, raw[0], raw[1], replica, node, raw[2]), given

        return _docker.followed(stream, line_of=line_of)

    def _logged_at(self, instance: str, key: str, given: int) -> int | None:
        """How many lines the container's log holds stamped ``key`` (``_docker.logged_at``)."""
        return _docker.logged_at(functools.partial(_docker.container_logs, self._client.api, instance), key, given,
                                 tail=self.VERIFY_TAIL, stamp=_docker.stamp_key)


class LocalRuntime(_docker.Driver):
    """Drives one Docker Engine for one owner and one instance (see ``cynchrod.runtime``)."""

    _log = log

    def __init__(self, *, owner: str = "cynchrod", instance: str = "", publish_address: str = "127.0.0.1",
                 stop_timeout: int = 10, client: docker.DockerClient | None = None,
                 secrets_dir: pathlib.Path | None = None, call_timeout: float | None = None,
                 stream_timeout: float | None = None) -> None:
        self.owner = owner
        #: Deadline for opening a log stream and reading its headers (docker-py lifts it
        #: for the stream's body); None waits forever.
        self.stream_timeout = stream_timeout
        self.instance = instance
        #: Where the reconciler stages secret files (``<org>/<app>/<name>``).
        self.secrets_dir = secrets_dir
        self.publish_address = publish_address
        self.stop_timeout = stop_timeout
        # The API version is pinned (``_docker.API_VERSION``): a daemon starts while Docker is down.
        timeout = call_timeout if call_timeout is not None else _docker.CALL_TIMEOUT_S + stop_timeout
        self._client = client or docker.DockerClient.from_env(version=_docker.API_VERSION, timeout=timeout)
        self.api = self._client.api
        self.calls = 0

    def close(self) -> None:
        self._client.close()

    # -- names and labels -------------------------------------------------

    def container_name(self, org: str, app: str, service: str, replica: int = 0) -> str:
        base = f"{self.owner}_{org}_{app}"
        name = base if service == specs.MAIN_SERVICE else f"{base}_{service}"
        return f"{name}-{replica}" if replica else name

    def network_name(self, org: str, app: str) -> str:
        return f"{self.owner}_{org}_{app}"

    def volume_name(self, org: str, app: str, volume: str) -> str:
        return f"{self.owner}_{org}_{app}_{volume}"

    @property
    def owner_filter(self) -> dict[str, list[str]]:
        return {"label": runtime.owner_labels(self.owner)}

    # -- observing ----------------------------------------------------------

    def list_units(self) -> list[runtime.Unit]:
        """Every unit of this owner and instance, from exactly one list call (no inspect)."""
        rows = self._call(lambda: self.api.containers(all=True, filters=self.owner_filter), "list containers")
        return [u for row in rows if (u := self._unit(row)) is not None]

    def app_units(self, org: str, app: str) -> list[runtime.Unit]:
        """The units of one app (one list call)."""
        filters = {"label": runtime.app_labels(self.owner, org, app)}
        rows = self._call(lambda: self.api.containers(all=True, filters=filters), "list containers")
        return [u for row in rows if (u := self._unit(row)) is not None]

    def _unit(self, row: dict[str, Any]) -> runtime.Unit | None:
        labels = row.get("Labels") or {}
        state = _STATE.get(row.get("State", ""))
        if state is None or not runtime.mine(labels, owner=self.owner, instance=self.instance):
            return None  # being removed, or another instance's
        match = _EXIT_RE.search(row.get("Status") or "")
        public = [p.get("PublicPort") for p in row.get("Ports") or [] if p.get("PublicPort")]
        said = _HEALTH_RE.search(row.get("Status") or "") if state == planning.RUNNING else None
        unit = runtime.unit_from_labels(labels, instance=row["Id"], state=state,
                                        exit_code=int(match.group(1)) if match else None,
                                        endpoint=public[0] if public else None)
        if said is not None:
            unit = dataclasses.replace(unit, health=said.group(1).removeprefix("health: "))
        return unit

    def event(self, raw: dict[str, Any]) -> runtime.Event | None:
        """One engine event as ours, or None when it is not about one of our units."""
        attrs = raw.get("Actor", {}).get("Attributes", {}) or {}
        if not runtime.mine(attrs, owner=self.owner, instance=self.instance):
            return None
        instance = raw.get("id") or raw.get("Actor", {}).get("ID", "")
        action = raw.get("Action", "")
        if action == "destroy":
            return runtime.Event(runtime.GONE, instance)
        if action == "oom":
            return runtime.Event(runtime.STATE, instance, oom=True)
        if action.startswith("health_status"):
            # "health_status: healthy": the readiness gate's fact (``core.health``).
            said = action.partition(":")[2].strip()
            unit = runtime.unit_from_labels(attrs, instance=instance, state=planning.RUNNING)
            return runtime.Event(runtime.STATE, instance, dataclasses.replace(unit, health=said))
        state = planning.EXITED if action == "die" else planning.RUNNING
        code = attrs.get("exitCode")
        unit = runtime.unit_from_labels(attrs, instance=instance, state=state,
                                        exit_code=int(code) if code and code.lstrip("-").isdigit() else None)
        return runtime.Event(runtime.STATE, instance, unit)

    def watch(self) -> _EventStream:
        self.calls += 1
        return _EventStream(self)

    # -- acting -------------------------------------------------------------

    def apply(self, action: planning.Action) -> list[runtime.Unit]:
        """Carry out one action; returns the unit now serving, if any."""
        unit = action.unit
        if action.kind == planning.REMOVE:
            assert unit is not None
            self._remove(unit.instance)
            return []
        if action.kind == planning.STOP:
            assert unit is not None
            fault("stop", unit.instance, self.api)
            self._ignore_missing(lambda: self.api.stop(unit.instance, timeout=self.stop_timeout), "stop")
            return []
        assert action.spec is not None and action.service_spec is not None
        if action.kind == planning.START:
            assert unit is not None
            fault("start", unit.instance, self.api)
            self._call(lambda: self.api.start(unit.instance), "start")
            return [self._served(unit.instance, action.spec, action.service_spec, action.replica)]
        # The image is made sure of before the old container goes, so a bad
        # tag leaves the running version in place.
        self._ensure_image(action.service_spec.image)
        if action.kind == planning.RECREATE:
            assert unit is not None
            self._remove(unit.instance)
            runtime.crashpoint("after-remove")
        return [self._create(action.spec, action.service_spec, action.replica)]

    # -- start-first: what ``edge.deploy`` drives for a zero-downtime recreate --------------

    def start_beside(self, action: planning.Action, *, labels: Mapping[str, str]) -> runtime.Unit:
        """The recreate's new container, started beside the old one under the slot's other name
        (``<name>`` or ``<name>.b``), carrying ``labels`` too; the image is made sure of first."""
        assert action.spec is not None and action.service_spec is not None and action.unit is not None
        spec, service, replica, old = action.spec, action.service_spec, action.replica, action.unit
        self._ensure_image(service.image)
        base = self.container_name(spec.org, spec.name, service.name, replica)
        old_name = str(self._call(lambda: self.api.inspect_container(old.instance), "inspect")["Name"]).lstrip("/")
        name = base if old_name != base else base + ALT_SUFFIX
        return self._create(spec, service, replica, name=name, extra_labels=dict(labels), point="swap-")

    def readiness(self, unit: runtime.Unit, service: specs.ServiceSpec) -> tuple[str | None, bool]:
        """(why it can never be ready, ready now): one inspect, and a TCP connect when there is no healthcheck."""
        container_id = unit.instance
        try:
            info = self._call(lambda: self.api.inspect_container(container_id), "inspect")
        except UnitGone:
            return "it was removed", False
        state = info.get("State") or {}
        if not state.get("Running"):
            return f"it exited with code {state.get('ExitCode')}", False
        if service.healthcheck is not None:
            said = (state.get("Health") or {}).get("Status")
            if said == health.UNHEALTHY_CHECK:
                return "its healthcheck reports unhealthy", False
            return None, said == health.HEALTHY_CHECK
        networks = (info.get("NetworkSettings") or {}).get("Networks") or {}
        addresses = [n.get("IPAddress") for n in networks.values() if n.get("IPAddress")]
        if not addresses:
            return None, False
        try:
            # The container's own address: the host port's proxy accepts before the app listens.
            with socket.create_connection((addresses[0], service.port or 0), timeout=0.5):
                return None, True
        except OSError:
            return None, False

    def remove_unit(self, unit: runtime.Unit) -> None:
        """Stop and remove one unit (gone already is done)."""
        self._remove(unit.instance)

    def last_lines(self, unit: runtime.Unit, n: int) -> list[str]:
        """A unit's last ``n`` log lines (for an error message); [] when the engine cannot say."""
        def read(k: int) -> Iterable[bytes]:
            return _docker.container_logs(self.api, unit.instance, tail=k)

        try:
            return [text for _, text, _ in self._call(lambda: _docker.tail_lines(read, n), "logs")]
        except RuntimeFailure:
            return []

    def crowded(self) -> list[list[tuple[runtime.Unit, dict[str, str]]]]:
        """The slots (org, app, service, replica) that hold more than one of our units, each
        unit with its labels: what a start-first recreate killed midway leaves (one list call)."""
        rows = self._call(lambda: self.api.containers(all=True, filters=self.owner_filter), "list containers")
        slots: dict[tuple[str, str, str, str], list[tuple[runtime.Unit, dict[str, str]]]] = {}
        for row in rows:
            labels = row.get("Labels") or {}
            unit = self._unit(row)
            if unit is None:
                continue  # another instance's, or being removed
            slot = (labels.get(runtime.LABEL_ORG, ""), labels.get(runtime.LABEL_APP, ""),
                    labels.get(runtime.LABEL_SERVICE, ""), labels.get(runtime.LABEL_REPLICA, "0"))
            slots.setdefault(slot, []).append((unit, labels))
        return [group for _, group in sorted(slots.items()) if len(group) > 1]

    def recover(self) -> int:
        """Nothing of the driver's own: a crash between its steps leaves what the next pass
        converges (``edge.deploy`` recovers interrupted start-first recreates)."""
        return 0

    def _ensure_image(self, image: str) -> None:
        if not self.image_exists(image):
            self._pull(image)

    def _ignore_missing(self, call: Callable[[], Any], what: str) -> None:
        with contextlib.suppress(UnitGone):
            self._call(call, what)

    def _remove(self, container_id: str) -> None:
        fault("remove", container_id, self.api)
        self._ignore_missing(lambda: self.api.stop(container_id, timeout=self.stop_timeout), "stop")
        try:
            self._call(lambda: self.api.remove_container(container_id, force=True, v=True), "remove")
        except UnitGone:
            pass
        except _docker.Conflict:
            pass  # already being removed by the engine

    def _served(self, container_id: str, spec: specs.AppSpec, service: specs.ServiceSpec,
                replica: int) -> runtime.Unit:
        """The unit now serving and, when it publishes a port, the host port Docker bound."""
        endpoint = service.host_port
        if service.port and not service.host_port:
            fault("port", container_id, self.api)
            bound = self._call(lambda: self.api.port(container_id, service.port), "port") or []
            endpoint = int(bound[0]["HostPort"]) if bound else None
        labels = runtime.unit_labels(self.owner, self.instance, spec, service, replica)
        return runtime.unit_from_labels(labels, instance=container_id, state=planning.RUNNING, endpoint=endpoint)

    def _create(self, spec: specs.AppSpec, service: specs.ServiceSpec, replica: int, *, name: str = "",
                extra_labels: dict[str, str] | None = None, point: str = "") -> runtime.Unit:
        name = name or self.container_name(spec.org, spec.name, service.name, replica)
        network = self._ensure_network(spec) if spec.multi else None
        binds: dict[str, dict[str, str]] = {}
        for volume in service.volumes:
            if not volume.name:
                continue  # anonymous: the engine makes it with the container
            binds[self._ensure_volume(spec, volume.name)] = {"bind": volume.path,
                                                             "mode": "ro" if volume.read_only else "rw"}
        for bind in service.binds:  # repository files copied under the state dir (compose apps)
            binds[bind.source] = {"bind": bind.target, "mode": "ro" if bind.read_only else "rw"}
        for secret in service.secrets:
            if self.secrets_dir is None:
                raise PermanentError("this runtime has no secrets directory", code="secret_missing")
            staged = self.secrets_dir / spec.org / spec.name / secret
            binds[str(staged)] = {"bind": f"/run/secrets/{secret}", "mode": "ro"}
        anonymous = [v.path for v in service.volumes if not v.name]  # Compose's anonymous volumes
        ports: list[Any] | None = [service.port] if service.port else None
        bindings: dict[Any, Any] | None = None
        if service.port:
            bindings = {service.port: (self.publish_address, service.host_port) if service.host_port
                        else (self.publish_address,)}
        for extra in service.ports:  # Compose's further published ports
            key = extra.target if extra.protocol == "tcp" else f"{extra.target}/{extra.protocol}"
            ports = [*(ports or []), (extra.target, extra.protocol) if extra.protocol != "tcp" else extra.target]
            bindings = {**(bindings or {}), key: (self.publish_address, extra.published) if extra.published
                        else (self.publish_address,)}
        ports = [*(ports or []), *(p for p in service.expose if p not in (ports or []))] or None
        host_config = self.api.create_host_config(
            port_bindings=bindings,
            nano_cpus=int(service.cpu * 1e9),
            mem_limit=service.memory * 1024 * 1024,
            # Equal to the memory limit: no swap on top, so the limit is real.
            memswap_limit=service.memory * 1024 * 1024,
            mem_reservation=None if service.memory_reservation is None else service.memory_reservation * 1024 * 1024,
            init=True if service.init is None else service.init,
            read_only=service.read_only or None,
            tmpfs={t.partition(":")[0]: t.partition(":")[2] for t in service.tmpfs} or None,
            log_config=_docker.LOG_CONFIG,
            binds=binds or None,
            network_mode=network,
        )
        networking = (self.api.create_networking_config(
            {network: self.api.create_endpoint_config(aliases=[service.name, *service.aliases])}) if network else None)
        check = None
        if service.healthcheck is not None:
            h = service.healthcheck
            check = {"test": list(h.test), "interval": int(h.interval * 1e9), "timeout": int(h.timeout * 1e9),
                      "retries": h.retries, "start_period": int(h.start_period * 1e9)}

        def create() -> dict[str, Any]:
            result: dict[str, Any] = self.api.create_container(
                service.image,
                command=list(service.command) if service.command else None,
                name=name,
                environment=dict(service.env),
                labels={**dict(service.labels),  # ours last: a user label never hides cynchrod's
                        **runtime.unit_labels(self.owner, self.instance, spec, service, replica),
                        **(extra_labels or {})},
                ports=ports,
                volumes=anonymous or None,
                host_config=host_config,
                networking_config=networking,
                healthcheck=check,
                entrypoint=list(service.entrypoint) if service.entrypoint is not None else None,
                user=service.user,
                working_dir=service.working_dir,
                hostname=service.hostname,
                stop_signal=service.stop_signal,
                stop_timeout=None if service.stop_grace_period is None else int(service.stop_grace_period),
                tty=service.tty,
                stdin_open=service.stdin_open,
            )
            return result

        try:
            created = self._call(create, f"create {name}")
        except _docker.Conflict as exc:
            raise self._name_conflict(name) from exc
        container_id: str = created["Id"]
        runtime.crashpoint(f"{point}after-create")
        fault("start", container_id, self.api)
        try:
            self._call(lambda: self.api.start(container_id), f"start {name}")
        except CynchrodError as exc:
            # Never leave the half-made container: the next try would meet its name (``name_in_use``)
            # instead of the cause, which is said each time.
            with contextlib.suppress(CynchrodError):  # an engine gone meanwhile: the resync removes it
                self._call(lambda: self.api.remove_container(container_id, force=True), "remove")
            raise self._start_failure(exc, service) from exc
        return self._served(container_id, spec, service, replica)

    def _start_failure(self, exc: CynchrodError, service: specs.ServiceSpec) -> CynchrodError:
        """A start that failed, in the project's words: a host port held by someone else is
        ``port_in_use`` with the port and who holds it when that can be known (temporary: the
        holder may go away); anything else as it came."""
        text = exc.message
        if service.host_port is None or not ("address already in use" in text or "already allocated" in text):
            return exc
        where = f"{self.publish_address}:{service.host_port}"
        holders = self._call(lambda: self.api.containers(filters={"publish": str(service.host_port)}),
                             "list containers")
        who = (f"container {holders[0]['Names'][0].lstrip('/')} ({holders[0]['Id'][:12]})" if holders
               else "a process outside Docker (see `ss -ltnp`)")
        return TemporaryError(f"host port {where} is in use by {who}; retried with back-off", code="port_in_use")

    def _name_conflict(self, name: str) -> Exception:
        """Why a create found its name taken: our own container on its way out is a
        temporary error (the engine's removal races the create); anything else is not ours."""
        try:
            holder = self._call(lambda: self.api.inspect_container(name), f"inspect {name}")
        except UnitGone:
            return TemporaryError(f"{name} was being removed; retrying", code="name_in_use")
        labels = (holder.get("Config") or {}).get("Labels") or {}
        if runtime.mine(labels, owner=self.owner, instance=self.instance):
            return TemporaryError(f"{name} is still held by a container of ours being removed; retrying",
                                  code="name_in_use")
        if labels.get(runtime.LABEL_OWNER) == self.owner:
            return PermanentError(
                f"a container named {name} belongs to another cynchrod instance with owner {self.owner!r} "
                f"(instance {labels.get(runtime.LABEL_INSTANCE, '?')[:12]}); it is left alone. Give each daemon "
                "on one engine its own --owner", code="owner_conflict")
        return PermanentError(f"a container named {name} exists without cynchrod's labels; it is left alone",
                              code="name_conflict")

    def _ensure_network(self, spec: specs.AppSpec) -> str:
        """The app's private bridge network, made (with our labels) when missing."""
        name = self.network_name(spec.org, spec.name)
        try:
            self._call(lambda: self.api.inspect_network(name), f"inspect network {name}")
        except UnitGone:
            with contextlib.suppress(_docker.Conflict):  # made concurrently by another service
                self._call(lambda: self.api.create_network(name, driver="bridge", check_duplicate=True,
                                                           labels=self._app_labels(spec.org, spec.name)),
                           f"create network {name}")
        return name

    def _ensure_volume(self, spec: specs.AppSpec, volume: str) -> str:
        name = self.volume_name(spec.org, spec.name, volume)
        try:
            found = self._call(lambda: self.api.inspect_volume(name), f"inspect volume {name}")
        except UnitGone:
            self._call(lambda: self.api.create_volume(name, driver="local",
                                                      labels=self._app_labels(spec.org, spec.name)),
                       f"create volume {name}")
            return name
        # A volume made by someone else, or with driver options (a bind of a host
        # path hides there), is never mounted.
        if (found.get("Labels") or {}).get(runtime.LABEL_OWNER) != self.owner or found.get("Options"):
            raise PermanentError(f"volume {name} exists but was not made by cynchrod (or has driver "
                                 "options); it is not mounted", code="policy_violation")
        return name

    def image_exists(self, image: str) -> bool:
        try:
            self._call(lambda: self.api.inspect_image(image), f"inspect image {image}")
            return True
        except UnitGone:
            return False

    def build_image(self, context: pathlib.Path, *, dockerfile: str, tag: str, args: dict[str, str],
                    org: str, app: str, log: Callable[[str], None], target: str = "") -> None:
        """docker build, its output streamed to ``log``; raises ``build_failed``."""
        self._build(context, dockerfile=dockerfile, tag=tag, args=args, org=org, app=app, log=log, target=target)

    def prune_images(self, org: str, app: str, *, keep: int) -> list[str]:
        """Remove this app's built images but the newest ``keep`` (and any still in use)."""
        images = sorted(self._app_images(org, app), key=lambda i: i.get("Created", 0), reverse=True)
        removed = []
        for image in images[keep:]:
            image_id: str = image["Id"]
            try:
                self._call(lambda i=image_id: self.api.remove_image(i), "remove image")  # type: ignore[misc]
                removed.append(image_id)
            except RuntimeFailure:
                pass  # in use by a container, or gone already
        return removed

    def exit_details(self, unit: runtime.Unit) -> tuple[int | None, bool]:
        """(exit code, OOM-killed) of a stopped unit: one inspect, only when one is healed."""
        try:
            state = self._call(lambda: self.api.inspect_container(unit.instance), "inspect")["State"]
        except RuntimeFailure:
            return unit.exit_code, unit.state == planning.OOM_KILLED
        return state.get("ExitCode"), bool(state.get("OOMKilled"))

    def remove_app(self, org: str, app: str) -> None:
        """After an app's containers are gone: its private network and the images we built for it.

        Named volumes are kept (they hold data); they carry our labels for ``docker volume prune``.
        """
        name = self.network_name(org, app)
        with contextlib.suppress(_docker.Conflict):  # still in use by a container being removed: next pass
            self._ignore_missing(lambda: self.api.remove_network(name), f"remove network {name}")
        for image in self._app_images(org, app):
            image_id: str = image["Id"]
            self._ignore_missing(lambda i=image_id: self.api.remove_image(i, force=True),  # type: ignore[misc]
                                 "remove image")

    def _pull(self, image: str) -> None:
        """Pull only references that name a registry; local tags are never pulled."""
        if not _docker.has_registry(image):
            raise PermanentError(
                f"image {image} is not present on this host and names no registry; build or load it here",
                code="image_not_found")
        repository, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "latest")
        puller = rt_client(self, timeout=PULL_TIMEOUT_S)  # bounded, apart from the list client
        try:
            self.calls += 1
            puller.api.pull(repository, tag=tag)
        except (docker.errors.DockerException, requests.RequestException, OSError) as exc:
            raise PermanentError(f"pull of {image} failed: {type(exc).__name__}", code="image_pull_failed") from exc
        finally:
            puller.close()

    # -- logs ---------------------------------------------------------------

    def tail(self, org: str, app: str, n: int) -> list[runtime.LogLine]:
        """The last ``n`` whole lines of the app's containers, oldest first: bounded reads
        (``_docker.tail_lines``)."""
        lines: list[runtime.LogLine] = []
        for unit in self.app_units(org, app):
            def read(k: int, instance: str = unit.instance) -> Iterable[bytes]:
                return _docker.container_logs(self.api, instance, tail=k)

            try:
                raw = self._call(lambda: _docker.tail_lines(read, n), "logs")
            except (UnitGone, _docker.Conflict):
                continue  # gone, or being removed (Docker answers 409): it has no more lines to give
            lines.extend(runtime.LogLine(unit.service, head, text, unit.replica, unit.node, cut)
                         for head, text, cut in raw)
        lines.sort(key=lambda line: _docker.stamp_key(line.timestamp))
        return lines[-n:]

    def follow(self, org: str, app: str, *, since: float, ended: threading.Event | None = None) -> _AppLogs:
        return _AppLogs(self, org, app, since, ended)


#: The name the rest of the project knew it by.
DockerRuntime = LocalRuntime


def _conforms(rt: LocalRuntime) -> runtime.StartFirst:
    return rt  # mypy checks that the driver is a Runtime and can be driven start-first
