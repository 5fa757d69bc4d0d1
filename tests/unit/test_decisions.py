"""The decision core against the in-memory runtime: no Docker, no clock, property tests."""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cynchrod.core import decisions, planning, specs
from cynchrod.core.errors import ManifestError, PermanentError, RuntimeFailure
from cynchrod.runtime.memory import MemoryRuntime


@dataclasses.dataclass(frozen=True)
class Row:
    status: str = decisions.RUNNING
    last_error: str | None = None
    deployed_hash: str | None = None
    source: str = "repo"
    refusal: str | None = None
    note: str | None = None
    created_at: str = "2026-01-01"
    domains: frozenset[str] = frozenset()


def service(name: str, image: str, replicas: int) -> specs.ServiceSpec:
    return specs.ServiceSpec(name=name, image=image, memory=64, replicas=replicas)


@st.composite
def apps(draw: Any) -> dict[tuple[str, str], specs.AppSpec]:
    out = {}
    for i in range(draw(st.integers(0, 5))):
        names = draw(st.sampled_from([("main",), ("web", "db"), ("a", "b", "c")]))
        services = tuple(service(n, draw(st.sampled_from(["img:1", "img:2"])), draw(st.integers(1, 3)))
                         for n in names)
        spec = specs.AppSpec(org=draw(st.sampled_from(["o1", "o2"])), name=f"app{i}", services=services,
                             state=draw(st.sampled_from(["running", "running", "stopped"])), source="repo")
        out[spec.key] = spec
    return out


@st.composite
def world(draw: Any) -> tuple[dict[tuple[str, str], specs.AppSpec], MemoryRuntime]:
    """Desired apps, and an engine holding some of them in any state (stale, dead, extra, foreign)."""
    desired = draw(apps())
    rt = MemoryRuntime()
    n = 0
    for spec in desired.values():
        for svc in spec.services:
            for replica in range(draw(st.integers(0, svc.replicas + 1))):
                n += 1
                rt.units[f"u{n}"] = planning.Unit(
                    org=spec.org, app=spec.name, service=svc.name, replica=replica, instance=f"u{n}",
                    state=draw(st.sampled_from(planning.STATES)),
                    spec_hash=draw(st.sampled_from([spec.service_hash(svc), "stale"])))
    for i in range(draw(st.integers(0, 2))):  # units of apps no commit declares any more
        rt.units[f"gone{i}"] = planning.Unit(org="o1", app=f"old{i}", service="main", replica=0,
                                             instance=f"gone{i}", state=planning.RUNNING, spec_hash="x")
    return desired, rt


def execute(plan: list[decisions.Decision], rt: MemoryRuntime) -> None:
    for d in plan:
        for action in d.actions:
            rt.apply(action)


def inputs(desired: dict[tuple[str, str], specs.AppSpec], rt: MemoryRuntime, **kw: Any) -> decisions.Inputs:
    kw.setdefault("rows", {k: Row() for k in desired})
    kw.setdefault("max_apps", {"o1": 100, "o2": 100})
    return decisions.Inputs(desired=desired, units=rt.list_units(), now=1000.0, read=frozenset({"repo"}), **kw)


@settings(max_examples=300, deadline=None)
@given(world())
def test_deciding_again_after_applying_finds_nothing_to_do(w: Any) -> None:
    desired, rt = w
    execute(decisions.decide(inputs(desired, rt)), rt)
    again = decisions.decide(inputs(desired, rt))
    assert [a.describe() for d in again for a in d.actions] == []
    restarting = {u.key for u in rt.units.values() if u.state == planning.RESTARTING}
    for d in again:
        if d.spec is not None and d.key not in restarting:  # the engine is restarting it: left alone
            assert d.status == (decisions.STOPPED if d.spec.state == "stopped" else decisions.RUNNING)
    # Every declared replica runs (or is being restarted by the engine), once.
    up = (planning.RUNNING, planning.RESTARTING)
    running = sorted((u.key, u.service, u.replica) for u in rt.units.values() if u.state in up)
    want = sorted((s.key, svc.name, r) for s in desired.values() if s.state == "running"
                  for svc in s.services for r in range(svc.replicas))
    assert running == want


