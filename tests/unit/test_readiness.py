"""The pure readiness core (``core.health``): verdicts from engine facts, with fake units."""

from __future__ import annotations

import dataclasses

import pytest

from cynchrod.core import health, planning, specs
from cynchrod.core.specs import AppSpec, Healthcheck, ServiceSpec

WEB = ServiceSpec(name="main", image="img", port=8080)
CHECKED = ServiceSpec(name="main", image="img", healthcheck=Healthcheck(test=("CMD", "true")))
PLAIN = ServiceSpec(name="main", image="img")
ONESHOT = ServiceSpec(name="migrate", image="img", oneshot=True)
POLICY = health.Policy(min_ready=2.0, timeout=60.0)


def unit(service: ServiceSpec = PLAIN, *, state: str = planning.RUNNING, health_: str = "", code: int | None = None,
         spec: AppSpec | None = None, replica: int = 0) -> planning.Unit:
    app = spec or AppSpec(org="o", name="a", services=(service,))
    return planning.Unit(org="o", app="a", service=service.name, replica=replica, instance=f"{service.name}{replica}",
                         state=state, spec_hash=app.service_hash(service), exit_code=code, health=health_)


def verdict(u: planning.Unit | None, service: ServiceSpec, *, now: float,
            port_open: bool | None = None) -> health.Verdict:
    return health.unit_verdict(u, service, POLICY, since=100.0, now=now, port_open=port_open)


def test_without_a_healthcheck_a_unit_is_ready_after_min_ready() -> None:
    early = verdict(unit(), PLAIN, now=101.0)
    assert (early.state, early.check_at) == (health.WAITING, 102.0)
    assert verdict(unit(), PLAIN, now=102.0).state == health.READY


def test_a_port_is_probed_once_up_for_min_ready_and_must_accept() -> None:
    asked = verdict(unit(WEB), WEB, now=102.0)
    assert asked.state == health.WAITING and asked.probe
    assert verdict(unit(WEB), WEB, now=102.0, port_open=True).state == health.READY
    refused = verdict(unit(WEB), WEB, now=102.0, port_open=False)
    assert refused.state == health.WAITING and refused.check_at == 102.0 + health.PROBE_EVERY_S
    late = verdict(unit(WEB), WEB, now=160.0, port_open=False)
    assert late.state == health.UNHEALTHY and "port 8080" in late.reason


@pytest.mark.parametrize(("said", "now", "want"), [
    ("", 110.0, health.WAITING), (health.STARTING, 110.0, health.WAITING), (health.HEALTHY_CHECK, 100.5, health.READY),
    (health.UNHEALTHY_CHECK, 101.0, health.UNHEALTHY), (health.STARTING, 160.0, health.UNHEALTHY)])
def test_a_healthcheck_decides_alone(said: str, now: float, want: str) -> None:
    assert verdict(unit(CHECKED, health_=said), CHECKED, now=now).state == want


def test_exits_crash_with_their_code_and_a_oneshot_exiting_0_completes() -> None:
    crashed = verdict(unit(state=planning.EXITED, code=3), PLAIN, now=100.5)
    assert (crashed.state, crashed.exit_code) == (health.CRASHED, 3)
    assert "exited with code 3" in crashed.reason
    assert verdict(unit(ONESHOT, state=planning.EXITED, code=0), ONESHOT, now=100.5).state == health.COMPLETED
    assert verdict(unit(ONESHOT, state=planning.EXITED, code=1), ONESHOT, now=100.5).state == health.CRASHED
    assert verdict(unit(PLAIN, state=planning.EXITED, code=0), PLAIN, now=100.5).state == health.CRASHED
    oom = verdict(unit(ONESHOT, state=planning.OOM_KILLED, code=0), ONESHOT, now=100.5)
    assert oom.state == health.CRASHED and "memory limit" in oom.reason


