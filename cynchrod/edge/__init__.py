"""The edge: an app's ``domain`` (and each service's) routed to its units through Caddy's admin API.

Created by the daemon when ``--edge http://ADMIN-ADDRESS`` is set; the
reconciler calls ``sync`` with the routes every pass wants (before and after it
acts), and ``edge.deploy`` calls ``switch`` in the middle of a zero-downtime
recreate, once the new unit is ready. The edge sits above the runtime: ``deploy``
drives it through the protocol, and nothing in ``runtime`` imports the edge.

cynchrod owns exactly one HTTP server in Caddy's config, ``apps.http.servers.
<owner>_edge`` with ``"@id": "<owner>-edge"``, listening on ``--edge-listen``
(plain HTTP; Caddy's automatic HTTPS is off there), and, when
``--edge-tls-listen`` is given, one HTTPS server ``<owner>_edge_tls`` with the
same routes and Caddy's automatic HTTPS (its internal CA for local names such as
``*.localhost``, ACME for public names). Everything else in Caddy's config is
left alone. Each ``sync`` reads our servers (``GET /id/<id>``) and writes them
only when they differ from the wanted JSON (``PATCH /id/<id>``): a route edited
by hand is put back within a pass, like a container.

A route is a host matcher and either a ``reverse_proxy`` to
``<upstream host>:<host port>`` of every running unit of the service the domain
names (the app's ``domain``: its routed service; a service's ``domain``: that
service), or, for a stopped app (or one with nothing running), a
``static_response`` 503. Unknown hosts get 404 from our server.

Every failure to reach or change Caddy is ``edge_unavailable``: a temporary
error that the reconciler logs and retries the next pass; it never stops a pass.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import requests

from cynchrod.core import planning, specs
from cynchrod.core.errors import EdgeUnavailable as EdgeUnavailable

log = logging.getLogger(__name__)

#: Seconds one admin API call may take.
TIMEOUT_S = 5.0


@dataclasses.dataclass(frozen=True)
class Route:
    """One domain: where it goes (host ports of running units) or why it answers 503."""

    domain: str
    org: str
    app: str
    upstreams: tuple[int, ...] = ()
    #: Said in the 503 body when there is no upstream: "stopped" or "not running".
    why: str = "not running"


def routed_service(spec: specs.AppSpec) -> specs.ServiceSpec | None:
    """The service an app's domain goes to: its only service, else its only one with a port."""
    if len(spec.services) == 1:
        return spec.services[0] if spec.services[0].port else None
    with_port = [s for s in spec.services if s.port]
    return with_port[0] if len(with_port) == 1 else None


def domain_routes(spec: specs.AppSpec) -> list[tuple[str, specs.ServiceSpec]]:
    """Each host name of an app (lowercase) and the service it goes to: the app's
    ``domain`` to ``routed_service``, each service's own ``domain`` to that service."""
    out = []
    app_service = routed_service(spec) if spec.domain else None
    if spec.domain and app_service is not None:
        out.append((spec.domain.lower(), app_service))
    out.extend((s.domain.lower(), s) for s in spec.services if s.domain and s.port)
    return out


def domains_of(spec: specs.AppSpec, service: str) -> list[str]:
    """The host names routed to one service of an app."""
    return [domain for domain, s in domain_routes(spec) if s.name == service]


def routes(desired: Mapping[tuple[str, str], specs.AppSpec], units: Sequence[planning.Unit],
           refused: Iterable[tuple[str, str]] = ()) -> list[Route]:
    """The routes the desired apps and the units that run want (pure).

    ``refused``: apps whose domain is another app's (``domain_taken``): no route.
    """
    skip = set(refused)
    by_app: dict[tuple[str, str], list[planning.Unit]] = {}
    for u in units:
        by_app.setdefault(u.key, []).append(u)
    out = []
    for key, spec in sorted(desired.items()):
        if key in skip:
            continue
        for domain, service in domain_routes(spec):
            if spec.state == "stopped":
                out.append(Route(domain, spec.org, spec.name, why="stopped"))
                continue
            ports = sorted({u.endpoint for u in by_app.get(key, []) if u.service == service.name
                            and u.state == planning.RUNNING and u.endpoint})
            out.append(Route(domain, spec.org, spec.name, tuple(p for p in ports if p)))
    return out


#: Linux moves connections waiting in a closing SO_REUSEPORT listener's queue to
#: another listener of its group when this is 1, instead of resetting them.
MIGRATE_SYSCTL = "/proc/sys/net/ipv4/tcp_migrate_req"


