"""The swarm driver: the ``Runtime`` protocol on Docker Swarm services (imports ``docker``).

Over 500 lines on purpose, like ``local``: one engine's whole mapping (services, tasks, secrets,
networks, the registry, logs), its shared glue in ``_docker``.

Chosen with ``--runtime swarm``; created by the daemon with a client of a swarm
*manager* (``DOCKER_HOST``). Docker SDK only: the CLI's ``service create`` looks
registry digests up on its own.

The mapping:

* Each service of an app is one Swarm service ``<owner>_<org>_<app>_<service>``,
  labelled like the one-host containers (owner, instance, org, app, service, spec
  hash, spec) on the service and in its task template. A *unit* is one task slot:
  the slot's current task (``instance`` = task id, ``replica`` = slot - 1, ``node``
  = the node's hostname, ``endpoint`` = the host-mode published port).
* The planner speaks per replica; here any create, recreate or start of a replica
  *converges the whole service* (create it, or update it to the wanted spec and
  ``replicas``), and the app's other actions on that service in the same pass find
  it converged and do nothing more. Stop scales to 0; removing a unit of an
  undeclared service removes the service, removing a surplus replica scales down.
  Start of a unit whose task is still current and not running is a forced update.
* ``cpu``/``memory`` are limits and equal reservations (the scheduler places only
  what fits). Multi-service apps get one attachable overlay network; services
  reach each other by name (a network alias). The kernels this was made on have
  no IPVS: endpoint mode ``dnsrr`` and published ports in ``host`` mode.
* Secrets are Docker secrets (raft store, tmpfs in the task), immutable: each
  version is named with a digest of its value (keyed, it tells nothing of the
  value); a rotation creates the new one, updates the service, removes the old.
* Rolling updates are ``stop-first`` when a host port is published (it cannot be
  bound twice), ``start-first`` otherwise; the monitor window is ``min_ready`` and
  ``failure_action`` follows ``on_failure`` (``rollback``, else ``continue``).
  ``apply`` then watches the service's tasks until each task of the new spec has
  started or ended, and turns what the swarm would retry forever into errors: a
  task no node can take is ``unschedulable`` (the scheduler's reason in
  ``last_error``), a missing image or a failed pull is ``image_not_found`` /
  ``image_pull_failed`` (the new service is removed, an update rolled back), an
  update the swarm rolled back with no task of the new spec to judge is
  ``update_failed``.
* Health gate (``shell.gates``): a task's healthcheck is its state (``task_health``:
  ``starting`` until healthy, stopped as "unhealthy container"); a ``oneshot``
  never restarts and its completed task stays its slot's unit (``current_tasks``);
  the tasks of a service this daemon changed that ended on their own since are
  kept from the reads the event feed makes anyway (``ended``): the swarm replaces
  them in their slot, so the slot's unit alone would not say the deployment failed.
* Drift: the service label ``io.cynchrod.applied`` is a digest of the spec we sent;
  a listing compares it with the service's spec now (defaults the engine adds left
  out), so a ``docker service update`` by hand shows as a changed unit and is put
  back; ``docker service rm`` shows as missing units.
* Observing: the view (``view.View``) is fed by the manager's events, as on one
  host; a pass with nothing to do makes no engine call. A relist (start-up, each
  reconnect, each resync) is one services list and one tasks list. In between,
  ``watch`` turns the events into ``STALE`` parts that the view reads again alone
  (``Stale``, ``reread``; on the stream's own connection, counted in
  ``watch_calls``): a service's create/update/remove, its spec and tasks; a task
  container's start/die/destroy on the manager, that service's tasks; a node's
  update, every task. Docker 20.10 has no task events and the manager gives no
  container events of other nodes (measured: a task killed on a worker says
  nothing), so the tasks alone (one list, with the services as last read) are read
  again every ``POLL_S``, every ``SETTLE_S`` while some task is not running.
* Repo apps (``registry`` set): built on the manager, pushed, run by digest so
  every node can pull them; pruned (and deleted with their app) in the registry
  through its HTTP API.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import pathlib
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import docker
import docker.errors
import requests
from docker.types import (
    ConfigReference,
    ContainerSpec,
    DriverConfig,
    EndpointSpec,
    Healthcheck,
    Mount,
    NetworkAttachmentConfig,
    Resources,
    RestartPolicy,
    SecretReference,
    ServiceMode,
    TaskTemplate,
    UpdateConfig,
)

from cynchrod import runtime
from cynchrod.core import planning, specs
from cynchrod.core.codes import Code
from cynchrod.core.errors import (
    EngineUnavailable,
    PermanentError,
    RuntimeFailure,
    TemporaryError,
    UnitGone,
)
from cynchrod.runtime import _docker, follow
from cynchrod.runtime._docker import CALL_TIMEOUT_S, converted, has_registry

log = logging.getLogger(__name__)
T = TypeVar("T")

LABEL_APPLIED = "io.cynchrod.applied"
LABEL_SECRET = "io.cynchrod.secret"
#: How long ``apply`` watches a service's tasks after changing it.
APPLY_WAIT_S = 60.0
#: Repository files bound into one service as Docker configs: at most this many, each this big.
MAX_CONFIG_FILES = 256
MAX_CONFIG_BYTES = 1000 * 1024
#: Swarm's own monitor window after each task of a rolling update.
UPDATE_MONITOR_S = 2
#: Between engine events: list again this often, and this often while a task is not running.
POLL_S = 10.0
SETTLE_S = 1.0
#: Events closer than this become one relist.
COALESCE_S = 0.2
_NS = 1_000_000_000
_RUNNING_STATES = {"running"}
_STARTING = {"new", "allocated", "pending", "assigned", "accepted", "preparing", "ready", "starting"}
_ENDED = {"complete", "shutdown", "failed", "rejected", "orphaned", "remove"}
#: Keys the engine adds to a service spec on its own (left out of the drift digest).
_ENGINE_DEFAULTS = {"Isolation", "ForceUpdate", "Runtime", "MaxFailureRatio", "Window", "MaxAttempts"}
_IMAGE_MISSING = ("no such image", "manifest unknown", "not found", "does not exist")
_IMAGE_PULL = ("pull access denied", "failed to resolve", "connection refused", "i/o timeout",
               "no basic auth", "unauthorized", "toomanyrequests", "tls:", "dial tcp", "error pulling")


def _normalised(value: Any) -> Any:
    """A spec with empty values and the engine's own defaults left out (for the drift digest)."""
    if isinstance(value, dict):
        out = {k: _normalised(v) for k, v in value.items() if k not in _ENGINE_DEFAULTS}
        return {k: v for k, v in out.items() if v not in (None, "", 0, False, [], {})}
    if isinstance(value, list):
        return [_normalised(v) for v in value]
    return value


