"""The pure parts of domains and the edge: manifests, config, the domain_taken rule, wanted routes."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

from cynchrod import edge, store
from cynchrod.cli import client
from cynchrod.core import decisions, planning, specs
from cynchrod.desired import config, manifests


def spec(name: str, org: str = "default", domain: str | None = "a.example.com", port: int | None = 8080,
         state: str = "running") -> specs.AppSpec:
    service = specs.ServiceSpec(name=specs.MAIN_SERVICE, image="img:1", port=port)
    return specs.AppSpec(org=org, name=name, services=(service,), domain=domain, state=state)


@dataclasses.dataclass(frozen=True)
class Row:
    domain: str | None
    created_at: str
    status: str = "running"
    last_error: str | None = None
    deployed_hash: str | None = None
    source: str = ""
    refusal: str | None = None
    note: str | None = None
    spec: specs.AppSpec | None = None

    @property
    def domains(self) -> frozenset[str]:
        if self.spec is not None:
            return frozenset(self.spec.domains)
        return frozenset({self.domain.lower()} if self.domain else ())


def inputs(desired: list[specs.AppSpec], rows: dict[tuple[str, str], Row] | None = None) -> decisions.Inputs:
    return decisions.Inputs(desired={s.key: s for s in desired}, rows=rows or {}, units=[], now=0.0)


@pytest.mark.parametrize("domain,ok", [
    ("hello.localhost", True), ("a-b.example.com", True), ("x", True), ("Shop.Example.COM", True),
    ("a..b", False), ("-a.example", False), ("a-.example", False), ("a_b.example", False),
    ("a" * 64 + ".example", False), ("exa mple.com", False), ("https://a.example", False),
])
def test_domain_is_a_hostname(domain: str, ok: bool) -> None:
    result = manifests.parse("apps/x.yaml", f"name: x\nimage: i\nport: 80\ndomain: '{domain}'\n".encode())
    assert (result.spec is not None) is ok, result.errors
    if not ok:
        assert result.errors[0].code == "invalid_value"


def test_a_domain_needs_exactly_one_port() -> None:
    none = manifests.parse("apps/x.yaml", b"name: x\nimage: i\ndomain: x.example\n")
    assert [e.code for e in none.errors] == ["invalid_value"] and "needs exactly one port" in str(none.errors[0])
    two = manifests.parse("apps/x.yaml", b"name: x\ndomain: x.example\nservices:\n  a: {image: i, port: 1}\n"
                                         b"  b: {image: i, port: 2}\n")
    assert "services with a port: a, b" in str(two.errors[0])
    one = manifests.parse("apps/x.yaml", b"name: x\ndomain: x.example\nservices:\n  a: {image: i, port: 1}\n"
                                         b"  db: {image: i}\n")
    assert one.spec is not None and edge.routed_service(one.spec) == one.spec.services[0]


def test_edge_settings_from_the_file_and_flags(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("edge: {admin: 'http://127.0.0.1:2019', listen: '127.0.0.1:8081', tlsListen: ':8443', "
                    "readyTimeout: 5, drain: 0.5}\n")
    settings = config.Settings.build(config.load_file(path))
    assert (settings.edge, settings.edge_listen, settings.edge_tls_listen, settings.edge_ready_timeout,
            settings.edge_drain) == ("http://127.0.0.1:2019", "127.0.0.1:8081", ":8443", 5.0, 0.5)
    assert config.Settings().edge == "" and config.Settings().edge_listen == ":80"
    with pytest.raises(config.ConfigError):
        config.Settings.build({"edge": "127.0.0.1:2019"})
    path.write_text("edge: {admin: '127.0.0.1:2019'}\n")
    with pytest.raises(config.ConfigError):
        config.load_file(path)


def test_first_come_keeps_a_domain_across_orgs() -> None:
    holder, claim = spec("shop", org="acme"), spec("shop", org="beta", domain="A.example.com")
    rows = {holder.key: Row("a.example.com", "2026-01-02")}
    refused = decisions.domains(inputs([holder, claim], rows))
    assert list(refused) == [claim.key] and refused[claim.key].code == "domain_taken"
    # Another org's holder is not named (issue 24 item 8); the same org's is.
    assert refused[claim.key].message == "domain a.example.com is taken by an app of another org; shop was not deployed"
    same = spec("mine", org="acme", domain="a.example.com")
    assert decisions.domains(inputs([holder, same], rows))[same.key].message \
        == "domain a.example.com belongs to app acme/shop; mine was not deployed"
    # The refused app's row carries the domain too, but a refusal is no claim.
    rows[claim.key] = Row("a.example.com", "2026-01-01", status="failed", last_error="domain_taken: ...",
                         refusal="domain_taken")
    assert list(decisions.domains(inputs([holder, claim], rows))) == [claim.key]
    # Two new claims at once: the first by org/name.
    assert list(decisions.domains(inputs([claim, holder]))) == [claim.key]
    # The holder gone: the claim is free.
    assert decisions.domains(inputs([claim], rows)) == {}
    held = {d.key: d for d in decisions.decide(inputs([holder, claim], rows))}
    assert held[claim.key].status == decisions.FAILED and not held[claim.key].actions
    assert held[claim.key].failure is not None and held[claim.key].failure.code == "domain_taken"
    assert held[holder.key].actions  # the holder is deployed


def test_wanted_routes() -> None:
    up, stopped, bare = spec("up", domain="Up.example"), spec("st", domain="st.example", state="stopped"), \
        spec("bare", domain=None)
    down, taken = spec("down", domain="down.example"), spec("taken", domain="up.example")
    service = up.services[0]
    units = [planning.Unit("default", "up", service.name, r, f"c{r}", planning.RUNNING, "h", endpoint=port)
             for r, port in ((0, 32001), (1, 32000))]
    units.append(planning.Unit("default", "down", service.name, 0, "c9", planning.EXITED, "h", endpoint=None))
    routes = edge.routes({s.key: s for s in (up, stopped, bare, down, taken)}, units, [taken.key])
    assert routes == [
        edge.Route("down.example", "default", "down", (), "not running"),
        edge.Route("st.example", "default", "st", (), "stopped"),
        edge.Route("up.example", "default", "up", (32000, 32001)),
    ]
    front = edge.Edge("http://127.0.0.1:1", listen=":8080", owner="o")
    server = front.server_json(routes)
    assert server["@id"] == "o-edge" and server["listen"] == [":8080"] and server["automatic_https"] == {
        "disable": True}
    assert [r.get("@id") for r in server["routes"]] == ["o-edge-down.example", "o-edge-st.example",
                                                        "o-edge-up.example", None]
    assert server["routes"][2]["handle"] == [{"handler": "reverse_proxy", "upstreams": [
        {"dial": "127.0.0.1:32000"}, {"dial": "127.0.0.1:32001"}]}]
    assert server["routes"][1]["handle"][0]["status_code"] == 503
    assert server["routes"][3]["handle"][0]["status_code"] == 404
    assert edge.upstream_host("0.0.0.0") == "127.0.0.1" and edge.upstream_host("10.0.0.5") == "10.0.0.5"


TWO = b"""name: two
services:
  web:
    image: i
    port: 8080
    domain: Web.example
  api:
    image: i
    port: 9000
    domain: api.example
  db:
    image: i