def test_a_running_oneshot_waits_until_its_timeout() -> None:
    assert verdict(unit(ONESHOT), ONESHOT, now=150.0).state == health.WAITING
    assert verdict(unit(ONESHOT), ONESHOT, now=160.0).state == health.UNHEALTHY


def test_a_missing_unit_waits_then_is_unhealthy() -> None:
    assert verdict(None, PLAIN, now=120.0).state == health.WAITING
    assert verdict(None, PLAIN, now=160.0).state == health.UNHEALTHY


def test_the_manifest_keys_override_the_defaults() -> None:
    own = dataclasses.replace(PLAIN, min_ready=0.0, health_timeout=5.0)
    assert health.Policy.of(own) == health.Policy(min_ready=0.0, timeout=5.0)
    assert health.Policy.of(PLAIN, min_ready=0.3) == health.Policy(min_ready=0.3, timeout=health.HEALTH_TIMEOUT_S)


def test_an_app_is_its_worst_unit_and_waits_for_the_earliest_check() -> None:
    v = health.Verdict
    assert health.app_verdict([v(health.READY), v(health.COMPLETED)]).state == health.READY
    assert health.app_verdict([v(health.COMPLETED)]).state == health.COMPLETED
    waiting = health.app_verdict([v(health.READY), v(health.WAITING, check_at=5.0),
                                  v(health.WAITING, check_at=3.0, probe=True)])
    assert (waiting.state, waiting.check_at, waiting.probe) == (health.WAITING, 3.0, True)
    assert health.app_verdict([v(health.UNHEALTHY), v(health.CRASHED, exit_code=2)]).exit_code == 2


def test_judge_counts_only_the_units_of_the_spec_and_every_replica() -> None:
    web = dataclasses.replace(PLAIN, name="web", replicas=2)
    app = AppSpec(org="o", name="a", services=(ONESHOT, web))
    done = unit(ONESHOT, state=planning.EXITED, code=0, spec=app)
    first = unit(web, spec=app)
    assert health.judge(app, [done, first], since=100.0, now=103.0).state == health.WAITING  # replica 1 missing
    second = unit(web, spec=app, replica=1)
    assert health.judge(app, [done, first, second], since=100.0, now=103.0).state == health.READY
    old = dataclasses.replace(second, spec_hash="old", state=planning.EXITED, exit_code=1)
    assert health.judge(app, [done, first, old], since=100.0, now=103.0).state == health.WAITING


def test_depends_on_conditions() -> None:
    exited0 = unit(ONESHOT, state=planning.EXITED, code=0)
    assert planning.condition_met(planning.SERVICE_COMPLETED, [exited0], ONESHOT)
    assert not planning.condition_met(planning.SERVICE_COMPLETED, [unit(ONESHOT)], ONESHOT)
    assert not planning.condition_met(planning.SERVICE_COMPLETED, [], ONESHOT)
    assert not planning.condition_met(planning.SERVICE_HEALTHY, [unit(CHECKED, health_=health.STARTING)], CHECKED)
    assert planning.condition_met(planning.SERVICE_HEALTHY, [unit(CHECKED, health_=health.HEALTHY_CHECK)], CHECKED)
    assert planning.condition_met(planning.SERVICE_STARTED, [unit()], PLAIN)


@pytest.mark.parametrize(("status", "want"), [
    ("deploying", health.PROGRESSING), ("queued", health.PROGRESSING), ("running", health.HEALTHY),
    ("stopped", health.HEALTHY), ("failed", health.DEGRADED), ("unknown", health.UNKNOWN)])
def test_app_health_in_argo_cds_words(status: str, want: str) -> None:
    assert health.app_health(status) == want


