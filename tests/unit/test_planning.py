"""The planner is pure: frozen values in, actions out, no Docker."""

from __future__ import annotations

import dataclasses

import pytest

from cynchrod.core import planning, specs


def app(**overrides: object) -> specs.AppSpec:
    service = specs.ServiceSpec(name=specs.MAIN_SERVICE, image="img:1", command=("sleep", "9"),
                                env=(("A", "1"),), port=8080, cpu=1.0, memory=128)
    service_fields = {k: overrides.pop(k) for k in list(overrides) if k in {f.name for f in
                                                                           dataclasses.fields(service)}}
    service = dataclasses.replace(service, **service_fields)  # type: ignore[arg-type]
    return specs.AppSpec(org="default", name="web", services=(service,), path="apps/web.yaml",
                         **overrides)  # type: ignore[arg-type]


def running(spec: specs.AppSpec, *, state: str = "running", cid: str = "c1", replica: int = 0,
            **kw: object) -> planning.Unit:
    service = spec.services[0]
    return planning.Unit(instance=cid, org=spec.org, app=spec.name, service=service.name, replica=replica,
                         spec_hash=spec.service_hash(service), state=state,
                         spec_json=service.canonical(restarted_at=spec.restarted_at), **kw)  # type: ignore[arg-type]


def kinds(actions: list[planning.Action]) -> list[tuple[str, str]]:
    return [(a.kind, a.app) for a in actions]


def test_create_when_missing() -> None:
    spec = app()
    actions = planning.plan({spec.key: spec}, [])
    assert kinds(actions) == [("create", "web")]
    assert actions[0].reason == "missing"
    assert actions[0].service_spec == spec.services[0]


def test_noop_when_in_sync() -> None:
    spec = app()
    assert planning.plan({spec.key: spec}, [running(spec)]) == []


@pytest.mark.parametrize("change,key", [
    ({"image": "img:2"}, "image"),
    ({"command": ("sleep", "10")}, "command"),
    ({"env": (("A", "2"),)}, "env"),
    ({"port": 9090}, "port"),
    ({"host_port": 18080}, "host_port"),
    ({"cpu": 2.0}, "cpu"),
    ({"memory": 256}, "memory"),
    ({"restarted_at": "2026-11-28T10:00:00Z"}, "restarted_at"),
])
def test_recreate_on_each_key(change: dict[str, object], key: str) -> None:
    old = app()
    new = app(**change)
    actions = planning.plan({new.key: new}, [running(old)])
    assert kinds(actions) == [("recreate", "web")]
    assert actions[0].reason == f"changed: {key}"
    assert actions[0].unit is not None and actions[0].unit.instance == "c1"


def test_domain_change_needs_no_container_change() -> None:
    old, new = app(), app(domain="web.example")
    assert planning.plan({new.key: new}, [running(old)]) == []


def test_stop_and_start() -> None:
    spec = app(state="stopped")
    assert kinds(planning.plan({spec.key: spec}, [running(spec)])) == [("stop", "web")]
    assert planning.plan({spec.key: spec}, [running(spec, state="exited")]) == []
    assert planning.plan({spec.key: spec}, []) == []  # stopped and absent: nothing to make
    back = app()
    actions = planning.plan({back.key: back}, [running(back, state="exited", exit_code=0)])
    assert kinds(actions) == [("start", "web")]
    assert actions[0].reason == "exited with code 0"


def test_remove_orphan() -> None:
    spec = app()
    actions = planning.plan({}, [running(spec)])
    assert kinds(actions) == [("remove", "web")]
    assert actions[0].reason == "no longer declared"


def test_foreign_containers_are_never_in_the_plan() -> None:
    # Observed only ever holds labelled containers; one of another app is left to that app.
    spec, other = app(), dataclasses.replace(app(), name="other")
    actions = planning.plan({spec.key: spec}, [running(spec), running(other, cid="c2")])
    assert kinds(actions) == [("remove", "other")]
    actions = planning.plan({spec.key: spec, other.key: other}, [running(spec), running(other, cid="c2")])
    assert actions == []


def test_created_container_is_swept_and_remade() -> None:
    spec = app()
    actions = planning.plan({spec.key: spec}, [running(spec, state="created")])
    assert kinds(actions) == [("recreate", "web")]


def test_duplicates_keep_the_best_one() -> None:
    spec = app()
    stale = dataclasses.replace(running(spec, cid="old"), spec_hash="0" * 16)
    actions = planning.plan({spec.key: spec}, [stale, running(spec, cid="good")])
    assert [(a.kind, a.unit.instance if a.unit else None) for a in actions] == [("remove", "old")]


def test_oom_killed_unit_is_started_with_its_reason() -> None:
    spec = app()
    actions = planning.plan({spec.key: spec}, [running(spec, state=planning.OOM_KILLED)])
    assert [(a.kind, a.reason) for a in actions] == [("start", "killed for exceeding its memory limit")]


def test_replicas_are_made_and_trimmed_one_by_one() -> None:
    three = app(replicas=3)
    actions = planning.plan({three.key: three}, [running(three)])
    assert [(a.kind, a.replica) for a in actions] == [("create", 1), ("create", 2)]
    assert three.hash == app().hash  # a count change never remakes the units that run
    one = app()
    actions = planning.plan({one.key: one}, [running(one), running(one, cid="c2", replica=1),
                                             running(one, cid="c3", replica=2, state="exited")])
    assert [(a.kind, a.replica, a.reason) for a in actions] == [
        ("remove", 1, "replica 1 is over replicas: 1"), ("remove", 2, "replica 2 is over replicas: 1")]


def test_hash_is_stable_and_sensitive() -> None:
    assert app().hash == app().hash
    assert app().hash != app(state="stopped").hash
    assert app().service_hash(app().services[0]) != app(memory=129).service_hash(app(memory=129).services[0])


def test_services_start_in_dependency_order_and_change_alone() -> None:
    db = specs.ServiceSpec(name="db", image="db:1")
    cache = specs.ServiceSpec(name="cache", image="c:1")
    web = specs.ServiceSpec(name="web", image="web:1", depends_on=("cache", "db"))
    shop = specs.AppSpec(org="default", name="shop", services=(web, db, cache))
    actions = planning.plan({shop.key: shop}, [])
    assert [(a.kind, a.service) for a in actions] == [("create", "cache"), ("create", "db"), ("create", "web")]

    def observed(spec: specs.AppSpec, service: specs.ServiceSpec) -> planning.Unit:
        return planning.Unit(instance=service.name, org="default", app="shop", replica=0,
                             service=service.name, spec_hash=spec.service_hash(service), state="running",
                             spec_json=service.canonical(restarted_at=None))

    running = [observed(shop, s) for s in shop.services]
    changed = dataclasses.replace(shop, services=(web, dataclasses.replace(db, image="db:2"), cache))
    assert [(a.kind, a.service, a.reason) for a in planning.plan({shop.key: changed}, running)] == [
        ("recreate", "db", "changed: image")]
    fewer = dataclasses.replace(shop, services=(dataclasses.replace(web, depends_on=("db",)), db))
    assert [(a.kind, a.service) for a in planning.plan({shop.key: fewer}, running)] == [
        ("remove", "cache"), ("recreate", "web")]


def test_secret_rotation_changes_the_hash() -> None:
    base = app()
    rotated = dataclasses.replace(base, services=(dataclasses.replace(base.services[0], secret_digest="v2"),))
    assert kinds(planning.plan({rotated.key: rotated}, [running(base)])) == [("recreate", "web")]
    assert planning.plan({rotated.key: rotated}, [running(base)])[0].reason == "changed: secret_digest"