def spec_digest(spec: dict[str, Any]) -> str:
    """Digest of a service spec as the engine stores it, without replicas and our own digest label."""
    body = {k: v for k, v in spec.items() if k != "Mode"}
    body["Labels"] = {k: v for k, v in (spec.get("Labels") or {}).items() if k != LABEL_APPLIED}
    text = json.dumps(_normalised(body), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def image_error(message: str) -> str | None:
    """``image_not_found`` / ``image_pull_failed`` when a task error is about its image."""
    low = message.lower()
    if any(m in low for m in _IMAGE_PULL):
        return "image_pull_failed"
    if any(m in low for m in _IMAGE_MISSING):
        return "image_not_found"
    return None


class Registry:
    """The registry repo-app images are pushed to (config ``registry: {url, username, password}``).

    Talks the registry HTTP API (v2) for digests, prunes and deletes; ``host`` is
    what image references start with.
    """

    MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"

    def __init__(self, url: str, username: str = "", password: str = "") -> None:
        scheme, sep, rest = url.partition("://")
        self.host = (rest if sep else url).rstrip("/")
        self._schemes = [scheme] if sep else ["https", "http"]
        self.username, self.password = username, password
        self._session = requests.Session()
        if username:
            self._session.auth = (username, password)

    @property
    def auth_config(self) -> dict[str, str] | None:
        return {"username": self.username, "password": self.password} if self.username else None

    def _request(self, method: str, path: str, **kw: Any) -> requests.Response:
        last: Exception | None = None
        for scheme in list(self._schemes):
            try:
                response = self._session.request(method, f"{scheme}://{self.host}/v2/{path}", timeout=CALL_TIMEOUT_S,
                                                  **kw)
            except requests.RequestException as exc:
                last = exc
                continue
            self._schemes = [scheme]  # the one that answered
            return response
        raise EngineUnavailable(f"registry {self.host} unreachable ({type(last).__name__})")

    def digest(self, repository: str, tag: str) -> str | None:
        """The manifest digest of ``repository:tag``, or None when the registry has no such tag."""
        response = self._request("HEAD", f"{repository}/manifests/{tag}", headers={"Accept": self.MANIFEST})
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise RuntimeFailure(f"registry {self.host}: HEAD {repository}:{tag} answered {response.status_code}")
        return response.headers.get("Docker-Content-Digest")

    def delete(self, repository: str, tag: str) -> bool:
        digest = self.digest(repository, tag)
        if digest is None:
            return False
        response = self._request("DELETE", f"{repository}/manifests/{digest}")
        if response.status_code not in (202, 404):
            raise RuntimeFailure(f"registry {self.host}: DELETE {repository}@{digest} answered "
                                 f"{response.status_code} (is storage.delete.enabled set?)")
        return True

    def tags(self, repository: str) -> list[str]:
        response = self._request("GET", f"{repository}/tags/list")
        if response.status_code == 404:
            return []
        tags: list[str] = (response.json() or {}).get("tags") or []
        return tags


def split_reference(image: str) -> tuple[str, str]:
    """``repo:tag`` into (repo, tag); ``latest`` when no tag is named."""
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        repo, _, tag = image.rpartition(":")
        return repo, tag
    return image, "latest"


class Stale:
    """What the manager's events say must be read again (pure: fed raw events, read by ``reread``).

    Docker 20.10's events name objects, not their state, and have no task events: a service's
    ``create``/``update``/``remove`` (its spec: ``specs``); a task container's ``start``/``die``/
    ``destroy`` on the manager itself, the only node whose events the manager gives (that
    service's tasks: ``tasks``); a node's ``update`` (down, ready: every task, ``everything``).
    A task that dies on another node says nothing: the poll (``everything``) finds it."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.specs: set[str] = set()
        self.tasks: set[str] = set()
        self.everything = False
        #: A node changed: hostnames are read again.
        self.nodes = False

    def note(self, raw: dict[str, Any]) -> bool:
        """Take one raw event in; False when it is none of ours (nothing to read for it)."""
        kind = raw.get("Type")
        actor = raw.get("Actor") or {}
        attrs = actor.get("Attributes") or {}
        if kind == "node":
            self.nodes = self.everything = True
        elif kind == "service" and str(attrs.get("name", "")).startswith(f"{self.owner}_") and actor.get("ID"):
            self.specs.add(str(actor["ID"]))
        elif kind == "container" and attrs.get(runtime.LABEL_OWNER) == self.owner \
                and attrs.get("com.docker.swarm.service.id"):
            self.tasks.add(str(attrs["com.docker.swarm.service.id"]))
        else:
            return False
        return True


def service_key(svc: dict[str, Any]) -> tuple[str, str, str]:
    """The (org, app, service) a swarm service runs, from its labels: its units' scope."""
    labels = svc["Spec"].get("Labels") or {}
    return (labels.get(runtime.LABEL_ORG, ""), labels.get(runtime.LABEL_APP, ""),
            labels.get(runtime.LABEL_SERVICE, specs.MAIN_SERVICE))


#: Task states a task reaches on its own (not stopped by an update or a scale-down): what the
#: health gate judges of a task Swarm has already replaced (``SwarmRuntime.ended``).
_ENDED_ITSELF = {"failed", "complete"}
#: Ended tasks of one service kept for the health gate since this daemon last changed it (the newest).
ENDED_KEPT = 64
#: Swarm's ``Err`` of a task it stopped because its healthcheck failed.
_UNHEALTHY_ERR = "unhealthy container"


def never_restarted(svc: dict[str, Any]) -> bool:
    """A service whose tasks run once (restart condition ``none``: a ``oneshot``)."""
    policy = (svc["Spec"].get("TaskTemplate") or {}).get("RestartPolicy") or {}
    return policy.get("Condition") == "none"


def current_tasks(services: dict[str, dict[str, Any]],
                  tasks: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """Each slot's current task, by (service id, slot): the newest one meant to run; for a service
    whose tasks run once, the newest one at all when none is (it ran to its end, and it stays the
    slot's unit: a completed oneshot is not missing)."""
    current: dict[tuple[str, int], dict[str, Any]] = {}
    done: dict[tuple[str, int], dict[str, Any]] = {}
    for task in tasks:
        service_id = task.get("ServiceID", "")
        if service_id not in services:
            continue
        pool = current if task.get("DesiredState") in ("running", "ready") else done
        if pool is done and not never_restarted(services[service_id]):
            continue
        key = (service_id, int(task.get("Slot") or 0))
        held = pool.get(key)
        if held is None or task["Version"]["Index"] > held["Version"]["Index"]:
            pool[key] = task
    for key, task in done.items():
        current.setdefault(key, task)
    return current


def task_health(task: dict[str, Any]) -> str:
    """What a task's healthcheck said, in the words of ``Unit.health``: Swarm holds a task in
    ``starting`` until it is healthy, and stops it (``failed``, "unhealthy container") when not."""
    check = ((task.get("Spec") or {}).get("ContainerSpec") or {}).get("Healthcheck") or {}
    if not check.get("Test") or check["Test"][0] == "NONE":
        return ""
    status = task.get("Status") or {}
    state = status.get("State", "")
    if state == "running":
        return "healthy"
    if state == "starting":
        return "starting"
    if _UNHEALTHY_ERR in str(status.get("Err") or ""):
        return "unhealthy"
    return ""


class _Events:
    """The manager's events as ``STALE`` parts for the view to read again (``Stale``), and a poll
    of the tasks alone in between (a task dies on a worker without an event)."""

    def __init__(self, rt: SwarmRuntime) -> None:
        self._rt = rt
        # Its own connection: the stream holds one, and the reads it asks for are not the passes' calls.
        self._client = docker.DockerClient(base_url=rt.base_url, version=_docker.API_VERSION, timeout=CALL_TIMEOUT_S)
        self._stream: Any = None
        self._closed = threading.Event()
        self._queue: queue.Queue[dict[str, Any] | Exception] = queue.Queue()
        self._reader: threading.Thread | None = None

    def _read(self) -> None:
        try:
            for raw in self._stream:
                self._queue.put(raw)
            self._queue.put(EngineUnavailable("event stream ended"))
        except Exception as exc:
            self._queue.put(EngineUnavailable(f"event stream broke ({type(exc).__name__})"))

    def _next(self, timeout: float) -> dict[str, Any] | None:
        try:
            item = self._queue.get(timeout=max(timeout, 0))
        except queue.Empty:
            return None
        if isinstance(item, Exception):
            raise item
        return item

    def __iter__(self) -> Iterator[runtime.Event]:
        try:
            self._stream = converted(lambda: self._client.api.events(
                filters={"type": ["service", "node", "container"],
                         "event": ["create", "update", "remove", "start", "die", "destroy"]}, decode=True), "events")
        except RuntimeFailure:
            self.close()
            raise
        if self._closed.is_set():
            return
        self._reader = threading.Thread(target=self._read, name="swarm-events", daemon=True)
        self._reader.start()
        # Subscribed first, then relisted: nothing between the two is missed.
        yield runtime.Event(runtime.RELIST)
        poll_at = time.monotonic() + self._rt.poll_s
        while not self._closed.is_set():
            stale = Stale(self._rt.owner)
            raw = self._next(poll_at - time.monotonic())
            if self._closed.is_set():
                return
            if raw is None:
                stale.everything = True  # the poll
            elif not stale.note(raw):
                continue
            else:
                deadline = time.monotonic() + COALESCE_S
                while (left := deadline - time.monotonic()) > 0:
                    more = self._next(left)
                    if more is not None:
                        stale.note(more)
            if stale.nodes:
                self._rt.forget_nodes()
            yield runtime.Event(runtime.STALE, read=functools.partial(self._rt.reread, self._client.api, stale))
            # The view has read it by now: poll soon while some task is not running yet.
            soon = time.monotonic() + self._rt.poll_s
            poll_at = soon if stale.everything else min(poll_at, soon)

    def close(self) -> None:
        self._closed.set()
        self._queue.put(EngineUnavailable("closed"))
        with contextlib.suppress(Exception):
            if self._stream is not None:
                self._stream.close()
        with contextlib.suppress(Exception):
            self._client.close()


#: How far before the newest line a service gave its stream is opened again, at most.
REOPEN_LOOKBACK_S = 10.0


def reopen_since(lasts: list[str], start: float) -> float:
    """When to open a service's log stream again from: a little before the oldest of its
    tasks' last lines given (``lasts``, timestamps), so that no task loses the lines it wrote
    after its own last one (the newest of all lost them for a task less chatty than the
    others); each task's ``_docker.Given`` drops what it gave already. A task whose last line is more
    than ``REOPEN_LOOKBACK_S`` older than the newest (quiet, or gone) is not waited for: its
    stream's lines that late were never on their way. ``start`` when nothing was given."""
    seconds = [_docker.stamp_seconds(last) for last in lasts if last]
    if not seconds:
        return start
    return max(min(seconds), max(seconds) - REOPEN_LOOKBACK_S) - 0.001


class _ServiceLogs(follow.Follower):
    """An app's live log lines: one reader per service (``follow.Follower``), attached again
    when a service is replaced. Each line names its node and task; each task's lines are
    given once (``_docker.Given``, which asks the engine about a possible repeat as the local
    driver's follower does) when a service's stream is opened again or its task's log rotates."""

    #: Lines read past those given when ``_docker.Given`` asks how many a task's log holds with a timestamp.
    VERIFY_TAIL = 2000

    def __init__(self, rt: SwarmRuntime, org: str, app: str, since: float, ended: threading.Event | None) -> None:
        super().__init__(app, since, ended, docker.DockerClient(base_url=rt.base_url, timeout=None))
        self._rt, self._org = rt, org
        #: Per service and task (the details of its lines' heads): what it gave.
        self._given: dict[tuple[str, str], _docker.Given] = {}

    def _streams(self) -> Iterator[follow.Stream]:
        for svc in self._rt.app_services(self._org, self._app):
            service_id: str = svc["ID"]
            if service_id in self._readers:
                continue
            name = (svc["Spec"].get("Labels") or {}).get(runtime.LABEL_SERVICE, specs.MAIN_SERVICE)
            since = reopen_since([g.last for key, g in self._given.items() if key[0] == name], self._start)
            yield (service_id, functools.partial(self._open, service_id, since),
                   functools.partial(self._lines_of, name, service_id))

    def _open(self, service_id: str, since: float) -> Any:
        return converted(lambda: _docker.service_logs(self._client.api, service_id, follow=True, since=since),
                         "service logs")

    def _lines_of(self, name: str, service_id: str, stream: Any) -> Iterator[runtime.LogLine]:
        for key, given in self._given.items():
            if key[0] == name:
                given.reopened()

        def line_of(raw: _docker.RawLine) -> tuple[runtime.LogLine, _docker.Given]:
            task = _docker.source_of(raw[0])
            given = self._given.get((name, task))
            if given is None:
                given = self._given[(name, task)] = _docker.Given(
                    functools.partial(self._logged_at, service_id, task))
            return self._rt.log_line(name, raw), given

        return _docker.followed(stream, details=True, line_of=line_of)


    def _logged_at(self, service_id: str, task: str, key: str, given: int) -> int | None:
        """How many lines a task's log holds stamped ``key`` (``_docker.logged_at``), read from the
        service's log (the engine's tail is each task's), its other tasks' lines left out."""
        def stamp(head: str) -> str | None:
            return _docker.stamp_key(head.partition(" ")[0]) if _docker.source_of(head) == task else None

        return _docker.logged_at(functools.partial(_docker.service_logs, self._client.api, service_id), key, given,
                                 tail=self.VERIFY_TAIL, stamp=stamp, details=True)


class SwarmRuntime(_docker.Driver):
    """Drives a Docker Swarm through one manager, for one owner and one instance."""

    _log = log

    def __init__(self, *, owner: str = "cynchrod", instance: str = "", stop_timeout: int = 10,
                 base_url: str | None = None, registry: Registry | None = None,
                 secret_value: Callable[[str, str], bytes] | None = None,
                 apply_wait_s: float = APPLY_WAIT_S) -> None:
        self.owner = owner
        self.instance = instance
        self.stop_timeout = stop_timeout
        #: The manager (``DOCKER_HOST`` when not given); event and log streams open their own clients.
        self.base_url = base_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        # The API version is pinned (every engine since 20.10 speaks it): making a client asks nothing.
        self._client = docker.DockerClient(base_url=self.base_url, version=_docker.API_VERSION,
                                           timeout=CALL_TIMEOUT_S + stop_timeout)
        self.api = self._client.api
        self.registry = registry
        #: Reads a secret's value by (org, name): nothing is staged on a disk.
        self.secret_value = secret_value
        self.apply_wait_s = apply_wait_s
        self.calls = 0
        #: Reads the event stream asked for (its own connection): not the passes' ``calls``.
        self.watch_calls = 0
        #: Our services by id, as last read: a read of tasks alone makes units with them.
        self._services: dict[str, dict[str, Any]] = {}
        #: Per service id, the read (a number taken when it began) that last wrote its entry,
        #: removal included: a read that began earlier never writes over it.
        self._read_by: dict[str, int] = {}
        self._reads = 0
        #: The services with a task not running, or not as many as wanted: the stream polls soon.
        self._unsettled: set[str] = set()
        self._nodes: dict[str, str] = {}
        self._lock = threading.Lock()
        self._logged_in = False
        #: Per service (id, version): whether its spec still is what we applied.
        self._drift: dict[tuple[str, int], bool] = {}
        #: Task id -> replica, for log lines.
        self._slots: dict[str, int] = {}
        #: Per service id this daemon changed: the raft index the service had just before (its
        #: tasks updated after it are that deployment's), and those of them that ended on their own
        #: as the last read found them (``ended``: the health gate's facts).
        self._deployed: dict[str, int] = {}
        self._ended: dict[str, tuple[runtime.Unit, ...]] = {}

    def close(self) -> None:
        self._client.close()

    # -- names and labels -------------------------------------------------

    def service_name(self, org: str, app: str, service: str) -> str:
        name = f"{self.owner}_{org}_{app}_{service}"
        if len(name) <= 63:
            return name
        digest = hashlib.sha256(name.encode()).hexdigest()[:10]
        return f"{name[:52]}_{digest}"

    def network_name(self, org: str, app: str) -> str:
        name = f"{self.owner}_{org}_{app}"
        return name if len(name) <= 63 else f"{name[:52]}_{hashlib.sha256(name.encode()).hexdigest()[:10]}"

    # -- observing ----------------------------------------------------------

    def forget_nodes(self) -> None:
        with self._lock:
            self._nodes = {}

    @property
    def poll_s(self) -> float:
        """How long the event stream waits before it reads the tasks again: soon while some task
        is not running (a worker's tasks change without an event)."""
        return SETTLE_S if self._unsettled else POLL_S

    def _node(self, node_id: str, api: Any = None) -> str:
        with self._lock:
            known = self._nodes.get(node_id)
        if known is not None or not node_id:
            return known or ""
        nodes = (self._call(lambda: self.api.nodes(), "list nodes") if api is None
                 else self._watch_call(lambda: api.nodes(), "list nodes"))
        with self._lock:
            self._nodes = {n["ID"]: (n.get("Description") or {}).get("Hostname", n["ID"][:12]) for n in nodes}
            return self._nodes.get(node_id, node_id[:12])

    def _watch_call(self, call: Callable[[], T], what: str) -> T:
        self.watch_calls += 1
        return converted(call, what)

    def list_units(self) -> list[runtime.Unit]:
        """Every unit of this owner and instance: one services list and one tasks list (a relist)."""
        began = self._began()
        owner = {"label": runtime.owner_labels(self.owner)}
        services = self._call(lambda: self.api.services(filters=owner), "list services")
        tasks = self._call(lambda: self.api.tasks(filters=owner), "list tasks")
        return list(self._listed(began, tasks, None, services=services).units)

    def reread(self, api: Any, stale: Stale) -> runtime.Listing:
        """What ``stale`` names, read again through ``api`` (the event stream's connection): every
        task (one tasks list, with the services as last read), or the named services' specs (one
        services list) and tasks (one tasks list)."""
        began = self._began()
        owner = {"label": runtime.owner_labels(self.owner)}
        if stale.everything:
            # A service created or changed in the same window (its create and a node's update
            # coalesce when its first task is placed) is read too: its tasks are not ours without it.
            services = (self._watch_call(lambda: api.services(filters=owner), "list services")
                        if stale.specs else None)
            tasks = self._watch_call(lambda: api.tasks(filters=owner), "list tasks")
            return self._listed(began, tasks, None, services=services, api=api)
        named = stale.specs | stale.tasks
        services = None
        if stale.specs:
            services = self._watch_call(lambda: api.services(filters={"id": sorted(stale.specs)}), "list services")
        with self._lock:  # the services whose spec was read are there when the read found them
            there = {*((stale.tasks - stale.specs) & self._services.keys()),
                     *(s["ID"] for s in services or () if s["ID"] in named)}
        tasks = []
        if there:
            try:
                tasks = self._watch_call(lambda: api.tasks(filters={"service": sorted(there)}), "list tasks")
            except UnitGone:  # one was removed meanwhile (its event follows): read them all
                tasks = self._watch_call(lambda: api.tasks(filters=owner), "list tasks")
        return self._listed(began, tasks, named, services=services, asked=stale.specs, api=api)

    def _began(self) -> int:
        with self._lock:
            self._reads += 1
            return self._reads

    def _listed(self, began: int, tasks: list[dict[str, Any]], named: set[str] | None, *,
                services: list[dict[str, Any]] | None = None, asked: set[str] | None = None,
                api: Any = None) -> runtime.Listing:
        """The units a read found (it began as read number ``began``): of every service (``named``
        None) or of the ``named`` ones. ``services``: the specs it read, of the ids ``asked`` (None:
        all of ours); without them, the specs as last read serve."""
        with self._lock:
            before = dict(self._services)
            if services is not None:
                fresh = {s["ID"]: s for s in services
                         if runtime.mine(s["Spec"].get("Labels") or {}, owner=self.owner, instance=self.instance)}
                for sid in before.keys() | fresh.keys() if asked is None else asked:
                    if self._read_by.get(sid, 0) > began:
                        continue  # a read that began later wrote it
                    self._read_by[sid] = began
                    if sid in fresh:
                        self._services[sid] = fresh[sid]
                    else:
                        self._services.pop(sid, None)
                if asked is None:  # older marks protect nothing now
                    self._read_by = {sid: n for sid, n in self._read_by.items() if n >= began}
            if named is None:
                covered, scope = dict(self._services), None
            else:
                covered = {sid: svc for sid, svc in self._services.items() if sid in named}
                scope = runtime.Scope(service_key(before.get(sid) or self._services[sid])
                                      for sid in named if sid in before or sid in self._services)
        units, unsettled = self._units(covered, tasks, api)
        with self._lock:
            self._unsettled = unsettled if named is None else (self._unsettled - named) | unsettled
        return runtime.Listing(tuple(units), scope)

    def _units(self, mine: dict[str, dict[str, Any]], tasks: list[dict[str, Any]],
               api: Any = None) -> tuple[list[runtime.Unit], set[str]]:
        """The units of the services ``mine`` (each slot's current task), and the ids of those
        not settled (a task not running, or not as many tasks as replicas wanted)."""
        by_slot = current_tasks(mine, tasks)
        self._note_ended(mine, tasks, api)
        units = []
        unsettled: set[str] = set()
        counts: dict[str, int] = {}
        for (service_id, slot), task in by_slot.items():
            unit = self._unit(mine[service_id], task, slot, api)
            units.append(unit)
            counts[service_id] = counts.get(service_id, 0) + 1
            if unit.state != planning.RUNNING and not (unit.stopped and never_restarted(mine[service_id])):
                unsettled.add(service_id)
        for service_id, svc in mine.items():
            want = ((svc["Spec"].get("Mode") or {}).get("Replicated") or {}).get("Replicas", 0)
            if counts.get(service_id, 0) != want:
                unsettled.add(service_id)
        return units, unsettled

    def _unit(self, svc: dict[str, Any], task: dict[str, Any], slot: int, api: Any = None) -> runtime.Unit:
        labels = dict((task.get("Spec", {}).get("ContainerSpec") or {}).get("Labels") or {})
        status = task.get("Status") or {}
        state_name = status.get("State", "")
        exit_code = None
        if state_name in _RUNNING_STATES:
            state = planning.RUNNING
        elif state_name in _STARTING:
            # A task the scheduler cannot place: acted on (and reported) like an interrupted create.
            state = planning.CREATED if status.get("Err") and state_name == "pending" else planning.RESTARTING
        else:
            state = planning.EXITED
            exit_code = (status.get("ContainerStatus") or {}).get("ExitCode")
        if self._drifted(svc):
            labels[runtime.LABEL_HASH] = "drift"  # changed by hand: recreated (the service put back)
        ports = [p.get("PublishedPort") for p in (status.get("PortStatus") or {}).get("Ports") or []
                 if p.get("PublishedPort")]
        node = self._node(task.get("NodeID", ""), api)
        unit = runtime.unit_from_labels(labels, instance=task["ID"], state=state, exit_code=exit_code,
                                        endpoint=ports[0] if ports else None, node=node)
        return dataclasses.replace(unit, replica=max(slot - 1, 0), health=task_health(task))

    def _drifted(self, svc: dict[str, Any]) -> bool:
        """The service's spec is no longer the one we applied (computed once per service version)."""
        key = (svc["ID"], int(svc["Version"]["Index"]))
        with self._lock:
            known = self._drift.get(key)
        if known is None:
            spec = svc["Spec"]
            known = spec_digest(spec) != (spec.get("Labels") or {}).get(LABEL_APPLIED)
            with self._lock:
                if len(self._drift) > 100_000:
                    self._drift.clear()
                self._drift[key] = known
        return known

    def app_services(self, org: str, app: str) -> list[dict[str, Any]]:
        services: list[dict[str, Any]] = self._call(
            lambda: self.api.services(filters=self._app_filter(org, app)), "list services")
        return [s for s in services
                if runtime.mine(s["Spec"].get("Labels") or {}, owner=self.owner, instance=self.instance)]

    def _service_units(self, svc: dict[str, Any]) -> tuple[list[runtime.Unit], list[dict[str, Any]]]:
        """The current units of one service, and its current tasks (one tasks list)."""
        tasks = self._call(lambda: self.api.tasks(filters={"service": svc["ID"]}), "list tasks")
        self._note_ended({svc["ID"]: svc}, tasks)
        current = {slot: task for (_, slot), task in current_tasks({svc["ID"]: svc}, tasks).items()}
        return ([self._unit(svc, t, slot) for slot, t in sorted(current.items())],
                [current[s] for s in sorted(current)])

    def watch(self) -> _Events:
        self.watch_calls += 1  # the subscription
        return _Events(self)

    # -- acting -------------------------------------------------------------

    def apply(self, action: planning.Action) -> list[runtime.Unit]:
        """Carry out one action by converging its whole service (see the module doc)."""
        unit = action.unit
        service = action.service_spec
        if action.kind == planning.REMOVE:
            assert unit is not None
            if action.spec is None or service is None:
                self._remove_service(self.service_name(action.org, action.app, action.service))
                return []
            units = self._converge(action.spec, service)
            return [u for u in units if u.instance != unit.instance]
        assert action.spec is not None and service is not None
        if action.kind == planning.START:
            assert unit is not None
            return self._converge(action.spec, service, restart=unit.instance)
        return self._converge(action.spec, service)

    def _find(self, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self._call(lambda: self.api.inspect_service(name), f"inspect service {name}")
        except UnitGone:
            return None
        if found["Spec"].get("Name") != name:
            return None  # matched by an id prefix, not by name
        labels = found["Spec"].get("Labels") or {}
        if runtime.mine(labels, owner=self.owner, instance=self.instance):
            return found
        if labels.get(runtime.LABEL_OWNER) == self.owner:
            raise PermanentError(f"a service named {name} belongs to another cynchrod instance with owner "
                                 f"{self.owner!r}; it is left alone. Give each daemon its own --owner",
                                 code="owner_conflict")
        raise PermanentError(f"a service named {name} exists without cynchrod's labels; it is left alone",
                             code="name_conflict")

    def _converge(self, spec: specs.AppSpec, service: specs.ServiceSpec, *, restart: str = "") -> list[runtime.Unit]:
        name = self.service_name(spec.org, spec.name, service.name)
        replicas = 0 if spec.state == "stopped" else service.replicas
        existing = self._find(name)
        image = self._image(service)
        body = self._body(spec, service, image, name)
        digest = spec_digest(body)
        body["Labels"][LABEL_APPLIED] = digest
        mode = ServiceMode("replicated", replicas=replicas)
        created = False
        if existing is None:
            made = self._call(lambda: self.api.create_service(
                body["TaskTemplate"], name=name, labels=body["Labels"], mode=mode, update_config=body["UpdateConfig"],
                endpoint_spec=body["EndpointSpec"]), f"create service {name}")
            created = True
            self._deploying(str(made["ID"]), 0)
        else:
            current = existing["Spec"]
            now_replicas = ((current.get("Mode") or {}).get("Replicated") or {}).get("Replicas")
            in_sync = (spec_digest(current) == digest and (current.get("Labels") or {}).get(LABEL_APPLIED) == digest
                       and now_replicas == replicas)
            force = 0
            if in_sync and restart and replicas:
                # A start: force a new task only when the unit's task is still the slot's current one.
                units, _ = self._service_units(existing)
                if any(u.instance == restart and u.state != planning.RUNNING for u in units):
                    force = int(current["TaskTemplate"].get("ForceUpdate") or 0) + 1
            if not in_sync or force:
                if force:
                    body["TaskTemplate"]["ForceUpdate"] = force
                self._deploying(existing["ID"], int(existing["Version"]["Index"]))
                self._update(name, existing, body, mode)
        if replicas == 0:
            return []
        units = self._monitor(name, spec, service, replicas, created=created)
        self._prune_secrets(spec, service, body)
        self._prune_configs(spec, service, body)
        return units

    def _update(self, name: str, existing: dict[str, Any], body: dict[str, Any], mode: ServiceMode) -> None:
        for attempt in range(4):
            try:
                self._call(lambda e=existing: self.api.update_service(  # type: ignore[misc]
                    e["ID"], e["Version"]["Index"], task_template=body["TaskTemplate"], name=name,
                    labels=body["Labels"], mode=mode, update_config=body["UpdateConfig"],
                    endpoint_spec=body["EndpointSpec"]), f"update service {name}")
                return
            except RuntimeFailure as exc:
                if "out of sequence" not in exc.message or attempt == 3:
                    raise
                found = self._find(name)
                if found is None:
                    raise UnitGone(f"service {name} was removed during its update") from exc
                existing = found

    def _body(self, spec: specs.AppSpec, service: specs.ServiceSpec, image: str, name: str) -> dict[str, Any]:
        """The service spec we want, in the engine's own form (what the drift digest reads)."""
        labels = runtime.unit_labels(self.owner, self.instance, spec, service, 0)
        labels.pop(runtime.LABEL_REPLICA)
        networks = []
        if spec.multi:
            networks.append(NetworkAttachmentConfig(self._ensure_network(spec),
                                                    aliases=[service.name, *service.aliases]))
        health = None
        if service.healthcheck is not None:
            h = service.healthcheck
            health = Healthcheck(test=list(h.test), interval=int(h.interval * _NS), timeout=int(h.timeout * _NS),
                                 retries=h.retries, start_period=int(h.start_period * _NS))
        # The copies are on this host only: each bound file is a Docker config, on every node.
        configs = self._ensure_configs(spec, service) if service.binds else None
        mounts = [Mount(v.path, self._volume_name(spec, v.name), type="volume", read_only=v.read_only,
                        labels=self._app_labels(spec.org, spec.name)) if v.name
                  else Mount(v.path, None, type="volume") for v in service.volumes]
        mounts.extend(_tmpfs_mount(entry) for entry in service.tmpfs)
        # Compose's keys (None when unset: left out of the body, so the drift digest of a spec
        # without them is unchanged). Swarm's ``command`` is the entrypoint and ``args`` the command.
        entry = list(service.entrypoint) if service.entrypoint is not None else None
        command = list(service.command) if service.command else None
        grace = self.stop_timeout if service.stop_grace_period is None else service.stop_grace_period
        container = ContainerSpec(
            image, command=entry if entry is not None else command, args=command if entry is not None else None,
            env=[f"{k}={v}" for k, v in service.env], labels={**dict(service.labels), **labels} if service.labels
            else labels, mounts=mounts or None, stop_grace_period=int(grace * _NS),
            secrets=self._ensure_secrets(spec, service) or None, healthcheck=health,
            init=True if service.init is None else service.init, hostname=service.hostname, user=service.user,
            workdir=service.working_dir, stop_signal=service.stop_signal, read_only=service.read_only or None,
            tty=service.tty or None, open_stdin=service.stdin_open or None, configs=configs)
        cpu, memory = int(service.cpu * _NS), service.memory * 1024 * 1024
        cpu_reserved = cpu if service.cpu_reservation is None else int(service.cpu_reservation * _NS)
        mem_reserved = memory if service.memory_reservation is None else service.memory_reservation * 1024 * 1024
        template = TaskTemplate(
            container, resources=Resources(cpu_limit=cpu, mem_limit=memory, cpu_reservation=cpu_reserved,
                                           mem_reservation=mem_reserved),
            restart_policy=_restart_policy(service), networks=networks or None,
            log_driver=DriverConfig(_docker.LOG_CONFIG["type"], _docker.LOG_CONFIG["config"]))
        ports: list[dict[str, Any]] = []
        if service.port:
            port: dict[str, Any] = {"Protocol": "tcp", "TargetPort": service.port, "PublishMode": "host"}
            if service.host_port:
                port["PublishedPort"] = service.host_port
            ports.append(port)
        for extra in service.ports:
            more: dict[str, Any] = {"Protocol": extra.protocol, "TargetPort": extra.target, "PublishMode": "host"}
            if extra.published:
                more["PublishedPort"] = extra.published
            ports.append(more)
        update = _update_config(spec, service)
        body = {"Name": name, "Labels": dict(labels), "TaskTemplate": template, "UpdateConfig": update,
                "EndpointSpec": EndpointSpec(mode="dnsrr", ports=ports or None)}
        # Round-tripped through JSON: the docker.types values are dicts, compared as the engine returns them.
        plain: dict[str, Any] = json.loads(json.dumps(body))
        return plain

    def _volume_name(self, spec: specs.AppSpec, volume: str) -> str:
        return f"{self.owner}_{spec.org}_{spec.name}_{volume}"

    def _ensure_network(self, spec: specs.AppSpec) -> str:
        """The app's attachable overlay network (made with our labels when missing); its id."""
        name = self.network_name(spec.org, spec.name)
        found = self._call(lambda: self.api.networks(names=[name]), f"list network {name}")
        for net in found:
            if net.get("Name") == name:
                if (net.get("Labels") or {}).get(runtime.LABEL_OWNER) != self.owner:
                    raise PermanentError(f"network {name} exists without cynchrod's labels", code="name_conflict")
                return str(net["Id"])
        made = self._call(lambda: self.api.create_network(
            name, driver="overlay", attachable=True, check_duplicate=True,
            labels=self._app_labels(spec.org, spec.name)), f"create network {name}")
        return str(made["Id"])

    # -- repository files as configs ------------------------------------------------

    def _ensure_configs(self, spec: specs.AppSpec, service: specs.ServiceSpec) -> list[ConfigReference]:
        """Each file of the service's bind mounts (a file, or each file of a folder) as a Docker
        config named by its content (immutable; a new content is a new config), mounted read-only
        at its target."""
        wanted: list[tuple[str, bytes]] = []
        for bind in service.binds:
            source = pathlib.Path(bind.source)
            try:
                if source.is_dir():
                    wanted.extend((f"{bind.target.rstrip('/')}/{p.relative_to(source).as_posix()}", p.read_bytes())
                                  for p in sorted(source.rglob("*")) if p.is_file())
                else:
                    wanted.append((bind.target, source.read_bytes()))
            except OSError as exc:
                raise TemporaryError(f"{spec.org}/{spec.name} [{service.name}]: {bind.source}: {exc.strerror}",
                                     code=Code.RUNTIME_ERROR) from exc
        if len(wanted) > MAX_CONFIG_FILES:
            raise PermanentError(f"{spec.org}/{spec.name} [{service.name}]: {len(wanted)} bound files, over the "
                                 f"{MAX_CONFIG_FILES} a service may have on swarm", code=Code.OUT_OF_RANGE)
        have = {c["Spec"]["Name"]: c["ID"] for c in self._call(
            lambda: self.api.configs(filters=self._app_filter(spec.org, spec.name)), "list configs")}
        refs = []
        for target, data in wanted:
            if not 0 < len(data) <= MAX_CONFIG_BYTES:
                raise PermanentError(f"{spec.org}/{spec.name} [{service.name}]: {target}: {len(data)} bytes; a "
                                     f"config on swarm holds 1 to {MAX_CONFIG_BYTES}", code=Code.OUT_OF_RANGE)
            digest = hashlib.sha256(f"{spec.org}/{spec.name}/{service.name}/{target}\0".encode() + data).hexdigest()
            name = f"{self.owner}_{digest[:24]}"[:64]
            config_id = have.get(name)
            if config_id is None:
                labels = {**self._app_labels(spec.org, spec.name), runtime.LABEL_SERVICE: service.name}
                try:
                    config_id = self._call(lambda n=name, d=data, lb=labels: self.api.create_config(  # type: ignore[misc]
                        n, d, labels=lb), "create config")["ID"]
                except _docker.Conflict:
                    found = self._call(lambda n=name: self.api.configs(filters={"name": n}),  # type: ignore[misc]
                                       "list configs")
                    config_id = next(c["ID"] for c in found if c["Spec"]["Name"] == name)
            refs.append(ConfigReference(config_id, name, filename=target, uid="0", gid="0", mode=0o444))
        return refs

    def _prune_configs(self, spec: specs.AppSpec, service: specs.ServiceSpec, body: dict[str, Any]) -> None:
        """This service's configs no task uses any more (in use: left for a later apply)."""
        used = {c["ConfigName"] for c in body["TaskTemplate"]["ContainerSpec"].get("Configs") or []}
        filters = {"label": [*runtime.app_labels(self.owner, spec.org, spec.name),
                             f"{runtime.LABEL_SERVICE}={service.name}"]}
        try:
            for config in self._call(lambda: self.api.configs(filters=filters), "list configs"):
                if config["Spec"]["Name"] not in used:
                    with contextlib.suppress(RuntimeFailure):
                        self._call(lambda c=config: self.api.remove_config(c["ID"]), "remove config")  # type: ignore[misc]
        except RuntimeFailure as exc:
            log.debug("configs of %s/%s not pruned: %s", spec.org, spec.name, exc)

    # -- secrets --------------------------------------------------------------

    def _secret_name(self, spec: specs.AppSpec, service: specs.ServiceSpec, secret: str) -> str:
        # The service's secret digest is keyed (HMAC): the name says nothing about a value.
        digest = hashlib.sha256(f"{spec.org}/{spec.name}/{service.secret_digest}/{secret}".encode()).hexdigest()
        return f"{self.owner}_{secret}_{digest[:16]}"[:64]

    def _ensure_secrets(self, spec: specs.AppSpec, service: specs.ServiceSpec) -> list[SecretReference]:
        if not service.secrets:
            return []
        inline = dict(spec.secret_values)  # given by the repository (a compose file's file:/environment:)
        if self.secret_value is None and not set(service.secrets) <= set(inline):
            raise PermanentError("this runtime has no secret store", code="secret_missing")
        have = {s["Spec"]["Name"]: s["ID"] for s in self._call(
            lambda: self.api.secrets(filters=self._app_filter(spec.org, spec.name)), "list secrets")}
        refs = []
        for secret in service.secrets:
            name = self._secret_name(spec, service, secret)
            secret_id = have.get(name)
            if secret_id is None:
                value = inline[secret] if secret in inline else self.secret_value(spec.org, secret)  # type: ignore[misc]
                labels = {**self._app_labels(spec.org, spec.name), runtime.LABEL_SERVICE: service.name,
                          LABEL_SECRET: secret}
                try:
                    made = self._call(lambda n=name, v=value, lb=labels: self.api.create_secret(  # type: ignore[misc]
                        n, v, labels=lb), "create secret")
                    secret_id = made["ID"]
                except _docker.Conflict:
                    found = self._call(lambda n=name: self.api.secrets(filters={"name": n}),  # type: ignore[misc]
                                       "list secrets")
                    secret_id = next(s["ID"] for s in found if s["Spec"]["Name"] == name)
            refs.append(SecretReference(secret_id, name, filename=secret))
        return refs

    def _prune_secrets(self, spec: specs.AppSpec, service: specs.ServiceSpec, body: dict[str, Any]) -> None:
        """Old versions of this service's secrets, once no task uses them (in use: left for later)."""
        used = {s["SecretName"] for s in body["TaskTemplate"]["ContainerSpec"].get("Secrets") or []}
        filters = {"label": [*runtime.app_labels(self.owner, spec.org, spec.name),
                             f"{runtime.LABEL_SERVICE}={service.name}"]}
        try:
            for secret in self._call(lambda: self.api.secrets(filters=filters), "list secrets"):
                if secret["Spec"]["Name"] not in used:
                    with contextlib.suppress(RuntimeFailure):
                        self._call(lambda s=secret: self.api.remove_secret(s["ID"]), "remove secret")  # type: ignore[misc]
        except RuntimeFailure as exc:
            log.debug("secrets of %s/%s not pruned: %s", spec.org, spec.name, exc)

    # -- images ---------------------------------------------------------------

    def _login(self) -> None:
        if self._logged_in or self.registry is None or self.registry.auth_config is None:
            return
        reg = self.registry
        self._call(lambda: self._client.login(reg.username, reg.password, registry=reg.host), "registry login")
        self._logged_in = True

    def _registry_ref(self, image: str) -> str:
        assert self.registry is not None
        return f"{self.registry.host}/{image}"

    def _image(self, service: specs.ServiceSpec) -> str:
        """The reference the service runs: by digest when it names a registry (so every node
        runs the same image); missing or unreachable images are errors before anything changes."""
        image = service.image
        if service.build is not None and self.registry is not None:
            repo, tag = split_reference(image)
            digest = self.registry.digest(repo, tag)
            if digest is None:
                raise PermanentError(f"image {image} is not in the registry {self.registry.host}",
                                     code="image_not_found")
            return f"{self._registry_ref(image)}@{digest}"
        if "@" in image:
            return image
        if not has_registry(image):
            try:
                self._call(lambda: self.api.inspect_image(image), f"inspect image {image}")
            except UnitGone:
                raise PermanentError(f"image {image} names no registry and is not on the manager; push it to a "
                                     "registry every node can reach", code="image_not_found") from None
            return image
        self._login()
        try:
            found = self._call(lambda: self.api.inspect_distribution(image), f"inspect distribution {image}")
        except RuntimeFailure as exc:
            code = image_error(exc.message) or "image_pull_failed"
            if isinstance(exc, UnitGone):
                code = "image_not_found"
            raise PermanentError(f"image {image}: {exc.message}", code=code) from exc
        return f"{image}@{found['Descriptor']['digest']}"

    def image_exists(self, image: str) -> bool:
        if self.registry is None:
            try:
                self._call(lambda: self.api.inspect_image(image), f"inspect image {image}")
                return True
            except UnitGone:
                return False
        repo, tag = split_reference(image)
        self.calls += 1
        return self.registry.digest(repo, tag) is not None

    def build_image(self, context: pathlib.Path, *, dockerfile: str, tag: str, args: dict[str, str],
                    org: str, app: str, log: Callable[[str], None], target: str = "") -> None:
        """Built on the manager, then pushed to the registry (when one is set)."""
        ref = self._registry_ref(tag) if self.registry is not None else tag
        self._build(context, dockerfile=dockerfile, tag=ref, args=args, org=org, app=app, log=log, target=target)
        if self.registry is None:
            return
        with _docker.build_errors(log):
            self._login()
            repo, version = split_reference(ref)
            log(f"# push {ref}")
            for chunk in self.api.push(repo, tag=version, stream=True, decode=True,
                                       auth_config=self.registry.auth_config):
                if "error" in chunk:
                    log(str(chunk["error"]).rstrip())
                    raise PermanentError(f"push to {self.registry.host} failed: {chunk['error']}",
                                         code="image_push_failed")
                digest = (chunk.get("aux") or {}).get("Digest")
                if digest:
                    log(f"# pushed {ref}@{digest}")

    def _drop_image(self, image: dict[str, Any]) -> bool:
        """One built image: from the registry (its manifest), then from the manager; False
        while a container on the manager still uses it (removed on a later try)."""
        if self.registry is not None:
            for ref in image.get("RepoTags") or []:
                if ref.startswith(self.registry.host + "/"):
                    repo, tag = split_reference(ref[len(self.registry.host) + 1:])
                    self.calls += 1
                    self.registry.delete(repo, tag)
        try:
            self._call(lambda: self.api.remove_image(image["Id"], force=True), "remove image")
        except UnitGone:
            pass
        except RuntimeFailure:
            return False
        return True

    def prune_images(self, org: str, app: str, *, keep: int) -> list[str]:
        """This app's built images but the newest ``keep``, in the registry and on the manager."""
        images = sorted(self._app_images(org, app), key=lambda i: i.get("Created", 0), reverse=True)
        removed = []
        for image in images[keep:]:
            self._drop_image(image)
            removed.append(str(image["Id"]))
        return removed

    # -- removing ---------------------------------------------------------------

    def _remove_service(self, name: str) -> None:
        found = self._find(name)
        if found is None:
            return
        with contextlib.suppress(UnitGone):
            self._call(lambda: self.api.remove_service(found["ID"]), f"remove service {name}")

    def remove_app(self, org: str, app: str) -> None:
        """Everything of a deleted app: its services (stopped ones have no units), network,
        secrets, and its images in the registry. Named volumes stay (they hold data)."""
        for svc in self.app_services(org, app):
            with contextlib.suppress(UnitGone):
                self._call(lambda s=svc: self.api.remove_service(s["ID"]), "remove service")  # type: ignore[misc]
        # Secrets, the network and the manager's copies of images are released once the tasks
        # are gone (a few seconds); the registry's copies go at once.
        deadline = time.monotonic() + 20
        while True:
            busy = self._remove_released(org, app)
            if not busy:
                return
            if time.monotonic() > deadline:
                raise TemporaryError(f"{', '.join(busy)} of {org}/{app} still in use; removed on the next pass",
                                     code="in_use")
            time.sleep(0.5)

    def _remove_released(self, org: str, app: str) -> list[str]:
        busy = [f"image {i['Id'][7:19]}" for i in self._app_images(org, app) if not self._drop_image(i)]
        for config in self._call(lambda: self.api.configs(filters=self._app_filter(org, app)), "list configs"):
            try:
                self._call(lambda c=config: self.api.remove_config(c["ID"]), "remove config")  # type: ignore[misc]
            except UnitGone:
                pass
            except RuntimeFailure:
                busy.append(f"config {config['Spec']['Name']}")
        for secret in self._call(lambda: self.api.secrets(filters=self._app_filter(org, app)), "list secrets"):
            try:
                self._call(lambda s=secret: self.api.remove_secret(s["ID"]), "remove secret")  # type: ignore[misc]
            except UnitGone:
                pass
            except RuntimeFailure:
                busy.append(f"secret {secret['Spec']['Name']}")
        name = self.network_name(org, app)
        for net in self._call(lambda: self.api.networks(names=[name]), "list networks"):
            if net.get("Name") != name:
                continue
            try:
                self._call(lambda n=net: self.api.remove_network(n["Id"]), f"remove network {name}")  # type: ignore[misc]
            except UnitGone:
                pass
            except RuntimeFailure:
                busy.append(f"network {name}")
        return busy

    def recover(self) -> int:
        """Nothing to put right: the swarm finishes or rolls back its own updates."""
        return 0

    def exit_details(self, unit: runtime.Unit) -> tuple[int | None, bool]:
        """What the task said: its exit code (a worker's containers are not inspected from here)."""
        return unit.exit_code, unit.state == planning.OOM_KILLED

    # -- watching one apply --------------------------------------------------------

    def _monitor(self, name: str, spec: specs.AppSpec, service: specs.ServiceSpec, replicas: int, *,
                 created: bool) -> list[runtime.Unit]:
        """Until every replica runs the wanted spec; errors for what the swarm would retry forever."""
        want = spec.service_hash(service)
        deadline = time.monotonic() + self.apply_wait_s
        where = f"service {service.name} of {spec.org}/{spec.name}"
        polls = 0
        while True:
            svc = self._find(name)
            if svc is None:
                raise UnitGone(f"{where} was removed while it was being applied")
            units, tasks = self._service_units(svc)
            # Tasks of this spec that started, or ended on their own since the change: the health
            # gate judges them from here (``ended``), as it judges units on one host.
            started = {u.replica for u in units if u.spec_hash == want
                       and (u.state == planning.RUNNING or u.stopped or u.health == "starting")}
            started |= {u.replica for u in self._ended.get(svc["ID"], ()) if u.spec_hash == want}
            update = (svc.get("UpdateStatus") or {})
            if update.get("State") in ("rollback_started", "rollback_completed", "rollback_paused", "paused"):
                if started or self._ran(svc["ID"], want):
                    # ``failure_action: rollback`` after a task of it failed: the gate says why. The task's
                    # end may not be read yet (Swarm rolls back as it stops it): it ran, so it is judged.
                    return units
                why = update.get("Message") or "update failed"
                raise PermanentError(f"{where}: {why}; the previous version was put back", code="update_failed")
            for task, unit in zip(tasks, units, strict=True):
                err = str((task.get("Status") or {}).get("Err") or "")
                if unit.spec_hash != want or not err:
                    continue
                if unit.state == planning.CREATED:
                    raise TemporaryError(f"{where}: {err}", code="unschedulable")
                code = image_error(err)
                if code is not None and unit.state == planning.EXITED:
                    self._undo(name, svc, created)
                    node = f" on node {unit.node}" if unit.node else ""
                    raise PermanentError(f"{where}{node}: {err}", code=code)
            if len(started) >= replicas and len(units) == replicas:
                return units
            if time.monotonic() > deadline:
                log.info("%s: not all %d replicas run after %.0fs; left to the swarm", where, replicas,
                         self.apply_wait_s)
                return units
            polls += 1
            time.sleep(0.1 if polls < 10 else 0.3)

    def _ran(self, service_id: str, want: str) -> bool:
        """A task of the spec ``want`` got a container (it started), whatever its state now."""
        tasks = self._call(lambda: self.api.tasks(filters={"service": service_id}), "list tasks")
        return any(((t.get("Spec") or {}).get("ContainerSpec") or {}).get("Labels", {}).get(runtime.LABEL_HASH) == want
                   and ((t.get("Status") or {}).get("ContainerStatus") or {}).get("ContainerID") for t in tasks)

    def _undo(self, name: str, svc: dict[str, Any], created: bool) -> None:
        """A service whose image cannot run: a new one is removed, an update rolled back."""
        previous = svc.get("PreviousSpec")
        if created or not previous:
            with contextlib.suppress(UnitGone):
                self._call(lambda: self.api.remove_service(svc["ID"]), f"remove service {name}")
            return
        with contextlib.suppress(RuntimeFailure):
            self._call(lambda: self.api.update_service(
                svc["ID"], svc["Version"]["Index"], task_template=previous["TaskTemplate"], name=name,
                labels=previous.get("Labels"), mode=previous.get("Mode"), update_config=previous.get("UpdateConfig"),
                endpoint_spec=previous.get("EndpointSpec")), f"roll back {name}")

    # -- the health gate's facts ---------------------------------------------------

    def _deploying(self, service_id: str, index: int) -> None:
        """This daemon changes a service now (its raft index ``index`` before): what ended before is not judged."""
        with self._lock:
            self._deployed[service_id] = index
            self._ended.pop(service_id, None)

    def _note_ended(self, services: dict[str, dict[str, Any]], tasks: list[dict[str, Any]], api: Any = None) -> None:
        """From a read of tasks: those of a service this daemon changed that ended on their own
        since (failed, or ran to completion), which Swarm may already have replaced in their slot."""
        with self._lock:
            since = {sid: self._deployed[sid] for sid in services if sid in self._deployed}
        if not since:
            return
        found: dict[str, list[tuple[int, runtime.Unit]]] = {sid: [] for sid in since}
        for task in tasks:
            sid = task.get("ServiceID", "")
            if sid not in since or task["Version"]["Index"] <= since[sid] \
                    or (task.get("Status") or {}).get("State") not in _ENDED_ITSELF:
                continue
            found[sid].append((task["Version"]["Index"],
                               self._unit(services[sid], task, int(task.get("Slot") or 0), api)))
        with self._lock:
            for sid, ended in found.items():
                if self._deployed.get(sid) != since[sid] or not ended:  # changed again meanwhile, or nothing new
                    continue
                # Added to, never replaced: an ended task stays ended, and reads run on two threads
                # (the event feed's, the apply's), so a read that began while it still ran may come
                # second. The newest ENDED_KEPT are kept (a crash loop's).
                had = {u.instance: u for u in self._ended.get(sid, ())}
                had.update((u.instance, u) for _, u in sorted(ended, key=lambda e: e[0]) if u.instance not in had)
                self._ended[sid] = tuple(had.values())[-ENDED_KEPT:]

    def ended(self, org: str, app: str) -> list[runtime.Unit]:
        """The app's tasks that ended on their own since this daemon last changed their service,
        as the reads of tasks found them (no engine call; a service's newest ``ENDED_KEPT``): Swarm
        starts a failed task's replacement itself, so the view's unit of that slot (the replacement)
        does not say that the deployment crashed or turned unhealthy. The health gate judges them with
        the units (``gates``, ``health.judge(ended=)``). Kept in memory: a restarted daemon judges
        from the units."""
        with self._lock:
            return [u for units in self._ended.values() for u in units if u.key == (org, app)]

    # -- logs ---------------------------------------------------------------

    def log_line(self, service: str, raw: _docker.RawLine) -> runtime.LogLine:
        """A line of ``service_logs(details=True)`` (head ``<timestamp> <details>``): its node and task named."""
        head, text, cut = raw
        stamp, _, details = head.partition(" ")
        attrs = dict(kv.split("=", 1) for kv in details.split(",") if "=" in kv)
        if "com.docker.swarm.task.id" not in attrs and details:
            text = f"{details} {text}"  # no details part
        node = self._node(attrs.get("com.docker.swarm.node.id", ""))
        replica = self._replica(attrs.get("com.docker.swarm.service.id", ""), attrs.get("com.docker.swarm.task.id", ""))
        return runtime.LogLine(service, stamp, text, replica, node, cut)

    def _replica(self, service_id: str, task_id: str) -> int:
        """A task's replica (slot - 1), from one tasks list of its service when not known yet."""
        with self._lock:
            known = self._slots.get(task_id)
        if known is not None or not service_id or not task_id:
            return known or 0
        try:
            tasks = self._call(lambda: self.api.tasks(filters={"service": service_id}), "list tasks")
        except RuntimeFailure:
            return 0
        with self._lock:
            if len(self._slots) > 100_000:
                self._slots.clear()
            self._slots.update({t["ID"]: max(int(t.get("Slot") or 0) - 1, 0) for t in tasks})
            self._slots.setdefault(task_id, 0)
            return self._slots[task_id]

    def tail(self, org: str, app: str, n: int) -> list[runtime.LogLine]:
        """The last ``n`` whole lines of every service of the app, across nodes, oldest first
        (``_docker.tail_lines``: the engine's tail counts each task's messages)."""
        lines: list[runtime.LogLine] = []
        for svc in self.app_services(org, app):
            name = (svc["Spec"].get("Labels") or {}).get(runtime.LABEL_SERVICE, specs.MAIN_SERVICE)

            def read(k: int, service_id: str = svc["ID"]) -> Iterable[bytes]:
                return _docker.service_logs(self.api, service_id, tail=k)

            try:
                raw = self._call(lambda: _docker.tail_lines(read, n, details=True), "service logs")
            except UnitGone:
                continue
            lines.extend(self.log_line(name, line) for line in raw)
        lines.sort(key=lambda line: _docker.stamp_key(line.timestamp))
        return lines[-n:]

    def follow(self, org: str, app: str, *, since: float, ended: threading.Event | None = None) -> _ServiceLogs:
        return _ServiceLogs(self, org, app, since, ended)


def _restart_policy(service: specs.ServiceSpec) -> RestartPolicy:
    """A ``oneshot`` runs once (exit 0 is ``completed``); every other task is restarted by the swarm."""
    return RestartPolicy("none") if service.oneshot else RestartPolicy("any", delay=5 * _NS)


def _update_config(spec: specs.AppSpec, service: specs.ServiceSpec) -> UpdateConfig:
    """A rolling update: one task at a time, each watched by the swarm for ``min_ready`` seconds
    (``monitor``; 2 s by default, as before the key); ``on_failure: rollback`` lets the swarm put
    the previous spec back itself the moment a task of the new one fails (``failure_action``), and
    ``keep`` lets the update go on so that the failed version is left for inspection, as on one host.
    Neither is in a unit's spec hash: a service applied before is not changed for them."""
    monitor = service.min_ready if service.min_ready is not None else UPDATE_MONITOR_S
    return UpdateConfig(parallelism=1, failure_action="rollback" if spec.on_failure == "rollback" else "continue",
                        monitor=int(monitor * _NS), order="stop-first" if service.host_port else "start-first")


def _tmpfs_mount(entry: str) -> Mount:
    """A Compose ``tmpfs`` entry (``/run`` or ``/run:size=64m,mode=1777``) as a Swarm tmpfs mount."""
    target, _, options = entry.partition(":")
    size: int | str | None = None
    mode: int | None = None
    for option in filter(None, options.split(",")):
        key, _, value = option.partition("=")
        if key == "size":
            size = value
        elif key == "mode":
            mode = int(value, 8)
    return Mount(target, None, type="tmpfs", tmpfs_size=size, tmpfs_mode=mode)

