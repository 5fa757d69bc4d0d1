"""The event-fed view's invalidation logic (``runtime.view``) and what the swarm driver's events
invalidate (``swarm.Stale``, ``SwarmRuntime.reread``), with fakes: no engine."""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cynchrod import runtime
from cynchrod.core import planning
from cynchrod.core.errors import EngineUnavailable
from cynchrod.runtime import swarm, view

OWNER, INSTANCE = "o", "i1"


def unit(app: str, instance: str, state: str = planning.RUNNING, service: str = "main") -> runtime.Unit:
    return runtime.Unit(org="d", app=app, service=service, replica=0, instance=instance, state=state,
                        spec_hash="h", spec_json="{}")


class FakeRuntime:
    """``list_units`` answers what ``units`` holds and counts; ``during_list`` runs inside it."""

    def __init__(self, units: list[runtime.Unit]) -> None:
        self.units = units
        self.lists = 0
        self.during_list: Callable[[], None] = lambda: None

    def list_units(self) -> list[runtime.Unit]:
        self.lists += 1
        self.during_list()
        return list(self.units)


def make_view(units: list[runtime.Unit]) -> tuple[view.View, FakeRuntime, list[runtime.Event]]:
    rt = FakeRuntime(units)
    changes: list[runtime.Event] = []
    v = view.View(rt, on_change=changes.append)  # type: ignore[arg-type]
    v.apply_event(runtime.Event(runtime.RELIST))
    v._live = True  # as when its event thread follows the engine
    changes.clear()
    return v, rt, changes


def stale(units: list[runtime.Unit], *keys: tuple[str, str, str], during: Callable[[], None] = lambda: None,
          reads: list[int] | None = None) -> runtime.Event:
    def read() -> runtime.Listing:
        if reads is not None:
            reads.append(1)
        during()
        return runtime.Listing(tuple(units), frozenset(keys) if keys else None)
    return runtime.Event(runtime.STALE, read=read)


def held(v: view.View) -> dict[str, str]:
    return {u.instance: u.state for u in v.snapshot()}


def test_a_live_view_answers_passes_without_a_read_and_a_resync_relists() -> None:
    v, rt, _ = make_view([unit("a", "t1")])
    for _ in range(5):
        assert held(v) == {"t1": planning.RUNNING}
    assert rt.lists == 1  # the relist at the stream's start, none since
    v.resync_s = 0
    v.snapshot()
    assert rt.lists == 2


def test_a_stale_part_replaces_that_part_alone_and_wakes_only_on_a_change() -> None:
    v, rt, changes = make_view([unit("a", "a1"), unit("a", "a2", service="db"), unit("b", "b1")])
    # Service a/main read again: its task a1 died and a3 replaced it; a/db and b are not touched.
    v.apply_event(stale([unit("a", "a1", planning.EXITED), unit("a", "a3", planning.RESTARTING)],
                        ("d", "a", "main")))
    assert held(v) == {"a1": planning.EXITED, "a3": planning.RESTARTING, "a2": planning.RUNNING,
                       "b1": planning.RUNNING}
    assert [e.kind for e in changes] == [runtime.STALE]
    assert [u.instance for u in v.app_units("d", "a")] == ["a2", "a1", "a3"]
    # Read again with nothing new: no wake-up.
    v.apply_event(stale([unit("a", "a1", planning.EXITED), unit("a", "a3", planning.RESTARTING)],
                        ("d", "a", "main")))
    assert len(changes) == 1
    # A removed service: its part read again holds nothing.
    v.apply_event(stale([], ("d", "b", "main")))
    assert "b1" not in held(v) and len(changes) == 2 and v.app_units("d", "b") == []
    # Everything (the poll): what the read found, in place of all.
    v.apply_event(stale([unit("a", "a3")]))
    assert held(v) == {"a3": planning.RUNNING}
    assert rt.lists == 1  # none of it was a relist


