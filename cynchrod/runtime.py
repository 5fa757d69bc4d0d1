"""The Docker Engine driver (the only module that imports ``docker``).

``observe()`` is one list call filtered by our owner label; ``apply(action)``
carries out one planner action. Every container we create carries the labels
below; nothing without our owner label is ever listed, so nothing foreign is
ever touched.

Recreate is remove-then-create, not rename-and-swap: a published host port
cannot be bound twice, and with no rename there is no half-renamed state to
recover. A crash between the two steps leaves the service missing (created
next pass); a crash between create and start leaves it ``created``, which the
planner sweeps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pathlib
import re
import signal
import threading
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import docker
import docker.errors
import requests

from cynchrod import planning, specs
from cynchrod.errors import PermanentError, RuntimeFailure

log = logging.getLogger(__name__)

LABEL_OWNER = "io.cynchrod.owner"
LABEL_ORG = "io.cynchrod.org"
LABEL_APP = "io.cynchrod.app"
LABEL_SERVICE = "io.cynchrod.service"
LABEL_HASH = "io.cynchrod.spec-hash"
LABEL_SPEC = "io.cynchrod.spec"
LABEL_PATH = "io.cynchrod.path"

PULL_TIMEOUT_S = 300
#: Per-container log cap: the json-file driver rotates, so no log grows without bound.
LOG_CONFIG = {"type": "json-file", "config": {"max-size": "10m", "max-file": "3"}}
_EXIT_RE = re.compile(r"Exited \((-?\d+)\)")


@dataclasses.dataclass(frozen=True)
class Served:
    """The container serving a service after an action, and its bound host port."""

    container_id: str
    host_port: int | None


def crashpoint(name: str) -> None:
    """Testing hook: ``CYNCHROD_CRASHPOINT=<name>`` SIGKILLs the process group here.

    The crash-safety tests use it to kill a real daemon (gunicorn's master and
    worker alike, started in a session of their own) between two Docker calls
    (``after-create``: created, not started; ``after-remove``: the old
    container of a recreate is gone, the new one not made yet).
    """
    if os.environ.get("CYNCHROD_CRASHPOINT") == name:
        os.killpg(os.getpgrp(), signal.SIGKILL)


def has_registry(image: str) -> bool:
    """True when the reference names a registry host (``host.tld/...``, ``host:port/...``)."""
    first, sep, _ = image.partition("/")
    return bool(sep) and ("." in first or ":" in first or first == "localhost")


def _converted(call: Callable[[], Any], what: str) -> Any:
    try:
        return call()
    except docker.errors.NotFound:
        raise
    except docker.errors.APIError as exc:
        if exc.status_code == 409:
            raise PermanentError(f"{what}: {exc.explanation}", code="name_conflict") from exc
        raise RuntimeFailure(f"{what}: {exc.explanation or exc}") from exc
    except (requests.RequestException, docker.errors.DockerException) as exc:
        raise RuntimeFailure(f"{what}: docker unreachable ({type(exc).__name__})", code="docker_unavailable") from exc


def split_log_line(line: str) -> tuple[str, str]:
    """Docker's ``<RFC3339Nano timestamp> <text>`` into its two parts."""
    stamp, _, text = line.partition(" ")
    return stamp, text


class LogFollower:
    """A followed log stream on its own connection (no read timeout); ``close()``
    from another thread ends the iteration."""

    def __init__(self, container_id: str, since: float) -> None:
        self._client = docker.DockerClient.from_env(timeout=None)
        try:
            self._stream = _converted(lambda: self._client.api.logs(
                container_id, stream=True, follow=True, timestamps=True, since=since), "logs")
        except BaseException:
            self._client.close()
            raise
        self._closed = False

    def __iter__(self) -> Iterator[tuple[str, str]]:
        pending = b""
        try:
            for chunk in self._stream:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield split_log_line(line.decode("utf-8", "replace"))
        except (requests.RequestException, docker.errors.DockerException, OSError, AttributeError, ValueError):
            if not self._closed:
                raise
        if pending and not self._closed:
            yield split_log_line(pending.decode("utf-8", "replace"))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._stream.close()
        with contextlib.suppress(Exception):
            self._client.close()