"""


def test_service_domains_route_each_to_its_service() -> None:
    result = manifests.parse("apps/two.yaml", TWO)
    assert result.spec is not None, result.errors
    routed = [(d, s.name) for d, s in edge.domain_routes(result.spec)]
    assert sorted(routed) == [("api.example", "api"), ("web.example", "web")]
    assert sorted(result.spec.domains) == ["api.example", "web.example"]
    assert edge.domains_of(result.spec, "web") == ["web.example"] and edge.domains_of(result.spec, "db") == []
    # A service's domain is no part of its container's hash: changing it moves a route only.
    web = next(s for s in result.spec.services if s.name == "web")
    assert web.hash(restarted_at=None) == dataclasses.replace(web, domain=None).hash(restarted_at=None)
    # It survives the store's round trip.
    again = specs.AppSpec.from_json(result.spec.to_json())
    assert again.domains == result.spec.domains


@pytest.mark.parametrize("text,code,line,words", [
    # a service domain without a port
    (b"name: x\nservices:\n  a: {image: i, port: 1}\n  b:\n    image: i\n    domain: b.example\n",
     "invalid_value", 6, "services.b.domain: the service needs a port"),
    # the same domain twice in one app, case aside
    (b"name: x\nservices:\n  a: {image: i, port: 1, domain: d.example}\n  b: {image: i, port: 2, domain: D.example}\n",
     "duplicate_domain", 4, "services.b.domain: d.example is already this app's services.a.domain"),
    # the app's domain on a service too
    (b"name: x\ndomain: d.example\nservices:\n  a: {image: i, port: 1, domain: d.example}\n  b: {image: i}\n",
     "duplicate_domain", 4, "services.a.domain: d.example is already this app's domain"),
    # not a hostname
    (b"name: x\nservices:\n  a: {image: i, port: 1, domain: 'a_b.example'}\n", "invalid_value", 3,
     "services.a.domain"),
])
def test_service_domain_errors(text: bytes, code: str, line: int, words: str) -> None:
    result = manifests.parse("apps/x.yaml", text)
    assert result.spec is None
    assert [(e.code, e.path, e.line) for e in result.errors] == [(code, "apps/x.yaml", line)], result.errors
    assert words in str(result.errors[0])


def test_an_app_domain_beside_service_domains() -> None:
    # The app's domain goes to its only service with a port; another service may have its own.
    text = b"name: x\ndomain: x.example\nservices:\n  web: {image: i, port: 1}\n  admin: {image: i, port: 2}\n"
    assert "or give each its own domain" in str(manifests.parse("apps/x.yaml", text).errors[0])
    text = b"name: x\ndomain: x.example\nservices:\n  web: {image: i, port: 1, domain: www.example}\n  db: {image: i}\n"
    result = manifests.parse("apps/x.yaml", text)
    assert result.spec is not None and edge.domains_of(result.spec, "web") == ["x.example", "www.example"]


def test_a_service_domain_is_claimed_like_an_app_domain() -> None:
    two = manifests.parse("apps/two.yaml", TWO).spec
    assert two is not None
    holder = dataclasses.replace(two, org="acme")
    claim = spec("other", org="beta", domain="API.example")
    rows = {holder.key: Row(None, "2026-01-02", spec=holder)}
    refused = decisions.domains(inputs([holder, claim], rows))
    assert list(refused) == [claim.key] and refused[claim.key].code == "domain_taken"
    assert "domain api.example is taken by an app of another org" in refused[claim.key].message
    # The other way round: an app's domain held, a service claiming it.
    rows = {claim.key: Row("api.example", "2026-01-01", spec=claim)}
    assert list(decisions.domains(inputs([holder, claim], rows))) == [holder.key]


def test_service_routes_and_one_switch_for_all_of_a_services_domains() -> None:
    two = manifests.parse("apps/two.yaml", TWO).spec
    assert two is not None
    units = [planning.Unit("default", "two", "web", 0, "w", planning.RUNNING, "h", endpoint=32001),
             planning.Unit("default", "two", "api", 0, "a", planning.RUNNING, "h", endpoint=32002),
             planning.Unit("default", "two", "db", 0, "d", planning.RUNNING, "h", endpoint=None)]
    assert edge.routes({two.key: two}, units) == [edge.Route("api.example", "default", "two", (32002,)),
                                                   edge.Route("web.example", "default", "two", (32001,))]
    stopped = dataclasses.replace(two, state="stopped")
    assert [(r.domain, r.upstreams, r.why) for r in edge.routes({two.key: stopped}, units)] == [
        ("api.example", (), "stopped"), ("web.example", (), "stopped")]
    assert edge.routes({two.key: two}, units, [two.key]) == []


def test_the_kernel_setting_that_keeps_caddy_from_resetting(tmp_path: pathlib.Path) -> None:
    sysctl = tmp_path / "tcp_migrate_req"
    sysctl.write_text("0\n")
    assert edge.resets_at_config_changes(str(sysctl))
    sysctl.write_text("1\n")
    assert not edge.resets_at_config_changes(str(sysctl))
    assert not edge.resets_at_config_changes(str(tmp_path / "absent"))  # not Linux: nothing known


def test_a_stored_row_holds_its_services_domains(tmp_path: pathlib.Path) -> None:
    two = manifests.parse("apps/two.yaml", TWO).spec
    assert two is not None
    db = store.Store(tmp_path / "state")
    try:
        row = db.ensure_app(two, commit="c1")
        assert row.domains == frozenset({"api.example", "web.example"})
        db.update_app(row.id, services_json=store.services_json(two, []))
        again = db.app(row.id)
        assert again is not None and again.service_domains == [("api", "api.example"), ("web", "Web.example")]
    finally:
        db.close()


def test_cynchrod_status_names_every_domain() -> None:
    row = {"domain": "shop.example", "services": [{"name": "api", "domain": "api.example"}, {"name": "db",
                                                                                                 "domain": None}]}
    assert client._domains(row) == "shop.example, api.example (api)"
    assert client._domains({"domain": None, "services": []}) == ""


@pytest.mark.parametrize("listen,tls_listen,url", [
    (":80", "", "http://a.example.com/"),                          # a real edge: no port to type
    ("0.0.0.0:80", "", "http://a.example.com/"),
    ("127.0.0.1:41234", "", "http://a.example.com:41234/"),       # the demo's edge
    ("[::1]:8080", "", "http://a.example.com:8080/"),
    (":80", ":443", "https://a.example.com/"),                    # TLS there: the link is https
    (":8080", "127.0.0.1:8443", "https://a.example.com:8443/"),
])
def test_a_domains_link_goes_to_the_edges_public_port(listen: str, tls_listen: str, url: str) -> None:
    assert edge.link("a.example.com", listen=listen, tls_listen=tls_listen) == url