def resets_at_config_changes(sysctl: str = MIGRATE_SYSCTL) -> bool:
    """True when Caddy on this network namespace resets the connections that wait in its
    old listener's accept queue at each config change (``tcp_migrate_req`` is 0).

    Caddy 2.6 applies a config change by opening new SO_REUSEPORT listeners and closing
    the old ones; the kernel hashes new connections across both, and those still queued
    on the old one when it closes are reset unless the kernel migrates them."""
    try:
        with open(sysctl) as f:
            return f.read().strip() == "0"
    except OSError:
        return False  # not Linux, or a kernel without it: nothing known


def upstream_host(publish_address: str) -> str:
    """Where the edge dials a unit's host port: the publish address, loopback for a wildcard."""
    return "127.0.0.1" if publish_address in ("", "0.0.0.0", "::", "[::]") else publish_address


def link(domain: str, *, listen: str, tls_listen: str = "") -> str:
    """The address a person opens for ``domain`` on this edge: ``https`` when it has a TLS
    server, and the server's port unless it is the scheme's own (an edge on 80/443 gets
    plain ``http://shop.example/``; the demo's, on a free port, ``http://hello.localhost:41234/``).
    A listener behind a port mapping is not known here: its links carry the inner port."""
    scheme, address, default = ("https", tls_listen, "443") if tls_listen else ("http", listen, "80")
    port = address.rpartition(":")[2]
    return f"{scheme}://{domain}{'' if not port.isdigit() or port == default else ':' + port}/"


