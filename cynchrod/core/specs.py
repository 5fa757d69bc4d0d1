"""Frozen values for what a manifest declares: ``AppSpec`` and its ``ServiceSpec`` s.

Built by ``manifests``, read by ``planning`` and the runtime. The spec hash of a
service is what the runtime stores in a container label to detect drift.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from typing import Any

from cynchrod.core import updates

DEFAULT_ORG = "default"
#: An org or app name: a DNS label. The one home of the rule; ``schemas/app.schema.json``
#: carries the same pattern (a unit test keeps them equal) for editors.
NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
NAME_RE = re.compile(NAME_PATTERN)
DEFAULT_CPU = 1.0
DEFAULT_MEMORY_MB = 512
#: The service name of a single-container app (one declared with ``image``).
MAIN_SERVICE = "main"


@dataclasses.dataclass(frozen=True)
class Volume:
    """A named volume mounted in a container (host paths are never allowed)."""

    name: str
    path: str
    read_only: bool = False


@dataclasses.dataclass(frozen=True)
class Healthcheck:
    test: tuple[str, ...]
    interval: float = 30.0
    timeout: float = 30.0
    retries: int = 3
    start_period: float = 0.0


@dataclasses.dataclass(frozen=True)
class Bind:
    """Repository files bind-mounted into a container (Compose's relative bind mounts): ``source`` is
    the host path of their copy under the state dir, named by their content, so new content is a
    new path (a new hash, a new container) and the same content is the same path."""

    source: str
    target: str
    read_only: bool = True


@dataclasses.dataclass(frozen=True)
class Port:
    """A published port beyond a service's first (``port``/``host_port``): Compose's ``ports`` list."""

    target: int
    published: int | None = None
    protocol: str = "tcp"


@dataclasses.dataclass(frozen=True)
class Build:
    """Where a built image comes from: a repo app's source repository (``repo``), or, with ``repo``
    empty, a compose service's ``build:`` context of the manifests repository, copied by its content
    under the state dir (``context`` is then the host path of that copy; the image is tagged by the
    content digest when the compose file is parsed, so the same content is never built twice)."""

    repo: str
    ref: str = "main"
    context: str = "."
    dockerfile: str = "Dockerfile"
    args: tuple[tuple[str, str], ...] = ()
    #: The stage of a multi-stage Dockerfile to build ("": the last). Out of the hash when "".
    target: str = ""

    @property
    def local(self) -> bool:
        """A context of the manifests repository (a compose ``build:``), not a repository of its own."""
        return not self.repo


@dataclasses.dataclass(frozen=True)
class ServiceSpec:
    """One container of an app, normalised (defaults applied, env sorted)."""

    name: str
    image: str
    command: tuple[str, ...] | None = None
    env: tuple[tuple[str, str], ...] = ()
    port: int | None = None
    host_port: int | None = None
    cpu: float = DEFAULT_CPU
    memory: int = DEFAULT_MEMORY_MB
    volumes: tuple[Volume, ...] = ()
    depends_on: tuple[str, ...] = ()
    healthcheck: Healthcheck | None = None
    secrets: tuple[str, ...] = ()
    #: Keyed digest of the current values of ``secrets`` (filled by the reconciler,
    #: never from a manifest): a rotated secret changes the hash and redeploys.
    secret_digest: str = ""
    #: For repo apps; ``image`` is then filled by the reconciler with the tag of the
    #: source commit (``cynchrod/<org>-<app>:<commit>``), so a new commit redeploys.
    build: Build | None = None
    #: How many units run this service. Not part of the hash: a change of count
    #: adds or removes units, it never remakes the ones that run.
    replicas: int = 1
    #: Host name routed to this service's ``port`` by the edge (multi-service apps).
    #: Not part of the hash either: a route changes, the container stays.
    domain: str | None = None
    #: The ``update:`` block (image updates). Not part of the hash: a policy change remakes nothing.
    update: updates.UpdatePolicy | None = None
    # --- set by Compose files (desired/compose); at their defaults they are left out of the
    # hash (``_HASH_OPTIONAL``), so a spec that does not use them keeps the hash it had before
    # they existed and an upgrade recreates no container.
    entrypoint: tuple[str, ...] | None = None
    user: str | None = None
    working_dir: str | None = None
    hostname: str | None = None
    stop_signal: str | None = None
    #: Seconds; None: the runtime's stop timeout.
    stop_grace_period: float | None = None
    #: None: the runtime's default (an init process).
    init: bool | None = None
    read_only: bool = False
    tmpfs: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    expose: tuple[int, ...] = ()
    ports: tuple[Port, ...] = ()
    cpu_reservation: float | None = None
    memory_reservation: int | None = None
    #: ``depends_on`` conditions other than ``service_started`` (service -> condition), sorted.
    depends_on_conditions: tuple[tuple[str, str], ...] = ()
    binds: tuple[Bind, ...] = ()
    tty: bool = False
    stdin_open: bool = False
    #: Further names of the service on the app's private network (Compose's ``networks.<n>.aliases``).
    aliases: tuple[str, ...] = ()
    # --- readiness (``core.health``): never part of the hash, they say how a deployment is judged.
    #: A unit that runs to completion (a migration): exiting 0 is ``completed``, and it is not restarted.
    oneshot: bool = False
    #: Seconds a unit without a healthcheck must stay up to be ready (None: the default, ``health``).
    min_ready: float | None = None
    #: Seconds a unit has to become ready (None: the default, ``health``).
    health_timeout: float | None = None

    def canonical(self, *, restarted_at: str | None) -> str:
        """Everything that, when changed, needs a new container, as canonical JSON.

        Stored on the container as a label so ``plan`` can name the changed keys.
        """
        body = dataclasses.asdict(self)
        del body["replicas"]
        del body["domain"]
        del body["update"]
        for key, default in _HASH_OPTIONAL.items():
            if body[key] == default or (default == () and not body[key]):
                del body[key]
        for key in _NOT_HASHED:
            del body[key]
        if body["build"] is not None and not body["build"]["target"]:
            del body["build"]["target"]  # added later: out of the hash when unset
        body["restarted_at"] = restarted_at
        return json.dumps(body, sort_keys=True, separators=(",", ":"))

    def hash(self, *, restarted_at: str | None) -> str:
        return hashlib.sha256(self.canonical(restarted_at=restarted_at).encode()).hexdigest()[:16]


#: Fields added after the hash was first computed, with their defaults: left out of the hash when unset.
_HASH_OPTIONAL: dict[str, Any] = {
    f.name: f.default if f.default is not dataclasses.MISSING else None
    for f in dataclasses.fields(ServiceSpec)
    if f.name in ("entrypoint", "user", "working_dir", "hostname", "stop_signal", "stop_grace_period", "init",
                  "read_only", "tmpfs", "labels", "expose", "ports", "cpu_reservation", "memory_reservation",
                  "depends_on_conditions", "binds", "tty", "stdin_open", "aliases")
}
#: The readiness keys (``core.health``): how a deployment is judged, never what runs.
_NOT_HASHED = ("oneshot", "min_ready", "health_timeout")


@dataclasses.dataclass(frozen=True)
class AppSpec:
    """One app as declared by one manifest file at one commit."""

    org: str
    name: str
    services: tuple[ServiceSpec, ...]
    domain: str | None = None
    state: str = "running"
    restarted_at: str | None = None
    #: Repository-relative path of the manifest (for errors and commit-backs).
    path: str = ""
    #: URL of the repository that declares it (several may be followed).
    source: str = ""
    #: Values of the secrets the repository itself gives (a compose file's ``secrets: {x: {file:}}``
    #: or ``{environment:}``), name -> value, sorted. Kept in memory only: never in ``repr``, the
    #: recorded spec (``to_json``) or a hash; the staging tmpfs is the one place they are written,
    #: and the keyed ``secret_digest`` of the services tells a change.
    secret_values: tuple[tuple[str, bytes], ...] = dataclasses.field(default=(), repr=False)

    @property
    def inline_secrets(self) -> frozenset[str]:
        """The names of ``secret_values`` (the rest of ``secret_names`` are the org's stored secrets)."""
        return frozenset(name for name, _ in self.secret_values)
    #: What a deployment that fails its readiness leaves: ``keep`` (the failed version, for
    #: inspection) or ``rollback`` (the last healthy spec put back on the engine).
    on_failure: str = "keep"

    @property
    def key(self) -> tuple[str, str]:
        return (self.org, self.name)

    @property
    def image(self) -> str:
        return self.services[0].image if len(self.services) == 1 else ""

    @property
    def port(self) -> int | None:
        return self.services[0].port if len(self.services) == 1 else None

    def service_hash(self, service: ServiceSpec) -> str:
        # Specs are frozen, so their hashes are computed once per spec object: a no-op
        # pass over many apps would otherwise spend its time re-serialising them.
        if self.services[0] is service:  # most apps have one service
            return self._service_hashes[0]
        for i, own in enumerate(self.services):
            if own is service:
                return self._service_hashes[i]
        return service.hash(restarted_at=self.restarted_at)

    @functools.cached_property
    def _service_hashes(self) -> tuple[str, ...]:
        return tuple(s.hash(restarted_at=self.restarted_at) for s in self.services)

    @functools.cached_property
    def start_order(self) -> dict[str, int]:
        """Each service's place in start order: its ``depends_on`` first, then by name
        (computed once per spec object; a cycle, refused by validation, falls back to names)."""
        deps = {s.name: set(s.depends_on) for s in self.services}
        order: dict[str, int] = {}
        while len(order) < len(deps):
            ready = sorted(n for n, d in deps.items() if n not in order and d <= set(order))
            if not ready:
                ready = sorted(n for n in deps if n not in order)
            for name in ready:
                order[name] = len(order)
        return order

    @property
    def domains(self) -> tuple[str, ...]:
        """Every host name the app claims (its own and its services'), lowercase."""
        own = (self.domain,) if self.domain else ()
        return tuple(d.lower() for d in (*own, *(s.domain for s in self.services if s.domain)) if d)

    @functools.cached_property
    def hash(self) -> str:
        """Hash of the whole desired state of the app, state included."""
        parts = [self.state, *self._service_hashes]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    @functools.cached_property
    def json_text(self) -> str:
        """``to_json()`` as text, what the store keeps (computed once per spec)."""
        return json.dumps(self.to_json())

    @property
    def multi(self) -> bool:
        """Multi-service apps get a private network; single ones run on the default bridge."""
        return len(self.services) > 1 or self.services[0].name != MAIN_SERVICE

    @property
    def secret_names(self) -> frozenset[str]:
        return frozenset(name for s in self.services for name in s.secrets)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        del data["secret_values"]  # plaintext: never recorded
        for service in data["services"]:
            service["secret_digest"] = ""  # derived each pass; not part of the recorded spec
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AppSpec:
        def health(h: dict[str, Any] | None) -> Healthcheck | None:
            return None if h is None else Healthcheck(**{**h, "test": tuple(h["test"])})

        services = tuple(
            ServiceSpec(
                name=s["name"],
                image=s["image"],
                command=tuple(s["command"]) if s.get("command") is not None else None,
                env=tuple((k, v) for k, v in s.get("env", ())),
                port=s.get("port"),
                host_port=s.get("host_port"),
                cpu=float(s.get("cpu", DEFAULT_CPU)),
                memory=int(s.get("memory", DEFAULT_MEMORY_MB)),
                volumes=tuple(Volume(**v) for v in s.get("volumes", ())),
                depends_on=tuple(s.get("depends_on", ())),
                healthcheck=health(s.get("healthcheck")),
                secrets=tuple(s.get("secrets", ())),
                build=Build(**{**s["build"], "args": tuple(tuple(a) for a in s["build"].get("args", ()))})
                if s.get("build") else None,
                replicas=int(s.get("replicas", 1)),
                domain=s.get("domain"),
                update=updates.UpdatePolicy(**s["update"]) if s.get("update") else None,
                entrypoint=tuple(s["entrypoint"]) if s.get("entrypoint") is not None else None,
                user=s.get("user"),
                working_dir=s.get("working_dir"),
                hostname=s.get("hostname"),
                stop_signal=s.get("stop_signal"),
                stop_grace_period=s.get("stop_grace_period"),
                init=s.get("init"),
                read_only=bool(s.get("read_only", False)),
                tmpfs=tuple(s.get("tmpfs", ())),
                labels=tuple((k, v) for k, v in s.get("labels", ())),
                expose=tuple(s.get("expose", ())),
                ports=tuple(Port(**p) for p in s.get("ports", ())),
                cpu_reservation=s.get("cpu_reservation"),
                memory_reservation=s.get("memory_reservation"),
                depends_on_conditions=tuple((k, v) for k, v in s.get("depends_on_conditions", ())),
                binds=tuple(Bind(**b) for b in s.get("binds", ())),
                tty=bool(s.get("tty", False)),
                stdin_open=bool(s.get("stdin_open", False)),
                aliases=tuple(s.get("aliases", ())),
                oneshot=bool(s.get("oneshot", False)),
                min_ready=s.get("min_ready"),
                health_timeout=s.get("health_timeout"),
            )
            for s in data["services"]
        )
        return cls(
            org=data["org"],
            name=data["name"],
            services=services,
            domain=data.get("domain"),
            state=data.get("state", "running"),
            restarted_at=data.get("restarted_at"),
            path=data.get("path", ""),
            source=data.get("source", ""),
            on_failure=data.get("on_failure", "keep"),
        )