class DockerRuntime:
    """Drives one Docker Engine for one owner (a namespace of labels and names)."""

    def __init__(self, *, owner: str = "cynchrod", publish_address: str = "127.0.0.1",
                 stop_timeout: int = 10, client: docker.DockerClient | None = None,
                 secrets_dir: pathlib.Path | None = None) -> None:
        self.owner = owner
        #: Where the reconciler stages secret files (``<org>/<app>/<name>``).
        self.secrets_dir = secrets_dir
        self.publish_address = publish_address
        self.stop_timeout = stop_timeout
        self._client = client or docker.DockerClient.from_env(timeout=60)
        self.api = self._client.api

    def close(self) -> None:
        self._client.close()

    # -- names and labels -------------------------------------------------

    def container_name(self, org: str, app: str, service: str) -> str:
        base = f"{self.owner}_{org}_{app}"
        return base if service == specs.MAIN_SERVICE else f"{base}_{service}"

    def labels(self, spec: specs.AppSpec, service: specs.ServiceSpec) -> dict[str, str]:
        return {
            LABEL_OWNER: self.owner,
            LABEL_ORG: spec.org,
            LABEL_APP: spec.name,
            LABEL_SERVICE: service.name,
            LABEL_HASH: spec.service_hash(service),
            LABEL_SPEC: service.canonical(restarted_at=spec.restarted_at),
            LABEL_PATH: spec.path,
        }

    def network_name(self, org: str, app: str) -> str:
        return f"{self.owner}_{org}_{app}"

    def volume_name(self, org: str, app: str, volume: str) -> str:
        return f"{self.owner}_{org}_{app}_{volume}"

    def _app_labels(self, org: str, app: str) -> dict[str, str]:
        return {LABEL_OWNER: self.owner, LABEL_ORG: org, LABEL_APP: app}

    @property
    def owner_filter(self) -> dict[str, list[str]]:
        return {"label": [f"{LABEL_OWNER}={self.owner}"]}

    # -- observing ----------------------------------------------------------

    def observe(self) -> list[planning.Observed]:
        """Every container we own, from exactly one list call (no inspect, no size)."""
        rows = _converted(lambda: self.api.containers(all=True, filters=self.owner_filter), "list containers")
        return [self._observed(row) for row in rows]

    @staticmethod
    def _observed(row: dict[str, Any]) -> planning.Observed:
        labels = row.get("Labels") or {}
        match = _EXIT_RE.search(row.get("Status") or "")
        public = [p.get("PublicPort") for p in row.get("Ports") or [] if p.get("PublicPort")]
        return planning.Observed(
            id=row["Id"],
            name=(row.get("Names") or ["/?"])[0].lstrip("/"),
            org=labels.get(LABEL_ORG, ""),
            app=labels.get(LABEL_APP, ""),
            service=labels.get(LABEL_SERVICE, specs.MAIN_SERVICE),
            spec_hash=labels.get(LABEL_HASH, ""),
            spec_json=labels.get(LABEL_SPEC, ""),
            state=row.get("State", ""),
            exit_code=int(match.group(1)) if match else None,
            host_port=public[0] if public else None,
        )

    # -- acting -------------------------------------------------------------

    def apply(self, action: planning.Action) -> Served | None:
        """Carry out one action; returns the container now serving, if any."""
        if action.kind == planning.REMOVE:
            self._remove(action.container_id)
            return None
        if action.kind == planning.STOP:
            self._ignore_missing(lambda: self.api.stop(action.container_id, timeout=self.stop_timeout), "stop")
            return Served(action.container_id or "", None)
        if action.kind == planning.START:
            _converted(lambda: self.api.start(action.container_id), "start")
            return self._served(action.container_id or "", action.service_spec)
        assert action.spec is not None and action.service_spec is not None
        # The image is made sure of before the old container goes, so a bad
        # tag leaves the running version in place.
        self._ensure_image(action.service_spec.image)
        if action.kind == planning.RECREATE:
            self._remove(action.container_id)
            crashpoint("after-remove")
        return self._create(action.spec, action.service_spec)

    def _ensure_image(self, image: str) -> None:
        try:
            _converted(lambda: self.api.inspect_image(image), f"inspect image {image}")
        except docker.errors.NotFound:
            self._pull(image)

    def _ignore_missing(self, call: Callable[[], Any], what: str) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            _converted(call, what)

    def _remove(self, container_id: str | None) -> None:
        if container_id is None:
            return
        self._ignore_missing(lambda: self.api.stop(container_id, timeout=self.stop_timeout), "stop")
        self._ignore_missing(lambda: self.api.remove_container(container_id, force=True), "remove")

    def _served(self, container_id: str, service: specs.ServiceSpec | None) -> Served:
        """The container and, when it publishes a port, the host port Docker bound."""
        if service is None or not service.port:
            return Served(container_id, None)
        if service.host_port:
            return Served(container_id, service.host_port)
        bound = _converted(lambda: self.api.port(container_id, service.port), "port") or []
        return Served(container_id, int(bound[0]["HostPort"]) if bound else None)

    def _create(self, spec: specs.AppSpec, service: specs.ServiceSpec) -> Served:
        name = self.container_name(spec.org, spec.name, service.name)
        network = self._ensure_network(spec) if spec.multi else None
        binds: dict[str, dict[str, str]] = {}
        for volume in service.volumes:
            binds[self._ensure_volume(spec, volume.name)] = {"bind": volume.path,
                                                             "mode": "ro" if volume.read_only else "rw"}
        for secret in service.secrets:
            if self.secrets_dir is None:
                raise PermanentError("this runtime has no secrets directory", code="secret_missing")
            staged = self.secrets_dir / spec.org / spec.name / secret
            binds[str(staged)] = {"bind": f"/run/secrets/{secret}", "mode": "ro"}
        ports = [service.port] if service.port else None
        bindings: dict[int, Any] | None = None
        if service.port:
            bindings = {service.port: (self.publish_address, service.host_port) if service.host_port
                        else (self.publish_address,)}
        host_config = self.api.create_host_config(
            port_bindings=bindings,
            nano_cpus=int(service.cpu * 1e9),
            mem_limit=service.memory * 1024 * 1024,
            # Equal to the memory limit: no swap on top, so the limit is real.
            memswap_limit=service.memory * 1024 * 1024,
            init=True,
            log_config=LOG_CONFIG,
            binds=binds or None,
            network_mode=network,
        )
        networking = (self.api.create_networking_config(
            {network: self.api.create_endpoint_config(aliases=[service.name])}) if network else None)
        health = None
        if service.healthcheck is not None:
            h = service.healthcheck
            health = {"test": list(h.test), "interval": int(h.interval * 1e9), "timeout": int(h.timeout * 1e9),
                      "retries": h.retries, "start_period": int(h.start_period * 1e9)}

        def create() -> dict[str, Any]:
            result: dict[str, Any] = self.api.create_container(
                service.image,
                command=list(service.command) if service.command else None,
                name=name,
                environment=dict(service.env),
                labels=self.labels(spec, service),
                ports=ports,
                host_config=host_config,
                networking_config=networking,
                healthcheck=health,
            )
            return result

        try:
            created = _converted(create, f"create {name}")
        except docker.errors.NotFound as exc:
            raise RuntimeFailure(f"create {name}: {exc.explanation}") from exc
        except PermanentError as exc:
            if exc.code == "name_conflict":
                raise PermanentError(
                    f"a container named {name} exists without cynchrod's labels; it is left alone",
                    code="name_conflict") from exc
            raise
        container_id: str = created["Id"]
        crashpoint("after-create")
        try:
            _converted(lambda: self.api.start(container_id), f"start {name}")
        except docker.errors.NotFound as exc:
            raise RuntimeFailure(f"start {name}: container vanished") from exc
        return self._served(container_id, service)

    def _ensure_network(self, spec: specs.AppSpec) -> str:
        """The app's private bridge network, made (with our labels) when missing."""
        name = self.network_name(spec.org, spec.name)
        try:
            _converted(lambda: self.api.inspect_network(name), f"inspect network {name}")
        except docker.errors.NotFound:
            with contextlib.suppress(PermanentError):  # a 409: made concurrently by another service
                _converted(lambda: self.api.create_network(name, driver="bridge", check_duplicate=True,
                                                           labels=self._app_labels(spec.org, spec.name)),
                           f"create network {name}")
        return name

    def _ensure_volume(self, spec: specs.AppSpec, volume: str) -> str:
        name = self.volume_name(spec.org, spec.name, volume)
        try:
            found = _converted(lambda: self.api.inspect_volume(name), f"inspect volume {name}")
            # A volume made by someone else, or with driver options (a bind of a host
            # path hides there), is never mounted.
            if (found.get("Labels") or {}).get(LABEL_OWNER) != self.owner or found.get("Options"):
                raise PermanentError(f"volume {name} exists but was not made by cynchrod (or has driver "
                                     "options); it is not mounted", code="policy_violation")
        except docker.errors.NotFound:
            _converted(lambda: self.api.create_volume(name, driver="local",
                                                      labels=self._app_labels(spec.org, spec.name)),
                       f"create volume {name}")
        return name

    def image_exists(self, image: str) -> bool:
        try:
            _converted(lambda: self.api.inspect_image(image), f"inspect image {image}")
            return True
        except docker.errors.NotFound:
            return False

    def build_image(self, context: pathlib.Path, *, dockerfile: str, tag: str, args: dict[str, str],
                    org: str, app: str, log: Callable[[str], None]) -> None:
        """docker build, its output streamed to ``log``; raises ``build_failed``."""
        labels = self._app_labels(org, app)
        try:
            for chunk in self.api.build(path=str(context), dockerfile=dockerfile, tag=tag, buildargs=args or None,
                                        labels=labels, rm=True, forcerm=True, decode=True):
                if "stream" in chunk:
                    for line in str(chunk["stream"]).splitlines():
                        if line.strip():
                            log(line)
                if "error" in chunk:
                    log(str(chunk["error"]).rstrip())
                    raise PermanentError(str(chunk["error"]).strip(), code="build_failed")
        except (docker.errors.APIError, docker.errors.BuildError) as exc:
            log(str(exc))
            raise PermanentError(str(exc), code="build_failed") from exc
        except (requests.RequestException, docker.errors.DockerException) as exc:
            raise RuntimeFailure(f"build: docker unreachable ({type(exc).__name__})",
                                 code="docker_unavailable") from exc

    def prune_images(self, org: str, app: str, *, keep: int) -> list[str]:
        """Remove this app's built images but the newest ``keep`` (and any still in use)."""
        filters = {"label": [f"{LABEL_OWNER}={self.owner}", f"{LABEL_ORG}={org}", f"{LABEL_APP}={app}"]}
        images = sorted(_converted(lambda: self.api.images(filters=filters), "list images"),
                        key=lambda i: i.get("Created", 0), reverse=True)
        removed = []
        for image in images[keep:]:
            image_id: str = image["Id"]
            try:
                _converted(partial(self.api.remove_image, image_id), "remove image")
                removed.append(image_id)
            except (PermanentError, RuntimeFailure, docker.errors.NotFound):
                pass  # in use by a container, or gone already
        return removed

    def exit_state(self, container_id: str) -> tuple[int | None, bool]:
        """(exit code, OOM-killed) of a stopped container: one inspect, only when one died."""
        try:
            state = _converted(lambda: self.api.inspect_container(container_id), "inspect")["State"]
        except docker.errors.NotFound:
            return None, False
        return state.get("ExitCode"), bool(state.get("OOMKilled"))

    def remove_app_resources(self, org: str, app: str) -> None:
        """After an app's containers are gone: its private network and the images we built for it.

        Named volumes are kept (they hold data); they carry our labels for ``docker volume prune``.
        """
        name = self.network_name(org, app)
        self._ignore_missing(lambda: self.api.remove_network(name), f"remove network {name}")
        filters = {"label": [f"{LABEL_OWNER}={self.owner}", f"{LABEL_ORG}={org}", f"{LABEL_APP}={app}"]}
        for image in _converted(lambda: self.api.images(filters=filters), "list images"):
            image_id: str = image["Id"]
            self._ignore_missing(partial(self.api.remove_image, image_id, force=True), "remove image")

    def _pull(self, image: str) -> None:
        """Pull only references that name a registry; local tags are never pulled."""
        if not has_registry(image):
            raise PermanentError(
                f"image {image} is not present on this host and names no registry; build or load it here",
                code="image_not_found")
        repository, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "latest")
        puller = docker.DockerClient.from_env(timeout=PULL_TIMEOUT_S)  # bounded, apart from the list client
        try:
            puller.api.pull(repository, tag=tag)
        except (docker.errors.DockerException, requests.RequestException) as exc:
            raise PermanentError(f"pull of {image} failed: {type(exc).__name__}", code="image_pull_failed") from exc
        finally:
            puller.close()

    # -- logs ---------------------------------------------------------------

    def app_containers(self, org: str, app: str) -> list[planning.Observed]:
        """The containers of one app (one list call)."""
        filters = {"label": [f"{LABEL_OWNER}={self.owner}", f"{LABEL_ORG}={org}", f"{LABEL_APP}={app}"]}
        rows = _converted(lambda: self.api.containers(all=True, filters=filters), "list containers")
        return [self._observed(row) for row in rows]

    def log_tail(self, container_id: str, tail: int) -> list[tuple[str, str]]:
        """The last ``tail`` lines of a container as (timestamp, text): a bounded read."""
        try:
            raw = _converted(lambda: self.api.logs(container_id, timestamps=True, tail=tail), "logs")
        except docker.errors.NotFound:
            return []
        return [split_log_line(line) for line in raw.decode("utf-8", "replace").splitlines()]

    def log_follow(self, container_id: str, *, since: float) -> LogFollower:
        """Lines written from ``since`` on, until the container stops or ``close()``."""
        return LogFollower(container_id, since)

    # -- events -------------------------------------------------------------

    def watch_deaths(self, on_event: Callable[[str, str, str], None], stop: threading.Event) -> None:
        """Call ``on_event(container_id, "org/app", action)`` when one of our containers
        dies (``die``, ``oom``, ``destroy``) or starts (``start``).

        Runs until ``stop`` is set; reconnects when the daemon goes away.
        """
        while not stop.is_set():
            try:
                stream = self.api.events(
                    filters={"type": "container", "event": ["die", "destroy", "oom", "start"],
                             **self.owner_filter},
                    decode=True)
            except (requests.RequestException, docker.errors.DockerException):
                stop.wait(2)
                continue
            closer = threading.Thread(target=lambda s=stream: (stop.wait(), s.close()), daemon=True)
            closer.start()
            try:
                for event in self._events(stream):
                    attrs = event.get("Actor", {}).get("Attributes", {})
                    on_event(event.get("id", ""), f"{attrs.get(LABEL_ORG)}/{attrs.get(LABEL_APP)}",
                             event.get("Action", ""))
            except (requests.RequestException, docker.errors.DockerException, OSError, AttributeError):
                pass
            stop.wait(1)

    @staticmethod
    def _events(stream: Any) -> Iterator[dict[str, Any]]:
        yield from stream