class Edge:
    """cynchrod's servers and routes in one Caddy, through its admin API (thread-safe)."""

    def __init__(self, admin: str, *, listen: str = ":80", tls_listen: str = "", owner: str = "cynchrod",
                 upstream_host: str = "127.0.0.1", timeout: float = TIMEOUT_S) -> None:
        self.admin = admin.rstrip("/")
        self.listen = listen
        self.tls_listen = tls_listen
        self.owner = owner
        self.upstream_host = upstream_host
        self.timeout = timeout
        self.server_name = f"{owner}_edge"
        self.server_id = f"{owner}-edge"
        self.tls_name = f"{owner}_edge_tls"
        self.tls_id = f"{owner}-edge-tls"
        self._lock = threading.Lock()
        self._http = requests.Session()
        #: The routes last asked for, by domain (None before the first ``sync``).
        self._routes: dict[str, Route] | None = None
        #: Admin API writes so far (the tests count them: a pass in sync writes nothing).
        self.writes = 0

    def close(self) -> None:
        self._http.close()

    # -- the wanted JSON ------------------------------------------------------

    def route_id(self, domain: str, *, tls: bool = False) -> str:
        return f"{self.owner}-edge{'-tls' if tls else ''}-{domain}"

    def route_json(self, route: Route, *, tls: bool = False) -> dict[str, Any]:
        handler: dict[str, Any]
        if route.upstreams:
            handler = {"handler": "reverse_proxy",
                       "upstreams": [{"dial": f"{self.upstream_host}:{port}"} for port in route.upstreams]}
        else:
            handler = {"handler": "static_response", "status_code": 503,
                       "headers": {"Retry-After": ["10"]},
                       "body": f"{route.domain}: app {route.org}/{route.app} is {route.why}\n"}
        return {"@id": self.route_id(route.domain, tls=tls), "match": [{"host": [route.domain]}],
                "handle": [handler], "terminal": True}

    def server_json(self, wanted: Iterable[Route], *, tls: bool = False) -> dict[str, Any]:
        ordered = sorted(wanted, key=lambda r: r.domain)
        server: dict[str, Any] = {
            "@id": self.tls_id if tls else self.server_id,
            "listen": [self.tls_listen if tls else self.listen],
            "routes": [*(self.route_json(r, tls=tls) for r in ordered),
                       {"handle": [{"handler": "static_response", "status_code": 404,
                                    "body": "no app at this domain\n"}]}],
        }
        if tls:
            # TLS on a port other than 443 needs a connection policy to be on; no
            # redirect server (it would take port 80).
            server["tls_connection_policies"] = [{}]
            server["automatic_https"] = {"disable_redirects": True}
        else:
            server["automatic_https"] = {"disable": True}
        return server

    # -- talking to Caddy ---------------------------------------------------

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        try:
            response = self._http.request(method, f"{self.admin}{path}", timeout=self.timeout,
                                          data=None if body is None else json.dumps(body),
                                          headers={"Content-Type": "application/json"})
        except requests.RequestException as exc:
            raise EdgeUnavailable(f"Caddy's admin API at {self.admin} is unreachable ({type(exc).__name__})") \
                from exc
        if method != "GET":
            self.writes += 1
        if response.status_code == 404 and method == "GET":
            return None
        if response.status_code >= 400:
            raise EdgeUnavailable(f"Caddy refused {method} {path}: {response.status_code} "
                                  f"{response.text.strip()[:300]}")
        return response.json() if response.content else None

    def _ensure(self, name: str, server_id: str, want: dict[str, Any]) -> bool:
        """Make our server equal ``want``; True when something was written."""
        have = self._request("GET", f"/id/{server_id}")
        if have == want:
            return False
        if have is not None:
            self._request("PATCH", f"/id/{server_id}", want)
            return True
        # Not there (or its @id was edited away): create it under the deepest object of
        # apps.http.servers that exists, without touching anything beside it.
        config = self._request("GET", "/config/")
        path: list[str] = []
        node = config
        for key in ("apps", "http", "servers"):
            if not isinstance(node, dict) or not isinstance(node.get(key), dict):
                break
            node, path = node[key], [*path, key]
        value: Any = want
        for key in reversed(["apps", "http", "servers", name][len(path) + 1:]):
            value = {key: value}
        target = "/".join([*path, ["apps", "http", "servers", name][len(path)]])
        if config is None:
            self._request("POST", "/config/", {"apps": value})
        else:
            self._request("POST", f"/config/{target}", value)
        return True

    def _remove(self, server_id: str) -> None:
        if self._request("GET", f"/id/{server_id}") is not None:
            self._request("DELETE", f"/id/{server_id}")

    def _assert(self) -> bool:
        wanted = list((self._routes or {}).values())
        wrote = self._ensure(self.server_name, self.server_id, self.server_json(wanted))
        if self.tls_listen:
            wrote = self._ensure(self.tls_name, self.tls_id, self.server_json(wanted, tls=True)) or wrote
        else:
            self._remove(self.tls_id)
        return wrote

    # -- what the reconciler and the deployer call ------------------------------

    def sync(self, wanted: Iterable[Route]) -> bool:
        """Make Caddy serve exactly these routes (drift is put back); True when it wrote."""
        with self._lock:
            self._routes = {r.domain: r for r in wanted}
            wrote = self._assert()
        if wrote:
            log.info("edge: routes re-asserted in Caddy (%d domain(s))", len(self._routes))
        return wrote

    def reassert(self) -> bool:
        """The liveness probe's check: the routes of the last ``sync`` put back if Caddy lost them
        (restarted, or its config replaced); True when it wrote. Before any ``sync``, only Caddy's
        admin API is asked for our server. Raises ``EdgeUnavailable`` when Caddy does not answer."""
        with self._lock:
            if self._routes is None:
                self._request("GET", f"/id/{self.server_id}")
                return False
            wrote = self._assert()
        if wrote:
            log.warning("edge: Caddy had lost our routes (restarted?); %d domain(s) put back", len(self._routes))
        return wrote

    def switch(self, domains: Iterable[str], old: int | None, new: int, *, org: str, app: str) -> None:
        """Send each of ``domains`` (one service's) to host port ``new`` instead of ``old``
        (other upstreams stay), in one config change."""
        names = sorted({d.lower() for d in domains})
        with self._lock:
            routes = dict(self._routes or {})
            for domain in names:
                current = routes.get(domain)
                ports = [p for p in (current.upstreams if current else ()) if p != old]
                routes[domain] = Route(domain, org, app, tuple(sorted({*ports, new})))
            if self._routes is None:
                # No full picture yet (no pass has synced): change these routes only.
                for domain in names:
                    self._request("PATCH", f"/id/{self.route_id(domain)}", self.route_json(routes[domain]))
                return
            self._routes = routes
            self._assert()
        log.info("edge: %s now go(es) to port %d (was %s)", ", ".join(names), new, old)

    def upstreams(self, domain: str) -> tuple[int, ...]:
        """The host ports a domain goes to now, as Caddy has it (for tests and recovery)."""
        route = self._request("GET", f"/id/{self.route_id(domain.lower())}")
        if not route:
            return ()
        handler = route["handle"][0]
        if handler.get("handler") != "reverse_proxy":
            return ()
        return tuple(int(u["dial"].rsplit(":", 1)[1]) for u in handler.get("upstreams", []))
