"""The reconciler's pass pipeline without Docker: a work-tree source in tmp, the in-memory runtime,
a real store (SQLite in tmp). Each stage alone (decide, record), and the pass's rules on fetching
and on its lock, shown with hooks rather than timing."""

from __future__ import annotations

import dataclasses
import pathlib
import threading
from collections.abc import Callable, Iterator

import pytest

from cynchrod import store
from cynchrod.core import decisions, planning, specs
from cynchrod.core.errors import RuntimeFailure, SourceError
from cynchrod.desired import source
from cynchrod.runtime import memory
from cynchrod.shell import builds as builds_mod
from cynchrod.shell import reconciler
from cynchrod.shell.scheduling import Scheduler, Wakeup


def manifest(name: str, extra: str = "") -> str:
    return f"name: {name}\nimage: img:1\ncommand: [sleep, '3600']\nmemory: 64\n{extra}"


class Tree(source.WorkTreeSource):
    """A work-tree source whose fetch calls a hook first (the test's view into when it runs)."""

    def __init__(self, root: pathlib.Path) -> None:
        (root / "apps").mkdir(parents=True, exist_ok=True)
        super().__init__(str(root))
        self.on_fetch: Callable[[], None] = lambda: None
        self.fetches = 0

    def fetch(self) -> str:
        self.fetches += 1
        self.on_fetch()
        return super().fetch()

    def write(self, name: str, text: str) -> None:
        (self.root / "apps" / f"{name}.yaml").write_text(text)


class Engine(memory.MemoryRuntime):
    """The in-memory runtime with what builds need of one (every image exists)."""

    def build_image(self, context: pathlib.Path, **kw: object) -> None:
        raise AssertionError("nothing is built here: every image exists")

    def prune_images(self, org: str, app: str, *, keep: int) -> list[str]:
        return []


class BuildRepo:
    """A build repository that counts its fetches."""

    def __init__(self, log: list[str], url: str) -> None:
        self.log, self.url = log, url
        self.mirrored = False

    def fetch(self) -> str:
        self.log.append(self.url)
        self.mirrored = True
        return "c" * 40

    def resolve(self) -> str:
        if not self.mirrored:
            raise SourceError("never fetched", code="source_unavailable")
        return "c" * 40

    def export(self, commit: str, dest: pathlib.Path) -> None:
        raise AssertionError("nothing is built here")


class World:
    def __init__(self, tmp: pathlib.Path) -> None:
        self.tree = Tree(tmp / "repo")
        self.rt = Engine()
        self.db = store.Store(tmp / "state" / "cynchrod.db")
        self.build_fetches: list[str] = []
        self.builds = builds_mod.Builds(state_dir=tmp / "state", rt=self.rt, allow=lambda org, url: True,
                                        open_repo=lambda build, path: BuildRepo(self.build_fetches, build.repo))
        self.rec = reconciler.Reconciler(src=self.tree, rt=self.rt, db=self.db, builds=self.builds,
                                         min_ready=0.0)  # judged ready at once: these tests are about the stages


