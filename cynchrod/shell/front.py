"""What an API worker process serves from (``Front``), and the runtime the settings name.

``Front`` is the API's one handle on the daemon: the store (read directly), imperative calls
(``control``), log tails from the engine under a deadline, and the reconciler's memory (health,
units, previews) and wake-ups over the channel. It lives below the API (``api.auth.daemon()``
returns it) and above everything it wires, so the API imports no process wiring.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import secrets as random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cynchrod import edge, runtime, store
from cynchrod.core.codes import Code
from cynchrod.core.errors import TemporaryError
from cynchrod.desired import config, secrets, source
from cynchrod.edge import deploy
from cynchrod.runtime import local, swarm
from cynchrod.shell import builds, channel, control, metrics

if TYPE_CHECKING:
    from cynchrod.store import App

log = logging.getLogger("cynchrod")

#: Deadline of an engine call made for a request (a hung Docker costs a request this, not a worker).
REQUEST_DEADLINE_S = 5.0
#: How long a dashboard page waits for ``Daemon.preview`` (it queues behind a running pass).
PREVIEW_WAIT_S = 3.0
#: How long ``/healthz`` waits for the reconciler process's answer.
HEALTH_WAIT_S = 2.0
#: How long a log-stream ticket may wait to be redeemed.
TICKET_TTL_S = 30.0


@dataclasses.dataclass(frozen=True)
class Unit:
    """One running instance (replica) of one service of an app, for the dashboard."""

    service: str
    instance: str
    state: str
    host_port: int | None


@dataclasses.dataclass(frozen=True)
class Change:
    """One thing the next pass would do to an app; ``running``/``next`` are the
    service's normalised spec (JSON) before and after, empty when there is none."""

    kind: str
    service: str
    reason: str
    running: str
    next: str


def make_edge(cfg: config.Settings) -> edge.Edge | None:
    """The edge the config names (``--edge``), else None; only the reconciler process makes one."""
    if not cfg.edge or cfg.runtime == "swarm":
        return None
    front = edge.Edge(cfg.edge, listen=cfg.edge_listen, tls_listen=cfg.edge_tls_listen, owner=cfg.owner,
                      upstream_host=edge.upstream_host(cfg.publish_address))
    if edge.resets_at_config_changes():
        log.warning("edge: net.ipv4.tcp_migrate_req is 0 here, so a Caddy on this host resets the connections "
                    "it is accepting at each route change; set it to 1 (sysctl -w net.ipv4.tcp_migrate_req=1)")
    return front


def make_runtime(cfg: config.Settings, *, instance: str, vault: secrets.Secrets, edge: edge.Edge | None = None,
                 deadline: float | None = None) -> runtime.Runtime:
    """The runtime the config names: one Docker engine (its deploys through ``edge.deploy``:
    zero-downtime behind ``edge``, from ``make_edge``, when one is configured), or a swarm
    through one of its managers.

    ``deadline``: an API worker's runtime, which only reads (logs) under a deadline per
    engine call and never acts, so it has no edge.
    """
    if cfg.runtime == "swarm":
        registry = (swarm.Registry(cfg.registry_url, cfg.registry_username, cfg.registry_password)
                    if cfg.registry_url else None)
        return swarm.SwarmRuntime(owner=cfg.owner, instance=instance, stop_timeout=cfg.stop_timeout,
                                  registry=registry, secret_value=vault.value)
    engine = local.LocalRuntime(owner=cfg.owner, instance=instance, publish_address=cfg.publish_address,
                                stop_timeout=cfg.stop_timeout, secrets_dir=vault.staging.resolve(),
                                call_timeout=deadline, stream_timeout=deadline)
    if deadline is not None:
        return engine  # reads only: no deploys, no recovery
    return deploy.Deployer(engine, edge, ready_timeout=cfg.edge_ready_timeout, drain=cfg.edge_drain)