@settings(max_examples=300, deadline=None)
@given(world(), st.data())
def test_the_in_sync_shortcut_decides_as_the_full_decision(w: Any, data: Any) -> None:
    desired, rt = w
    execute(decisions.decide(inputs(desired, rt)), rt)  # many apps in sync, and some left as they were
    for u in data.draw(st.lists(st.sampled_from(sorted(rt.units)), unique=True, max_size=3)) if rt.units else []:
        rt.units[u] = dataclasses.replace(rt.units[u], state=data.draw(st.sampled_from(planning.STATES)))
    rows = {k: Row(last_error=data.draw(st.sampled_from([None, "oom_killed: it died", "other"])),
                   deployed_hash=data.draw(st.sampled_from([None, s.hash]))) for k, s in desired.items()}
    given_inputs = inputs(desired, rt, rows=rows, trigger=data.draw(st.sampled_from(["poll", "push"])))
    units: dict[tuple[str, str], list[planning.Unit]] = {}
    for u in given_inputs.units:
        units.setdefault(u.key, []).append(u)
    for d in decisions.decide(given_inputs):
        if d.spec is None:
            continue
        mine = units.get(d.key, [])
        assert d == decisions._decide_app(given_inputs, d.spec, mine, rows.get(d.key), decisions.Backoff(), None)


@settings(max_examples=200, deadline=None)
@given(world())
def test_a_source_error_never_prunes(w: Any) -> None:
    desired, rt = w
    rows = {k: Row() for k in desired} | {("o1", "old0"): Row(), ("o1", "old1"): Row()}
    unread = inputs({}, rt, rows=rows)  # the repository could not be read: nothing desired
    unread = dataclasses.replace(unread, read=frozenset(), all_read=False)
    assert [d for d in decisions.decide(unread) if d.prune or any(a.kind == "remove" for a in d.actions)] == []
    read = dataclasses.replace(unread, read=frozenset({"repo"}), all_read=True)
    assert {d.key for d in decisions.decide(read) if d.prune} == set(rows) | {u.key for u in rt.units.values()}


@settings(max_examples=200, deadline=None)
@given(apps(), st.integers(0, 4), st.data())
def test_an_admitted_app_is_never_refused_by_quota(desired: Any, cap: int, data: Any) -> None:
    admitted = set(data.draw(st.sets(st.sampled_from(sorted(desired)))) if desired else set())
    rows = {k: Row() for k in admitted}
    plan = decisions.decide(inputs(desired, MemoryRuntime(), rows=rows, max_apps={"o1": cap, "o2": cap}))
    refused = {d.key for d in plan if d.failure is not None and d.failure.code == "quota_exceeded"}
    assert not refused & admitted
    for org in ("o1", "o2"):
        mine = [k for k in desired if k[0] == org]
        room = max(cap - len([k for k in admitted if k[0] == org]), 0)
        assert len([k for k in mine if k not in refused]) == len([k for k in mine if k in admitted]) + min(
            room, len([k for k in mine if k not in admitted]))


def test_every_failure_backs_off_and_a_permanent_one_waits_for_a_new_spec() -> None:
    spec = specs.AppSpec(org="o1", name="a", services=(service("main", "img:1", 1),), source="repo")
    rt = MemoryRuntime()
    memory = decisions.Backoff()
    now = 1000.0
    waits = []
    for _ in range(4):
        [d] = decisions.decide(dataclasses.replace(inputs({spec.key: spec}, rt), memory={spec.key: memory},
                                                   now=now))
        assert d.actions and d.retry_in is None
        memory = decisions.after_failure(d.memory, RuntimeFailure("port is taken"), spec_hash=spec.hash, now=now)
        [held] = decisions.decide(dataclasses.replace(inputs({spec.key: spec}, rt), memory={spec.key: memory},
                                                      now=now))
        assert not held.actions and held.retry_in is not None
        waits.append(held.retry_in)
        now += held.retry_in
    assert waits == [1.0, 2.0, 4.0, 8.0]
    blocked = decisions.after_failure(decisions.Backoff(), PermanentError("no"), spec_hash=spec.hash, now=now)
    [d] = decisions.decide(dataclasses.replace(inputs({spec.key: spec}, rt), memory={spec.key: blocked},
                                               now=now + 10_000))
    assert not d.actions and d.status == decisions.FAILED
    changed = dataclasses.replace(spec, services=(service("main", "img:2", 1),))
    [d] = decisions.decide(dataclasses.replace(inputs({changed.key: changed}, rt), memory={spec.key: blocked},
                                               now=now + 10_000))
    assert d.actions