@pytest.fixture
def world(tmp_path: pathlib.Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.builds.stop()
    w.db.close()


def test_a_pass_deploys_and_the_next_one_finds_nothing_to_do(world: World) -> None:
    world.tree.write("a", manifest("a"))
    world.tree.write("b", manifest("b", "replicas: 2\n"))
    first = world.rec.run_pass("poll")
    assert first.ok and [(a.name, a.status) for a in first.apps] == [("a", "running"), ("b", "running")]
    assert len(world.rt.units) == 3
    again = world.rec.run_pass("poll")
    assert again.ok and all(not a.actions for a in again.apps)
    assert world.db.live_apps()[("default", "b")].status == decisions.RUNNING


def test_progress_counts_each_app_once_in_order_from_the_pass_thread(world: World) -> None:
    """``done`` was counted (``done += 1``) and reported from the pool's threads, unlocked."""
    for i in range(8):
        world.tree.write(f"a{i:02d}", manifest(f"a{i:02d}"))
    seen: list[tuple[int, int, str]] = []
    world.rec.progress = lambda done, total, what: seen.append((done, total, threading.current_thread().name))
    world.rec.run_pass("poll")
    assert [(done, total) for done, total, _ in seen] == [(i, 8) for i in range(1, 9)]
    assert {name for _, _, name in seen} == {threading.current_thread().name}


def test_a_preview_fetches_outside_the_pass_lock_so_a_pass_runs_meanwhile(world: World) -> None:
    """A page load (``preview``) waiting on a slow remote no longer holds up a self-heal."""
    world.tree.write("a", manifest("a"))
    world.rec.run_pass("poll")
    fetching, release = threading.Event(), threading.Event()
    locked_while_fetching: list[bool] = []

    def slow_remote() -> None:
        locked_while_fetching.append(world.rec._pass_lock.locked())
        fetching.set()
        assert release.wait(30)

    world.tree.on_fetch = slow_remote
    previews: list[list[planning.Action]] = []
    preview = threading.Thread(target=lambda: previews.append(world.rec.preview()[1]))
    preview.start()
    try:
        assert fetching.wait(30)
        assert locked_while_fetching == [False]
        # The preview is parked in its fetch: a self-heal pass (which does not fetch) runs now.
        world.tree.on_fetch = lambda: None
        assert world.rec._pass_lock.acquire(timeout=30), "the preview holds the pass lock while it fetches"
        world.rec._pass_lock.release()
        healed = world.rec.run_pass("self-heal")
        assert healed.ok
    finally:
        release.set()
        preview.join(30)
    assert previews == [[]]


def build_manifest(name: str, repo: str) -> str:
    return f"name: {name}\nbuild: {{repo: {repo}}}\nmemory: 64\n"


def test_only_passes_that_fetch_the_manifests_fetch_build_repos(world: World) -> None:
    world.tree.write("web", build_manifest("web", "https://example.invalid/web.git"))
    world.tree.write("api", build_manifest("api", "https://example.invalid/api.git"))
    world.rec.run_pass("poll")
    assert sorted(world.build_fetches) == ["https://example.invalid/api.git", "https://example.invalid/web.git"]
    assert world.db.live_apps()[("default", "web")].status == decisions.RUNNING
    world.build_fetches.clear()
    for trigger in ("self-heal", "build"):
        assert world.rec.run_pass(trigger).ok
    _, actions = world.rec.preview()
    assert actions == []
    assert world.build_fetches == []  # none: they read the commit the last fetch gave
    world.rec.run_pass("webhook")
    assert len(world.build_fetches) == 2


def test_a_preview_never_fetches_a_build_repo_it_has_not_seen(world: World) -> None:
    world.tree.write("web", build_manifest("web", "https://example.invalid/web.git"))
    result, actions = world.rec.preview()
    assert actions == [] and result.ok
    assert world.build_fetches == []
    assert not world.builds.busy()  # and queues no build for it
    world.rec.run_pass("self-heal")  # a pass that never read the source fetches it, and the repo
    assert world.build_fetches == ["https://example.invalid/web.git"]


def unit_of(spec: specs.AppSpec, *, state: str = planning.RUNNING) -> planning.Unit:
    service = spec.services[0]
    return planning.Unit(org=spec.org, app=spec.name, service=service.name, replica=0, instance="u1", state=state,
                         spec_hash=spec.service_hash(service))


# -- each stage alone ------------------------------------------------------------------


def plan_of(world: World, trigger: str = "poll") -> tuple[reconciler.PassResult, decisions.Inputs,
                                                          list[decisions.Decision]]:
    """The first three stages, as ``_run`` calls them."""
    result = reconciler.PassResult(commit=None, trigger=trigger)
    rows = world.db.live_apps()
    inputs = world.rec._observe(world.rec._desired(result, rows), rows, result)
    return result, inputs, world.rec._decide(inputs)


def test_the_desired_stage_reads_the_tree_and_reports_what_belongs_to_no_app(world: World) -> None:
    world.tree.write("a", manifest("a"))
    world.tree.write("broken", "name: [\n")
    result = reconciler.PassResult(commit=None, trigger="poll")
    wanted = world.rec._desired(result, world.db.live_apps())
    assert list(wanted.specs) == [("default", "a")] and wanted.specs[("default", "a")].source == world.tree.url
    assert wanted.read == {world.tree.url} and wanted.all_read
    assert result.commit is not None and result.commit.startswith("worktree:")
    assert [p.path for p in result.problems] == ["apps/broken.yaml"] and result.manifest_errors
    assert world.rt.units == {}  # nothing acted on


def test_decide_alone_on_what_the_in_memory_engine_runs(world: World) -> None:
    world.tree.write("a", manifest("a"))
    world.tree.write("b", manifest("b"))
    _, inputs, plan = plan_of(world)
    assert [(d.key[1], [a.kind for a in d.actions]) for d in plan] == [("a", ["create"]), ("b", ["create"])]
    b = inputs.desired[("default", "b")]
    world.rt.units["u1"] = unit_of(b)  # b runs already; a's unit died
    world.rt.units["u2"] = unit_of(inputs.desired[("default", "a")], state=planning.EXITED)
    world.rt.units["u2"] = dataclasses.replace(world.rt.units["u2"], instance="u2")
    _, _, plan = plan_of(world)
    assert {d.key[1]: [a.kind for a in d.actions] for d in plan} == {"a": ["start"], "b": []}
    assert world.db.live_apps() == {}  # deciding writes nothing


def test_record_alone_writes_what_execution_did(world: World) -> None:
    world.rec._clock = lambda: 0.0
    world.rec.wakeup = Wakeup(Scheduler(clock=lambda: 0.0, threaded=False))
    world.tree.write("ok", manifest("ok"))
    world.tree.write("bad", manifest("bad"))
    result, _, plan = plan_of(world)
    by_name = {d.key[1]: d for d in plan}
    rows = {}
    for name, d in by_name.items():
        assert d.spec is not None
        row = world.db.ensure_app(d.spec, commit=result.commit)
        rows[name] = (row, world.db.start_deployment(row.id, commit=result.commit, trigger="poll",
                                                     spec_hash=d.spec.hash))
    ok_spec = by_name["ok"].spec
    assert ok_spec is not None  # what execution left serving, in the view, for the readiness gate to judge
    with world.rec.view.acting() as since:
        world.rec.view.put([planning.Unit(org="default", app="ok", service=s.name, replica=0, instance="seen",
                                          state=planning.RUNNING, spec_hash=ok_spec.service_hash(s))
                            for s in ok_spec.services], since=since)
    executed = [
        reconciler.Executed(by_name["ok"], rows["ok"][0], rows["ok"][1]),
        reconciler.Executed(by_name["bad"], rows["bad"][0], rows["bad"][1],
                            error=RuntimeFailure("the engine said no")),
    ]
    seen: list[tuple[int, int]] = []
    world.rec.progress = lambda done, total, what: seen.append((done, total))
    world.rec._record(plan, executed, world.db.live_apps(), result)
    assert [(a.name, a.status) for a in result.apps] == [("bad", "failed"), ("ok", "running")]
    assert seen == [(1, 2), (2, 2)]
    live = world.db.live_apps()
    ok, bad = live[("default", "ok")], live[("default", "bad")]
    assert ok.status == decisions.RUNNING and ok.deployed_hash == by_name["ok"].spec.hash  # type: ignore[union-attr]
    assert bad.status == decisions.FAILED and bad.last_error is not None and "the engine said no" in bad.last_error
    assert world.db.deployment(rows["bad"][1]).error_code == "runtime_error"  # type: ignore[union-attr]
    # A temporary failure backs off and wakes a self-heal pass when the back-off ends.
    assert world.rec._memory[("default", "bad")].failures == 1 and ("default", "ok") not in world.rec._memory
    assert world.rec.wakeup.scheduler.due_in() == 1.0
    assert world.rt.units == {}  # recording acts on nothing


def test_execute_alone_acts_and_leaves_the_outcome_to_record(world: World) -> None:
    world.tree.write("ok", manifest("ok"))
    world.tree.write("bad", manifest("bad"))
    result, inputs, plan = plan_of(world)
    world.rt.fail[("default", "bad")] = RuntimeFailure("the engine said no")
    ran = {e.decision.key[1]: e for e in world.rec._execute(plan, inputs, world.db.live_apps(), result)}
    assert ran["ok"].error is None and isinstance(ran["bad"].error, RuntimeFailure)
    assert [u.app for u in world.rt.units.values()] == ["ok"]
    # Execution says where the work is (a worker took it), never how it ended.
    assert {k[1]: a.status for k, a in world.db.live_apps().items()} == {"ok": "deploying", "bad": "deploying"}
    assert world.rec._memory == {} and result.apps == []


def test_a_requested_pass_is_answered_by_the_next_pass_that_fetches(world: World) -> None:
    world.tree.write("a", manifest("a"))
    world.tree.write("b", manifest("b", "secrets: [pw]\n"))
    asked = world.db.request_pass(trigger="webhook", commit=None)
    world.rec.run_pass("self-heal")  # puts back the last fetch: not the pass the delivery asked for
    assert world.db.pass_record(asked).status == "queued"  # type: ignore[union-attr]
    result = world.rec.run_pass("webhook")
    found = world.db.pass_record(asked)
    assert found is not None and found.status == "done" and found.commit == result.commit
    assert [(a["app"], a["status"]) for a in found.apps] == [("a", "running"), ("b", "failed")]
    assert found.apps[1]["error"].startswith("secret_missing")
    generation = world.db.generation()
    world.rec.run_pass("poll")  # nobody asked: nothing recorded, nothing written
    assert world.db.generation() == generation
