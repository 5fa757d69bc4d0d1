"""Domains through a real Caddy (admin API), zero-downtime redeploys on a real dockerd."""

from __future__ import annotations

import json
import pathlib
import socket
import ssl
import threading
import urllib.error
from collections.abc import Iterator
from typing import Any

import docker
import pytest

from cynchrod import edge, runtime
from cynchrod.edge import deploy
from tests.conftest import Caddy, Harness
from tests.helpers import TEST_IMAGE, GitRepo, free_port, wait_for

SERVE = "[sh, -c, 'mkdir -p /w && echo \"$VERSION\" > /w/index.html && exec httpd -f -p 8080 -h /w']"


def web(name: str, version: str, *, domain: str = "", org: str = "", host_port: int = 0,
        command: str = SERVE, state: str = "") -> str:
    text = f"name: {name}\nimage: {TEST_IMAGE}\ncommand: {command}\nport: 8080\nmemory: 64\n" \
           f"env: {{VERSION: {version}}}\n"
    if domain:
        text += f"domain: {domain}\n"
    if org:
        text += f"org: {org}\n"
    if host_port:
        text += f"hostPort: {host_port}\n"
    if state:
        text += f"state: {state}\n"
    return text


class RecordingEdge(edge.Edge):
    """The edge, keeping each routing it wrote to Caddy: the upstream ports of every domain.
    What cynchrod tells Caddy, in order; when a change takes hold is Caddy's (``Caddy.settle``)."""

    def __init__(self, admin: str, **kwargs: Any) -> None:
        super().__init__(admin, **kwargs)
        self.written: list[dict[str, tuple[int, ...]]] = []

    def _assert(self) -> bool:
        wrote = super()._assert()
        if wrote:
            self.written.append({domain: r.upstreams for domain, r in (self._routes or {}).items()})
        return wrote

    def routed(self, domain: str, since: int = 0) -> list[tuple[int, ...]]:
        """The upstreams of ``domain`` in force at write ``since`` and written after it, each change once."""
        seen: list[tuple[int, ...]] = []
        for routes in self.written[max(since - 1, 0):]:
            if domain in routes and (not seen or seen[-1] != routes[domain]):
                seen.append(routes[domain])
        return seen


@pytest.fixture
def edged(harness: Harness, caddy: Caddy) -> Iterator[Harness]:
    """The harness with an edge (a ``RecordingEdge``): the runtime recreates start-first, the passes sync routes."""
    front = RecordingEdge(caddy.admin, listen=f"127.0.0.1:{caddy.port}", tls_listen=f"127.0.0.1:{caddy.tls_port}",
                      owner=harness.rt.owner)
    # The default drain: it covers Caddy handing connections from its old config to the new one.
    harness.deployer = deploy.Deployer(harness.rt, front, ready_timeout=10.0, drain=2.0)
    harness.rec.runtime = harness.deployer
    harness.rec.edge = front
    yield harness
    front.close()


def require_migrating_listeners() -> None:
    """The zero-failure tests need the kernel to hand a closing listener's queue over."""
    assert not edge.resets_at_config_changes(), (
        "net.ipv4.tcp_migrate_req is 0: Caddy resets queued connections at each config change; run scripts/setup")


class Client:
    """Sends requests through the edge, one after another without pause, until stopped.

    Each request on a fresh connection (as ``Caddy.fetch``): a kept-alive connection
    that Caddy's old server closes as idle at a config change fails a client that does
    not retry (docs/edge.md, *Caddy's config changes and connections*); that is Caddy's, not the route's.
    """

    def __init__(self, caddy: Caddy, host: str) -> None:
        require_migrating_listeners()
        self.caddy, self.host = caddy, host
        self.results: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.results.append(self.caddy.fetch(self.host, timeout=5, settled=False))
            except (OSError, http_errors()) as exc:
                self.results.append((0, f"{type(exc).__name__}: {exc}"))

    def __enter__(self) -> Client:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    @property
    def failed(self) -> list[tuple[int, str]]:
        """Requests that got no 200: an error answer (502, 503, 404), a timeout, or a reset.

        A reset is cynchrod's too: Caddy 2.6 applies each config change with a new
        SO_REUSEPORT listener and closes the old one, and the connections still queued
        on the old one are reset unless the kernel migrates them (``tcp_migrate_req``,
        which ``scripts/setup`` turns on; see ``require_migrating_listeners``).
        """
        return [r for r in self.results if r[0] != 200]

    @property
    def versions(self) -> list[str]:
        """The versions answered, in the order each first answered.

        Not the order of every answer: Caddy answers a config change once its old servers'
        shutdowns have begun, and for a moment the old config still takes connections beside
        the new one (docs/edge.md), so an old version may answer once more after the new one
        first did. What cynchrod told Caddy is checked in order by ``RecordingEdge.routed``.
        """
        seen: list[str] = []
        for status, body in self.results:
            if status == 200 and body.strip() not in seen:
                seen.append(body.strip())
        return seen