def test_a_part_read_keeps_what_an_action_put_while_it_read() -> None:
    v, _, _ = make_view([unit("a", "t1")])
    # The read began, then the pass's action replaced t1 by t2 (put, drop), then the read ended
    # with what it saw before: t1 running, no t2.
    def action() -> None:
        with v.acting() as since:
            v.drop(["t1"])
            v.put([unit("a", "t2")], since=since)
    v.apply_event(stale([unit("a", "t1")], ("d", "a", "main"), during=action))
    assert held(v) == {"t2": planning.RUNNING}
    # A read that begins after the action says what it says.
    v.apply_event(stale([unit("a", "t2", planning.EXITED)], ("d", "a", "main")))
    assert held(v) == {"t2": planning.EXITED}


def died(instance: str, app: str = "a") -> runtime.Event:
    return runtime.Event(runtime.STATE, instance, unit(app, instance, planning.EXITED))


def test_an_actions_result_does_not_undo_a_death_told_while_it_ran() -> None:
    """A container that exits as it starts: its die event is applied before the action's result
    (read as it started: running) is put. The view keeps it dead, with the host port the action
    read (an event carries none), and says so to the pass its event wakes (CI: a crash loop held
    as running, never healed, when the event came first)."""
    v, _, _ = make_view([])
    with v.acting() as since:
        v.apply_event(died("a1"))
        v.put([dataclasses.replace(unit("a", "a1"), endpoint=32768)], since=since)
    [a1] = v.snapshot()
    assert (a1.state, a1.endpoint) == (planning.EXITED, 32768)
    # Without an event in between, the action's reading is what the view holds.
    with v.acting() as since:
        v.put([dataclasses.replace(unit("a", "a2"), endpoint=32769)], since=since)
    assert held(v) == {"a1": planning.EXITED, "a2": planning.RUNNING}


def test_an_actions_result_does_not_bring_back_a_removed_unit_nor_undo_a_relist() -> None:
    v, rt, _ = make_view([])
    with v.acting() as since:
        v.apply_event(runtime.Event(runtime.GONE, "a1"))
        v.put([unit("a", "a1")], since=since)
    assert held(v) == {}
    # The death was told, then a relist began after it and found nothing new (it forgets marks
    # older than itself): the action's older reading still does not undo the death.
    with v.acting() as since:
        v.apply_event(died("a2"))
        rt.units = [unit("a", "a2", planning.EXITED)]
        v.relist()
        v.put([unit("a", "a2")], since=since)
    assert held(v) == {"a2": planning.EXITED}
    # Two actions at once: one's result does not hide what the other needs, and once both end
    # the marks are dropped (bounded by the events told while actions ran).
    with v.acting() as first, v.acting() as second:
        v.apply_event(died("b1", "b"))
        v.put([unit("b", "b2")], since=second)
        v.put([unit("b", "b1")], since=first)
    assert held(v) == {"a2": planning.EXITED, "b1": planning.EXITED, "b2": planning.RUNNING}
    assert v._heard == {} and v._open == []


def test_a_relist_that_began_before_a_part_was_read_does_not_undo_it() -> None:
    v, rt, _ = make_view([unit("a", "t1")])
    # A resync's list call is under way (it saw t1 running) when the event thread reads service
    # a again: t1 died, t2 replaces it. The relist ends after: t2 stays, t1 stays exited.
    rt.during_list = lambda: v.apply_event(stale([unit("a", "t1", planning.EXITED), unit("a", "t2")],
                                                 ("d", "a", "main")))
    v.relist()
    assert held(v) == {"t1": planning.EXITED, "t2": planning.RUNNING}
    rt.during_list = lambda: None
    rt.units = [unit("a", "t2")]
    v.relist()  # the next one says what it says
    assert held(v) == {"t2": planning.RUNNING}