class Tickets:
    """Short-lived single-use tickets for the WebSocket URL, kept (hashed) in the store, so a
    ticket issued by one API worker process is redeemed by whichever one the socket reaches."""

    def __init__(self, db: store.Store) -> None:
        self._db = db

    def issue(self, token: store.Token, app_id: str, *, session: str | None = None) -> str:
        """A ticket for this token (and, from the dashboard, its session: the stream ends with it)."""
        ticket = "tkt_" + random.token_urlsafe(24)
        self._db.issue_ticket(ticket, token_id=token.id, app_id=app_id, ttl_s=TICKET_TTL_S, session=session)
        return ticket

    def redeem(self, ticket: str, app_id: str) -> tuple[str, str | None] | None:
        """The token id (and session hash) the ticket was issued to, once, for this app, before it expires."""
        return self._db.redeem_ticket(ticket, app_id)


class Front:
    """What an API worker process serves from: the store, imperative calls, the engine
    for logs (each call under a deadline) and the reconciler's memory over the channel.

    It never acts on the engine and never writes deployments but the queued ones an
    imperative call makes (the reconciler takes them up)."""

    def __init__(self, cfg: config.Settings, *, blocking: Callable[[Callable[[], Any]], Any] | None = None) -> None:
        self.settings = cfg
        self.store = store.Store(cfg.state / "cynchrod.db")
        self.sources = [source.open_source(c.repo, branch=c.branch, path=c.path, state_dir=cfg.state, org=c.org)
                        for c in cfg.sources]
        self.source = self.sources[0]
        self.secrets = secrets.Secrets(self.store, state_dir=cfg.state, files=cfg.runtime != "swarm")
        self.channel = channel.Channel(channel.socket_path(cfg.state))
        self.runtime = make_runtime(cfg, instance=self.store.instance_id(), vault=self.secrets,
                                    deadline=REQUEST_DEADLINE_S)
        self.builds = builds.Builds(state_dir=cfg.state, rt=self.runtime, allow=cfg.build_repo_allowed)
        self.metrics = metrics.Metrics(self.store)
        self.control = control.Control(src=self.sources, db=self.store, wake=self.wake, max_apps=cfg.max_apps,
                                       build_allowed=cfg.build_repo_allowed, blocking=blocking)
        self.tickets = Tickets(self.store)

    def wake(self, trigger: str, *, debounced: bool = False) -> None:
        self.channel.wake(trigger, debounced=debounced)

    def health(self) -> list[dict[str, str]]:
        """The reconciler's own account (``Daemon.health``); a reconciler that does not answer is a problem."""
        try:
            found = self.channel.call("health", timeout=HEALTH_WAIT_S)
        except channel.ReconcilerUnavailable as exc:
            return [{"code": Code.RECONCILER_UNAVAILABLE.value, "message": exc.message}]
        return [dict(p) for p in found]

    def app_units(self, org: str, name: str) -> list[Unit]:
        try:
            found = self.channel.call("units", org=org, name=name)
        except channel.ReconcilerUnavailable as exc:
            raise TemporaryError(exc.message, code=exc.code) from exc
        return [Unit(**u) for u in found]

    def preview(self, org: str, name: str, *, wait_s: float = PREVIEW_WAIT_S) -> list[Change] | None:
        try:
            found = self.channel.call("preview", timeout=wait_s + 1, org=org, name=name)
        except channel.ReconcilerUnavailable as exc:
            log.warning("preview of %s/%s: %s", org, name, exc)
            return None
        return None if found is None else [Change(**c) for c in found]

    def log_tail(self, org: str, name: str, lines: int) -> list[tuple[str, str, str]]:
        return [(line.service, line.timestamp, line.line) for line in self.runtime.tail(org, name, lines)]

    def manifest(self, app: App) -> bytes | None:
        src = next((s for s in self.sources if s.url == app.source), self.source)
        return src.file_at(app.commit, app.path) if app.commit and app.path else None

    def build_log_path(self, deployment_id: int) -> pathlib.Path:
        return self.builds.log_path(deployment_id)