def recorder(h: Harness) -> RecordingEdge:
    assert isinstance(h.rec.edge, RecordingEdge)
    return h.rec.edge


def http_errors() -> type[Exception]:
    import http.client
    return http.client.HTTPException


def redeploys(repo: GitRepo, h: Harness, caddy: Caddy, name: str, domain: str, count: int,
              host_port: int = 0) -> Client:
    with Client(caddy, domain) as client:
        for i in range(2, 2 + count):
            repo.push({f"apps/{name}.yaml": web(name, f"v{i}", domain=domain, host_port=host_port)})
            result = h.sync()
            assert result.ok, result
    assert len(client.results) > 50 * count, len(client.results)
    return client


def test_five_redeploys_through_the_edge_drop_nothing_and_stop_first_does(
        repo: GitRepo, edged: Harness, caddy: Caddy) -> None:

    repo.push({"apps/zd.yaml": web("zd", "v1", domain="zd.localhost"),
               "apps/sf.yaml": web("sf", "v1", domain="sf.localhost", host_port=free_port())})
    assert edged.sync().ok
    assert caddy.fetch("zd.localhost") == (200, "v1\n")
    assert caddy.fetch("sf.localhost") == (200, "v1\n")

    since = len(recorder(edged).written)
    zero = redeploys(repo, edged, caddy, "zd", "zd.localhost", 5)
    assert zero.failed == [], zero.failed[:5]
    assert zero.versions == ["v1", "v2", "v3", "v4", "v5", "v6"]
    # Each redeploy moved the route once, to a port of its own, never back.
    routed = recorder(edged).routed("zd.localhost", since)
    assert len(routed) == 6 and len(set(routed)) == 6 and all(len(ports) == 1 for ports in routed), routed
    names = [row["Names"][0] for row in edged.rt.api.containers(filters=edged.rt.owner_filter)
             if row["Labels"][runtime.LABEL_APP] == "zd"]
    assert len(names) == 1  # one serving version, the old ones gone

    # The comparison, same engine and edge: a host port forces stop-first.
    port = edged.app("sf").host_port
    assert port
    stop_first = redeploys(repo, edged, caddy, "sf", "sf.localhost", 5, host_port=port)
    print(f"\nfailed requests per redeploy: edge {len(zero.failed) / 5:g} of {len(zero.results)}, "
          f"stop-first {len(stop_first.failed) / 5:g} of {len(stop_first.results)}")
    assert len(stop_first.failed) > 0


def test_a_new_version_never_ready_keeps_the_old_one_serving(repo: GitRepo, edged: Harness, caddy: Caddy) -> None:
    edged.deployer.ready_timeout = 3.0
    repo.push({"apps/nr.yaml": web("nr", "v1", domain="nr.localhost")})
    assert edged.sync().ok
    old = edged.containers()["nr"]["Id"]
    broken = "[sh, -c, 'echo booting v2; echo no listener here >&2; exec sleep 3600']"
    with Client(caddy, "nr.localhost") as client:
        repo.push({"apps/nr.yaml": web("nr", "v2", domain="nr.localhost", command=broken)})
        result = edged.sync()
    assert not result.ok
    assert client.failed == [] and client.versions == ["v1"] and len(client.results) > 50
    app = edged.app("nr")
    assert app.status == "failed"
    last = edged.db.last_deployment(app.id)
    assert last is not None and last.status == "failed" and last.error_code == "not_ready"
    assert last.error is not None and "booting v2" in last.error and "no listener here" in last.error
    rows = edged.rt.api.containers(all=True, filters=edged.rt.owner_filter)
    assert [r["Id"] for r in rows] == [old]  # the never-ready container is gone
    assert caddy.fetch("nr.localhost") == (200, "v1\n")