def test_a_failed_part_read_breaks_the_stream_and_the_view_relists_on_reconnect(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(view, "RECONNECT_S", 0)
    stop = threading.Event()
    rt = FakeRuntime([unit("a", "t1")])
    streams: list[list[runtime.Event]] = []

    def broken() -> runtime.Listing:
        raise EngineUnavailable("list tasks: docker unreachable")

    class Stream:
        def __init__(self, events: list[runtime.Event]) -> None:
            self.events = events

        def __iter__(self) -> Iterator[runtime.Event]:
            yield from self.events
            stop.wait()  # then quiet until the test ends

        def close(self) -> None:
            pass

    def watch() -> Stream:
        events = [runtime.Event(runtime.RELIST)]
        if not streams:
            events.append(runtime.Event(runtime.STALE, read=broken))
        streams.append(events)
        return Stream(events)

    rt.watch = watch  # type: ignore[attr-defined]
    v = view.View(rt)  # type: ignore[arg-type]
    thread = threading.Thread(target=v.run, args=(stop,), daemon=True)
    thread.start()
    try:
        for _ in range(500):
            if len(streams) == 2 and v._live:
                break
            threading.Event().wait(0.01)
        assert len(streams) == 2 and rt.lists == 2 and v._live and v.error is None
    finally:
        stop.set()
        thread.join(5)


# -- what the swarm driver's events invalidate -------------------------------------------------


def raw(kind: str, action: str, actor: str, **attrs: str) -> dict[str, Any]:
    """An event as the manager sends it (their shape as seen on Docker 20.10.24)."""
    return {"Type": kind, "Action": action, "Actor": {"ID": actor, "Attributes": attrs}}


def test_stale_notes_our_services_our_task_containers_and_nodes() -> None:
    s = swarm.Stale(OWNER)
    assert s.note(raw("service", "update", "svc1", name="o_d_a_main", **{"replicas.new": "2", "replicas.old": "3"}))
    assert s.note(raw("container", "die", "c1", **{"com.docker.swarm.service.id": "svc2",
                                                   "com.docker.swarm.task.id": "t9", runtime.LABEL_OWNER: OWNER}))
    assert (s.specs, s.tasks, s.everything, s.nodes) == ({"svc1"}, {"svc2"}, False, False)
    assert not s.note(raw("service", "create", "svc3", name="other_d_a_main"))
    assert not s.note(raw("container", "die", "c2", **{"com.docker.swarm.service.id": "svc4",
                                                       runtime.LABEL_OWNER: "other"}))
    assert not s.note(raw("container", "die", "c3", **{runtime.LABEL_OWNER: OWNER}))  # not a task: a build's
    assert s.note(raw("node", "update", "n1", name="node3", **{"state.new": "down", "state.old": "ready"}))
    assert s.everything and s.nodes and s.specs == {"svc1"} and s.tasks == {"svc2"}


def service(sid: str, app: str, replicas: int = 1) -> dict[str, Any]:
    labels = {runtime.LABEL_OWNER: OWNER, runtime.LABEL_INSTANCE: INSTANCE, runtime.LABEL_ORG: "d",
              runtime.LABEL_APP: app, runtime.LABEL_SERVICE: "main"}
    spec = {"Name": f"o_d_{app}_main", "Labels": labels, "Mode": {"Replicated": {"Replicas": replicas}}}
    spec["Labels"] = {**labels, swarm.LABEL_APPLIED: swarm.spec_digest(spec)}
    return {"ID": sid, "Version": {"Index": 1}, "Spec": spec}


def task(tid: str, sid: str, app: str, state: str = "running", slot: int = 1, version: int = 1,
         desired: str = "running") -> dict[str, Any]:
    labels = {runtime.LABEL_OWNER: OWNER, runtime.LABEL_INSTANCE: INSTANCE, runtime.LABEL_ORG: "d",
              runtime.LABEL_APP: app, runtime.LABEL_SERVICE: "main", runtime.LABEL_HASH: "h"}
    return {"ID": tid, "ServiceID": sid, "Slot": slot, "DesiredState": desired, "Version": {"Index": version},
            "NodeID": "", "Status": {"State": state}, "Spec": {"ContainerSpec": {"Labels": labels}}}


class FakeApi:
    """The manager's services and tasks, answering docker-py's ``services``/``tasks`` as it does."""

    def __init__(self, services: list[dict[str, Any]], tasks: list[dict[str, Any]]) -> None:
        self.services_now, self.tasks_now = services, tasks
        self.calls: list[str] = []

    def services(self, filters: dict[str, Any]) -> list[dict[str, Any]]:
        self.calls.append(f"services {sorted(filters)}")
        ids = filters.get("id")
        return [s for s in self.services_now if ids is None or s["ID"] in ids]

    def tasks(self, filters: dict[str, Any]) -> list[dict[str, Any]]:
        self.calls.append(f"tasks {sorted(filters)}")
        wanted = filters.get("service")
        if wanted is not None:
            known = {s["ID"] for s in self.services_now}
            if any(w not in known for w in wanted):
                import docker.errors
                raise docker.errors.NotFound(f"service {wanted} not found")
        return [t for t in self.tasks_now if wanted is None or t["ServiceID"] in wanted]


def swarm_rt(api: FakeApi) -> swarm.SwarmRuntime:
    rt = swarm.SwarmRuntime(owner=OWNER, instance=INSTANCE, base_url="unix:///nonexistent/docker.sock")
    rt.api = api
    return rt


def stale_of(*, specs: set[str] = frozenset(), tasks: set[str] = frozenset(),  # type: ignore[assignment]
             everything: bool = False) -> swarm.Stale:
    s = swarm.Stale(OWNER)
    s.specs, s.tasks, s.everything = set(specs), set(tasks), everything
    return s


def states(listing: runtime.Listing) -> dict[str, str]:
    return {u.instance: u.state for u in listing.units}


def test_reread_reads_what_is_stale_alone_through_the_streams_connection() -> None:
    main = FakeApi([service("s1", "a"), service("s2", "b")], [task("t1", "s1", "a"), task("t2", "s2", "b")])
    rt = swarm_rt(main)
    assert {u.instance for u in rt.list_units()} == {"t1", "t2"}
    assert len(main.calls) == 2 and rt.calls == 2 and rt.poll_s == swarm.POLL_S
    stream = FakeApi(main.services_now, main.tasks_now)
    # A task of s1 died (on the manager: its container's event): s1's tasks alone, one call.
    stream.tasks_now = [task("t1", "s1", "a", "failed"), task("t2", "s2", "b")]
    found = rt.reread(stream, stale_of(tasks={"s1"}))
    assert states(found) == {"t1": planning.EXITED} and found.scope == {("d", "a", "main")}
    assert stream.calls == ["tasks ['service']"] and rt.watch_calls == 1 and rt.calls == 2
    assert rt.poll_s == swarm.SETTLE_S  # a task not running: the stream polls soon
    # The poll: every task, one call, the services as last read.
    stream.calls.clear()
    stream.tasks_now = [task("t1", "s1", "a", "shutdown", desired="shutdown"), task("t3", "s1", "a", version=2),
                        task("t2", "s2", "b")]
    found = rt.reread(stream, stale_of(everything=True))
    assert states(found) == {"t3": planning.RUNNING, "t2": planning.RUNNING} and found.scope is None
    assert stream.calls == ["tasks ['label']"] and rt.poll_s == swarm.POLL_S
    # A service event: that service's spec and tasks (two calls); a removed one is an empty part.
    stream.calls.clear()
    stream.services_now = [service("s1", "a", replicas=2)]
    stream.tasks_now = [task("t3", "s1", "a", version=2), task("t4", "s1", "a", "pending", slot=2)]
    found = rt.reread(stream, stale_of(specs={"s1", "s2"}))
    assert states(found) == {"t3": planning.RUNNING, "t4": planning.RESTARTING}
    assert found.scope == {("d", "a", "main"), ("d", "b", "main")}
    assert stream.calls == ["services ['id']", "tasks ['service']"]
    assert set(rt._services) == {"s1"} and rt.calls == 2


def test_reread_of_a_service_removed_meanwhile_reads_every_task() -> None:
    main = FakeApi([service("s1", "a"), service("s2", "b")], [task("t1", "s1", "a"), task("t2", "s2", "b")])
    rt = swarm_rt(main)
    rt.list_units()
    stream = FakeApi([service("s2", "b")], [task("t2", "s2", "b")])  # s1 went after its event
    found = rt.reread(stream, stale_of(tasks={"s1", "s2"}))
    assert states(found) == {"t2": planning.RUNNING}
    assert stream.calls == ["tasks ['service']", "tasks ['label']"]


def test_a_relist_that_began_before_a_removal_was_read_does_not_bring_the_service_back() -> None:
    main = FakeApi([service("s1", "a")], [task("t1", "s1", "a")])
    rt = swarm_rt(main)
    rt.list_units()
    began = rt._began()  # a relist begins; it will see s1
    rt.reread(FakeApi([], []), stale_of(specs={"s1"}))  # s1's remove event, read after
    rt._listed(began, main.tasks_now, None, services=main.services_now)  # the relist ends
    assert rt._services == {}
    rt.list_units()  # a later one says what it says
    assert set(rt._services) == {"s1"}


def test_the_stream_coalesces_events_into_one_stale_part_and_polls_between(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(swarm, "POLL_S", 0.05)
    rt = swarm_rt(FakeApi([service("s1", "a")], [task("t1", "s1", "a")]))
    rt.list_units()
    events: queue.Queue[dict[str, Any]] = queue.Queue()

    class Api:
        def events(self, **kw: Any) -> Iterator[dict[str, Any]]:
            while True:
                yield events.get()

    stream = rt.watch()
    stream._client = type("Client", (), {"api": Api(), "close": lambda self: None})()
    it = iter(stream)
    try:
        assert next(it).kind == runtime.RELIST
        events.put(raw("service", "update", "s1", name="o_d_a_main"))
        events.put(raw("container", "die", "c1", **{"com.docker.swarm.service.id": "s2",
                                                    runtime.LABEL_OWNER: OWNER}))
        events.put(raw("service", "update", "x", name="other_d_a_main"))  # not ours
        first = next(it)
        assert first.kind == runtime.STALE and first.read is not None
        part = first.read.args[1]  # type: ignore[attr-defined]
        assert (part.specs, part.tasks, part.everything) == ({"s1"}, {"s2"}, False)
        # Nothing comes: the poll, every task.
        polled = next(it)
        assert polled.kind == runtime.STALE and polled.read.args[1].everything  # type: ignore[union-attr]
    finally:
        stream.close()


def test_units_keep_their_fields_through_a_part_read() -> None:
    """What the view holds after a part read is what the driver's reread made (no field lost)."""
    rt = swarm_rt(FakeApi([service("s1", "a")], [task("t1", "s1", "a")]))
    v = view.View(rt)
    v.apply_event(runtime.Event(runtime.RELIST))
    stream = FakeApi(rt.api.services_now, [task("t1", "s1", "a", "failed")])
    v.apply_event(runtime.Event(runtime.STALE, read=lambda: rt.reread(stream, stale_of(tasks={"s1"}))))
    (only,) = v.app_units("d", "a")
    expected = rt.reread(FakeApi(rt.api.services_now, stream.tasks_now), stale_of(tasks={"s1"})).units[0]
    assert dataclasses.asdict(only) == dataclasses.asdict(expected) and only.state == planning.EXITED


def test_reread_of_a_removed_service_and_its_containers_events_asks_for_no_tasks_of_it() -> None:
    main = FakeApi([service("s1", "a"), service("s2", "b")], [task("t1", "s1", "a"), task("t2", "s2", "b")])
    rt = swarm_rt(main)
    rt.list_units()
    stream = FakeApi([service("s2", "b")], [task("t2", "s2", "b")])
    # ``docker service rm``: the service's remove event and its task containers' destroy events.
    found = rt.reread(stream, stale_of(specs={"s1"}, tasks={"s1"}))
    assert found.units == () and found.scope == {("d", "a", "main")}
    assert stream.calls == ["services ['id']"]