def test_the_new_keys_change_no_hash_and_old_rows_read_back() -> None:
    """Upgrade safety: a spec stored before these keys reads back, and the keys do not remake containers."""
    plain = AppSpec(org="o", name="a", services=(PLAIN,))
    keyed = AppSpec(org="o", name="a", services=(dataclasses.replace(PLAIN, oneshot=True, min_ready=1.0,
                                                                     health_timeout=9.0),), on_failure="rollback")
    assert plain.hash == keyed.hash
    old = plain.to_json()
    for service in old["services"]:
        for key in ("oneshot", "min_ready", "health_timeout"):
            del service[key]
    del old["on_failure"]
    assert AppSpec.from_json(old) == plain
    assert AppSpec.from_json(keyed.to_json()) == keyed
    assert specs.AppSpec.from_json(plain.to_json()).services[0].depends_on_conditions == ()


SHOP = b"""name: shop
on_failure: rollback
services:
  migrate: {image: img, oneshot: true}
  web:
    image: img
    min_ready: 5
    health_timeout: 90
    depends_on: {migrate: {condition: service_completed_successfully}}
"""


def test_a_manifest_declares_the_keys_and_depends_on_as_a_map() -> None:
    from cynchrod.desired import manifests
    result = manifests.parse("apps/shop.yaml", SHOP)
    assert result.errors == (), result.errors
    spec = result.spec
    assert spec is not None and spec.on_failure == "rollback"
    migrate, web = spec.services
    assert migrate.oneshot and not web.oneshot
    assert (web.depends_on, web.depends_on_conditions) == (("migrate",), (("migrate", planning.SERVICE_COMPLETED),))
    assert (web.min_ready, web.health_timeout) == (5.0, 90.0)
    bad = manifests.parse("apps/shop.yaml", SHOP.replace(b"service_completed_successfully", b"service_done"))
    assert bad.spec is None and bad.errors


def test_the_planner_holds_a_dependent_until_its_condition_and_leaves_a_completed_oneshot() -> None:
    from cynchrod.desired import manifests
    spec = manifests.parse("apps/shop.yaml", SHOP).spec
    assert spec is not None
    migrate = spec.services[0]
    first = planning.plan_app(spec, [], spec.key)
    assert [(a.kind, a.service) for a in first] == [(planning.CREATE, "migrate")]
    done = planning.Unit(org="default", app="shop", service="migrate", replica=0, instance="m", state=planning.EXITED,
                         spec_hash=spec.service_hash(migrate), exit_code=0)
    assert [(a.kind, a.service) for a in planning.plan_app(spec, [done], spec.key)] == [(planning.CREATE, "web")]
    failed = dataclasses.replace(done, exit_code=1)
    assert [(a.kind, a.service) for a in planning.plan_app(spec, [failed], spec.key)] == [(planning.START, "migrate")]


def test_swarm_facts_a_task_killed_as_unhealthy_and_one_that_ended_since_the_deploy() -> None:
    """Swarm kills a task whose healthcheck fails (it reads stopped, its health ``unhealthy``) and
    starts another in its slot: the ended task of the spec decides its slot over the replacement."""
    killed = verdict(unit(CHECKED, state=planning.EXITED, code=143, health_=health.UNHEALTHY_CHECK), CHECKED,
                     now=101.0)
    assert (killed.state, killed.exit_code) == (health.UNHEALTHY, 143)
    assert "healthcheck reports unhealthy" in killed.reason
    slow = verdict(unit(CHECKED, state=planning.RESTARTING, health_=health.STARTING), CHECKED, now=160.0)
    assert slow.state == health.UNHEALTHY and "not healthy within 60s" in slow.reason
    app = AppSpec(org="o", name="a", services=(PLAIN,))
    replacement = unit(state=planning.RESTARTING)
    crashed = unit(state=planning.EXITED, code=3)
    assert health.judge(app, [replacement], since=100.0, now=101.0).state == health.WAITING
    got = health.judge(app, [replacement], since=100.0, now=101.0, ended=[crashed])
    assert (got.state, got.exit_code) == (health.CRASHED, 3)
    other = dataclasses.replace(crashed, spec_hash="another")  # a task of another spec does not count
    assert health.judge(app, [replacement], since=100.0, now=101.0, ended=[other]).state == health.WAITING