def test_a_domain_belongs_to_the_first_app_across_orgs(repo: GitRepo, edged: Harness, caddy: Caddy) -> None:
    repo.push({"apps/first.yaml": web("shop", "acme", domain="shop.localhost", org="acme")})
    assert edged.sync().ok
    repo.push({"apps/second.yaml": web("shop", "beta", domain="SHOP.localhost", org="beta")})
    result = edged.sync()
    assert not result.ok
    taken = edged.app("shop", org="beta")
    assert taken.status == "failed" and (taken.last_error or "").startswith(
        "domain_taken: domain shop.localhost is taken by an app of another org")
    last = edged.db.last_deployment(taken.id)
    assert last is not None and last.error_code == "domain_taken"
    assert [r["Labels"][runtime.LABEL_ORG] for r in edged.rt.api.containers(filters=edged.rt.owner_filter)] \
        == ["acme"]
    assert caddy.fetch("shop.localhost") == (200, "acme\n")
    again = edged.sync()  # first come keeps it on every pass
    assert edged.app("shop", org="beta").status == "failed" and not again.ok
    # The holder goes: the domain is free for the other claim.
    repo.push({"apps/first.yaml": None})
    assert edged.sync().ok
    assert caddy.fetch("shop.localhost") == (200, "beta\n")


def test_stop_answers_503_and_delete_removes_the_route(repo: GitRepo, edged: Harness, caddy: Caddy) -> None:
    repo.push({"apps/st.yaml": web("st", "v1", domain="st.localhost")})
    assert edged.sync().ok
    route_id = edged.rec.edge.route_id("st.localhost")  # type: ignore[union-attr]
    assert caddy.get(f"/id/{route_id}")["handle"][0]["handler"] == "reverse_proxy"
    repo.push({"apps/st.yaml": web("st", "v1", domain="st.localhost", state="stopped")})
    assert edged.sync().ok
    status, body = caddy.fetch("st.localhost")
    assert (status, body) == (503, "st.localhost: app default/st is stopped\n")
    repo.push({"apps/.keep": "", "apps/st.yaml": None})
    assert edged.sync().ok
    with pytest.raises(urllib.error.HTTPError) as gone:
        caddy.get(f"/id/{route_id}")
    assert gone.value.code == 404
    assert caddy.fetch("st.localhost")[0] == 404
    server = caddy.get(f"/id/{edged.rt.owner}-edge")
    assert [r for r in server["routes"] if "match" in r] == []


def test_a_hand_edited_route_is_put_back_and_the_rest_of_caddy_is_left_alone(
        repo: GitRepo, edged: Harness, caddy: Caddy, docker_client: docker.DockerClient) -> None:
    repo.push({"apps/he.yaml": web("he", "v1", domain="he.localhost")})
    assert edged.sync().ok
    route_id = edged.rec.edge.route_id("he.localhost")  # type: ignore[union-attr]
    good = caddy.get(f"/id/{route_id}")
    caddy.call("PATCH", f"/id/{route_id}/handle/0/upstreams", [{"dial": "127.0.0.1:1"}])
    assert caddy.fetch("he.localhost")[0] == 502
    writes = edged.rec.edge.writes  # type: ignore[union-attr]
    edged.sync()
    assert caddy.get(f"/id/{route_id}") == good
    assert caddy.fetch("he.localhost") == (200, "v1\n")
    assert edged.rec.edge.writes > writes  # type: ignore[union-attr]
    writes = edged.rec.edge.writes  # type: ignore[union-attr]
    edged.sync()
    assert edged.rec.edge.writes == writes  # type: ignore[union-attr]  # in sync: reads only
    config = caddy.get("/config/")
    assert config["apps"]["http"]["servers"]["other"] == caddy.base["apps"]["http"]["servers"]["other"]  # type: ignore[index]
    assert config["apps"]["pki"] == caddy.base["apps"]["pki"]  # type: ignore[index]
    assert caddy.fetch("anything", port=caddy.other_port) == (200, "not cynchrod's")