def test_self_heal_backs_off_0_0_1_2_4() -> None:
    spec = specs.AppSpec(org="o1", name="a", services=(service("main", "img:1", 1),), source="repo")
    rt = MemoryRuntime()
    rt.units["x"] = planning.Unit(org="o1", app="a", service="main", replica=0, instance="x",
                                  state=planning.EXITED, spec_hash=spec.service_hash(spec.services[0]), exit_code=3)
    rows = {spec.key: Row(deployed_hash=spec.hash)}
    memory, now, gaps, last = decisions.Backoff(), 0.0, [], 0.0
    while len(gaps) < 5:
        [d] = decisions.decide(dataclasses.replace(inputs({spec.key: spec}, rt, rows=rows),
                                                   memory={spec.key: memory}, now=now))
        if d.actions:
            assert d.trigger == "self-heal"
            gaps.append(now - last)
            last, memory = now, d.memory
            now += 0.0
        else:
            assert d.error is not None and d.error.startswith("crash_loop: exited with code 3")
            now += d.retry_in or 0
    assert gaps == [0.0, 0.0, 1.0, 2.0, 4.0]


def test_one_home_for_names_and_caps() -> None:
    import json
    import pathlib

    from cynchrod.desired import config
    from cynchrod.shell import control

    schema = json.loads((pathlib.Path(__file__).parents[2] / "schemas" / "app.schema.json").read_text())
    assert schema["properties"]["org"]["pattern"] == specs.NAME_PATTERN
    assert schema["properties"]["name"]["pattern"] == specs.NAME_PATTERN
    assert config.DEFAULT_MAX_APPS == decisions.DEFAULT_MAX_APPS == config.Settings().max_apps("x")
    assert not hasattr(control, "DEFAULT_MAX_APPS")
    # A row refused for quota holds no place, for the API's count as for the passes'.
    rows = {("o", "a"): Row(), ("o", "b"): Row(status="failed", last_error="quota_exceeded: full",
                                                                refusal="quota_exceeded")}
    assert decisions.admitted(rows, "o") == 1


def test_a_refused_new_version_says_the_previous_one_is_serving() -> None:
    """failed stays the status; ``serving`` says whether an earlier version still runs."""
    good = specs.AppSpec(org="o1", name="a", services=(service("main", "img:1", 1),), source="repo")
    bad = ManifestError("memory is in MB: write 64, not '64MB'", code="invalid_type", path="apps/a.yaml", line=3)
    rt = MemoryRuntime()
    unit = planning.Unit(org="o1", app="a", service="main", replica=0, instance="x", state=planning.RUNNING,
                         spec_hash=good.service_hash(good.services[0]))
    rows = {good.key: Row(deployed_hash=good.hash)}

    def decide(*units: planning.Unit, **kw: Any) -> decisions.Decision:
        rt.units = {u.instance: u for u in units}
        [d] = decisions.decide(inputs({good.key: good}, rt, rows=rows, **kw))
        return d

    # The file now fails: the last good spec keeps running.
    d = decide(unit, manifest_errors={good.key: [bad]})
    assert (d.status, d.serving, d.actions) == (decisions.FAILED, decisions.PREVIOUS, ())
    # Its unit died meanwhile: it is put back (the last good spec), and serves once that is done.
    d = decide(dataclasses.replace(unit, state=planning.EXITED), manifest_errors={good.key: [bad]})
    assert d.actions and (d.status, d.serving) == (decisions.FAILED, decisions.PREVIOUS)
    # A hold (a missing secret) on a new spec: the old units are not touched, and serve.
    changed = dataclasses.replace(good, services=(service("main", "img:2", 1),))
    rt.units = {"x": unit}
    [d] = decisions.decide(inputs({changed.key: changed}, rt, rows=rows,
                                  holds={changed.key: PermanentError("no secret", code="secret_missing")}))
    assert (d.status, d.serving) == (decisions.FAILED, decisions.PREVIOUS)
    # Nothing running: failed, and nothing serves.
    [d] = decisions.decide(inputs({changed.key: changed}, MemoryRuntime(), rows=rows,
                                  holds={changed.key: PermanentError("no secret", code="secret_missing")}))
    assert (d.status, d.serving) == (decisions.FAILED, None)
    # A crash loop: failed, its unit is not running.
    d = decide(dataclasses.replace(unit, state=planning.EXITED, exit_code=1),
               memory={good.key: decisions.Backoff(heals=3, last_heal=999.0)})
    assert (d.status, d.serving) == (decisions.FAILED, None)
    # Running apps serve what they declare: no ``serving``.
    assert decide(unit).serving is None
    assert decisions.previous_serving([unit], failed_hashes=frozenset()) is True
    assert decisions.previous_serving([unit], failed_hashes=frozenset({unit.spec_hash})) is False