def test_https_through_the_edge_with_caddys_internal_ca(repo: GitRepo, edged: Harness, caddy: Caddy) -> None:
    repo.push({"apps/tls.yaml": web("tls", "secure", domain="tls.localhost")})
    assert edged.sync().ok
    root = caddy.get("/pki/ca/local")["root_certificate"]
    context = ssl.create_default_context(cadata=root)
    with socket.create_connection(("127.0.0.1", caddy.tls_port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="tls.localhost") as tls:
        issuer = dict(x[0] for x in tls.getpeercert()["issuer"])  # type: ignore[index, misc]
        tls.sendall(b"GET / HTTP/1.1\r\nHost: tls.localhost\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"secure\n"), answer
    assert "Caddy Local Authority" in issuer["commonName"]


def test_an_unreachable_edge_never_stops_a_pass(repo: GitRepo, edged: Harness, caddy: Caddy) -> None:
    caddy.stop()
    repo.push({"apps/down.yaml": web("down", "v1", domain="down.localhost")})
    result = edged.sync()
    assert result.ok, result
    assert edged.containers()["down"]["State"] == "running"
    repo.push({"apps/down.yaml": web("down", "v2", domain="down.localhost")})
    result = edged.sync()  # start-first, the switch fails: the deploy still goes through
    assert result.ok, result
    assert len(edged.rt.api.containers(filters=edged.rt.owner_filter)) == 1


@pytest.mark.parametrize("apps", [{}, {"pki": {"certificate_authorities": {"local": {"install_trust": False}}}}])
def test_the_edge_server_is_made_in_a_caddy_with_no_http_app(repo: GitRepo, harness: Harness,
                                                              tmp_path: pathlib.Path, apps: dict[str, object]) -> None:
    root = tmp_path / "bare-caddy"
    root.mkdir()
    bare = Caddy(root, apps=apps)
    try:
        front = edge.Edge(bare.admin, listen=f"127.0.0.1:{bare.port}", owner=harness.rt.owner)
        harness.rec.edge = front
        repo.push({"apps/b.yaml": web("b", "v1", domain="b.localhost")})
        assert harness.sync().ok
        # A first deploy is not start-first: the container runs, its server may still be starting.
        wait_for(lambda: bare.fetch("b.localhost") == (200, "v1\n"), 10, "b through the new server")
        assert bare.get("/config/apps/pki") == apps.get("pki")
        front.close()
    finally:
        bare.stop()


def shop(version: str, *, api_version: str = "api-v1", state: str = "", org: str = "") -> str:
    """A three-service app: web and api with their own domains, db with no port."""
    text = f"name: two\nmemory: 64\n{f'org: {org}' if org else ''}\n{f'state: {state}' if state else ''}\nservices:\n"
    for name, domain, answer in (("web", "web.localhost", version), ("api", "api.localhost", api_version)):
        text += f"  {name}:\n    image: {TEST_IMAGE}\n    command: {SERVE}\n    port: 8080\n" \
                f"    domain: {domain}\n    env: {{VERSION: {answer}}}\n"
    return text + f"  db:\n    image: {TEST_IMAGE}\n    command: [sleep, '3600']\n"


def test_service_domains_route_each_service_and_a_redeploy_of_one_drops_nothing(
        repo: GitRepo, edged: Harness, caddy: Caddy) -> None:
    repo.push({"apps/two.yaml": shop("web-v1")})
    assert edged.sync().ok
    assert caddy.fetch("web.localhost") == (200, "web-v1\n")
    assert caddy.fetch("API.localhost") == (200, "api-v1\n")
    app = edged.app("two")
    assert [(s["name"], s["domain"]) for s in json.loads(app.services_json or "[]")] == [
        ("api", "api.localhost"), ("db", None), ("web", "web.localhost")]
    assert app.service_domains == [("api", "api.localhost"), ("web", "web.localhost")]
    before = {r["Labels"][runtime.LABEL_SERVICE]: r["Id"] for r in
              edged.rt.api.containers(filters=edged.rt.owner_filter)}

    # Only api changes: it is swapped start-first under a client; web and db are left alone.
    since = len(recorder(edged).written)
    with Client(caddy, "api.localhost") as api_client, Client(caddy, "web.localhost") as web_client:
        repo.push({"apps/two.yaml": shop("web-v1", api_version="api-v2")})
        result = edged.sync()
        assert result.ok, result
    assert api_client.failed == [] and web_client.failed == [], (api_client.failed[:5], web_client.failed[:5])
    assert api_client.versions == ["api-v1", "api-v2"] and web_client.versions == ["web-v1"]
    # cynchrod moved api's route once, from its one port to another, and web's not at all.
    api_from, api_to = recorder(edged).routed("api.localhost", since)
    [web_at] = recorder(edged).routed("web.localhost", since)
    assert len(api_from) == len(api_to) == len(web_at) == 1 and api_from != api_to, recorder(edged).written
    assert len(api_client.results) > 50, len(api_client.results)
    after = {r["Labels"][runtime.LABEL_SERVICE]: r["Id"] for r in
             edged.rt.api.containers(filters=edged.rt.owner_filter)}
    assert after["web"] == before["web"] and after["db"] == before["db"] and after["api"] != before["api"]
    assert len(after) == 3  # the old api container is gone

    # Drift on a service's route is put back.
    route_id = edged.rec.edge.route_id("api.localhost")  # type: ignore[union-attr]
    good = caddy.get(f"/id/{route_id}")
    caddy.call("PATCH", f"/id/{route_id}/handle/0/upstreams", [{"dial": "127.0.0.1:1"}])
    edged.sync()
    assert caddy.get(f"/id/{route_id}") == good

    # Stopped: both domains answer 503; deleted: both routes are gone.
    repo.push({"apps/two.yaml": shop("web-v1", api_version="api-v2", state="stopped")})
    assert edged.sync().ok
    assert caddy.fetch("web.localhost") == (503, "web.localhost: app default/two is stopped\n")
    assert caddy.fetch("api.localhost")[0] == 503
    repo.push({"apps/.keep": "", "apps/two.yaml": None})
    assert edged.sync().ok
    assert caddy.fetch("web.localhost")[0] == 404 and caddy.fetch("api.localhost")[0] == 404
    assert [r for r in caddy.get(f"/id/{edged.rt.owner}-edge")["routes"] if "match" in r] == []


def test_a_service_domain_another_app_holds_is_domain_taken(repo: GitRepo, edged: Harness, caddy: Caddy) -> None:
    repo.push({"apps/first.yaml": web("api", "held", domain="api.localhost", org="acme")})
    assert edged.sync().ok
    repo.push({"apps/two.yaml": shop("web-v1", org="beta")})
    result = edged.sync()
    assert not result.ok
    taken = edged.app("two", org="beta")
    assert taken.status == "failed" and (taken.last_error or "").startswith(
        "domain_taken: domain api.localhost is taken by an app of another org"), taken.last_error
    assert [r["Labels"][runtime.LABEL_ORG] for r in edged.rt.api.containers(filters=edged.rt.owner_filter)] \
        == ["acme"]
    assert caddy.fetch("api.localhost") == (200, "held\n")
    assert caddy.fetch("web.localhost")[0] == 404  # a refused app gets none of its routes


def test_a_first_deploy_is_routed_once_it_answers(repo: GitRepo, edged: Harness, caddy: Caddy,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A new app whose server listens a second after its container starts: the pass that creates
    it returns once it is ready, so the route it sets never leads to a 502."""
    slow = "[sh, -c, 'sleep 1; mkdir -p /w && echo \"$VERSION\" > /w/index.html && exec httpd -f -p 8080 -h /w']"
    repo.push({"apps/slow.yaml": web("slow", "v1", domain="slow.localhost", command=slow)})
    assert edged.sync().ok
    assert caddy.fetch("slow.localhost") == (200, "v1\n")
    # One that never listens is routed after the readiness timeout all the same (it is the only
    # version there is), and the pass says why in the log; its deployment is unhealthy (docs/health.md).
    repo.push({"apps/slow.yaml": None, "apps/mute.yaml": web("mute", "v1", domain="mute.localhost",
                                                              command="[sleep, '3600']") + "health_timeout: 2\n"})
    edged.deployer.ready_timeout = 1.0
    assert {a.name: a.status for a in edged.sync().apps}["mute"] == "failed"
    assert (edged.app("mute").last_error or "").startswith("unhealthy: service main did not accept connections")
    assert edged.containers()["mute"]["State"] == "running"
    assert "default/mute: main is routed though not ready: timed out waiting for port 8080" in caplog.text
