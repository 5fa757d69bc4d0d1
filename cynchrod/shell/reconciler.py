"""The reconciler: the imperative shell around the pure decisions.

Called by ``cynchrod sync`` (one pass), ``cynchrod plan`` (``preview``) and the
daemon (``serve``: a loop woken by the timer, webhooks, watched files, the API,
finished builds and the engine's events). A pass is its pipeline, one method each
(``_run``):

    desired (``desired_state``: fetch, parse once per blob, resolve secret digests
             and built image tags; holds for what is missing)
    → observe (the view's units: no engine call when nothing changed; back-off memory; the time)
    → decide (``decisions.decide``: pure)
    → execute (the edge's routes and the runtime: bounded concurrency, one app's actions
               in sequence; yields each app as it ends)
    → record (store rows and deployments, back-off memory, the pass's result).

It owns: the view of the engine (``view.View``, fed by the engine's events), the
wake-up queue (``scheduling.Wakeup``, with its one thread for delayed wake-ups), each
app's back-off memory, and the build queue's results. It never imports ``docker``: it
speaks to a ``runtime.Runtime``. Passes are level-based and one at a time; a
failing app is that app's own retried error, never the pass's.

Over 500 lines (about 640), on purpose for now: the execute and record stages and the
loop share the state a pass carries over (back-off memory, the view, the per-app field
cache, the wake-up queue); moving record into a module of its own would hand all of it
across. The desired stage, which has state of its own, is ``desired_state``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import gc
import json
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from typing import TypeVar

from cynchrod import edge as edge_mod
from cynchrod import runtime, store
from cynchrod.core import decisions, health, planning, specs
from cynchrod.core.codes import Code
from cynchrod.core.decisions import TRIGGERS
from cynchrod.core.errors import CynchrodError, ManifestError, StateUnwritable
from cynchrod.desired import secrets as secrets_mod
from cynchrod.desired import source
from cynchrod.runtime import view
from cynchrod.shell import builds as builds_mod
from cynchrod.shell import desired_state, gates, metrics
from cynchrod.shell.scheduling import Wakeup, strongest

log = logging.getLogger("cynchrod.reconciler")  # the name the logs have always shown
T = TypeVar("T")
_NO_MEMORY = decisions.Backoff()
#: ``sync``'s wait between passes while a deployment's readiness is judged.
SYNC_GATE_WAIT_S = 0.1

#: Actions after which a deployment's units are judged for readiness.
_STARTS = frozenset({planning.CREATE, planning.RECREATE, planning.START})

__all__ = ["TRIGGERS", "PassResult", "Reconciler"]


@dataclasses.dataclass
class AppOutcome:
    org: str
    name: str
    status: str
    actions: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None


@dataclasses.dataclass
class PassResult:
    #: The commit of the first (primary) source.
    commit: str | None
    trigger: str
    manifest_errors: list[str] = dataclasses.field(default_factory=list)
    apps: list[AppOutcome] = dataclasses.field(default_factory=list)
    duration_s: float = 0.0
    #: Per source URL, the commit read this pass.
    commits: dict[str, str] = dataclasses.field(default_factory=dict)
    source_errors: list[str] = dataclasses.field(default_factory=list)
    #: Errors of files that declare no deployed app (the rest are their apps' own errors).
    problems: list[store.Problem] = dataclasses.field(default_factory=list)

    @property
    def source_error(self) -> str | None:
        return "; ".join(self.source_errors) or None

    def commit_of(self, spec: specs.AppSpec) -> str | None:
        return self.commits.get(spec.source, self.commit)

    @property
    def ok(self) -> bool:
        return not self.source_error and not self.manifest_errors and all(
            a.status != decisions.FAILED for a in self.apps)


@dataclasses.dataclass(frozen=True)
class Executed:
    """What executing one app's decision did; the record stage writes it down."""

    decision: decisions.Decision
    #: The app's row and the deployment the actions ran under (None: the store could not be written).
    row: store.App | None = None
    deployment: int | None = None
    #: The error that stopped the app's actions (those after it were not run).
    error: CynchrodError | None = None
    #: Why a healed unit had died (code, message), when it was OOM-killed.
    note: tuple[Code, str] | None = None

    @property
    def described(self) -> list[str]:
        return [a.describe() for a in self.decision.actions]


def _merge(result: PassResult, later: PassResult) -> None:
    """``sync``'s answer: the pass that acted, each app's outcome as the later passes that judged its
    deployment left it (their actions, a dependent a condition held, added to its own)."""
    outcomes = {(a.org, a.name): a for a in result.apps}
    for app in later.apps:
        mine = outcomes.get((app.org, app.name))
        if mine is None:
            result.apps.append(app)
            continue
        mine.status, mine.error = app.status, app.error
        mine.actions.extend(app.actions)
    result.apps.sort(key=lambda a: (a.org, a.name))


def freeze_heap() -> None:
    """Collect garbage, then hide every object alive now from the cyclic collector (``gc.freeze``).

    Called after a pass that loaded a new commit: the specs, rows and units of thousands of
    apps live until the next commit, and the collector's passes over them were half of a
    no-op decision's time at 10,000 apps. Unfreezing first lets the collection see the
    previous commit's objects, so nothing that became garbage stays frozen for ever.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class Reconciler:
    def __init__(self, *, src: source.Followed | Sequence[source.Followed], rt: runtime.Runtime, db: store.Store,
                 concurrency: int = 4, clock: Callable[[], float] = time.monotonic,
                 stats: metrics.Metrics | None = None, secrets: secrets_mod.Secrets | None = None,
                 max_apps: Callable[[str], int] = lambda org: decisions.DEFAULT_MAX_APPS,
                 builds: builds_mod.Builds | None = None, resync_s: float = view.RESYNC_S,
                 edge: edge_mod.Edge | None = None, min_ready: float | None = None) -> None:
        #: The repositories followed; the first is where apps created through the API go
        #: unless another one is pinned to the app's org.
        self.sources = [src] if isinstance(src, source.Followed) else list(src)
        self.source = self.sources[0]
        self.secrets = secrets
        self.builds = builds
        self.stats = stats or metrics.Metrics()
        self.runtime = rt
        #: Routes each app's domain (re-asserted before and after each pass acts).
        self.edge = edge
        self.store = db
        self.concurrency = concurrency
        #: The desired stage: the sources' parse caches and what each last declared.
        self.desired = desired_state.DesiredState(sources=self.sources, db=db, secrets=secrets, builds=builds,
                                                  max_apps=max_apps)
        self.caches = self.desired.caches
        self.wakeup = Wakeup()
        self.view = view.View(rt, resync_s=resync_s, on_change=self._on_event)
        self._clock = clock
        #: Each acted-on app's readiness gate (``gates``): ``deploying`` until its units are ready.
        # Readiness is timed on the clock given here (real seconds: min_ready, health_timeout), not on
        # ``_clock``, which a test may freeze to skip a back-off.
        self.gates = gates.Gates(rt=rt, db=db, clock=clock, min_ready=min_ready, book=self._book,
                                 wake=lambda delay: self.wakeup.request_at(delay, "self-heal"))
        self.gates.on_ready = self._healthy
        self.gates.on_failed = self._roll_back
        #: Apps whose deployment failed its readiness with ``on_failure: rollback``: the failed
        #: spec's hash, the last healthy spec put back in its place, and the error (until a new spec).
        self._rollbacks: dict[tuple[str, str], tuple[str, specs.AppSpec, str]] = {}
        self._memory: dict[tuple[str, str], decisions.Backoff] = {}
        self._fields: dict[tuple[str, str], tuple[specs.AppSpec, tuple[runtime.Unit, ...], dict[str, object]]] = {}
        self._pass_lock = threading.Lock()
        self.interval = 30.0
        #: When the last pass ended, and whether it crashed (for /healthz).
        self.last_pass_at: float | None = None
        self.last_crash: str | None = None
        #: Called with (done, total, what) while a pass acts (``cynchrod sync`` shows it), from
        #: the pass's own thread, once per app as each ends.
        self.progress: Callable[[int, int, str], None] | None = None
        #: Why the store could not be written, while it cannot (for /healthz).
        self.state_error: str | None = None
        #: The problems last written to the store (None: none written by this process yet).
        self._problems_written: list[store.Problem] | None = None
        if builds is not None:
            builds.on_done = lambda: self.wakeup.request("build")
            builds.open_deployment = self._open_build
            builds.fail_deployment = lambda deployment, exc: self.store.finish_deployment(
                deployment, status=decisions.FAILED, error_code=exc.code, error=exc.message)

    @property
    def max_apps(self) -> Callable[[str], int]:
        """Each org's cap (the daemon replaces it when the config is reloaded)."""
        return self.desired.max_apps

    @max_apps.setter
    def max_apps(self, value: Callable[[str], int]) -> None:
        self.desired.max_apps = value

    @property
    def log_manifest_errors(self) -> bool:
        """Log each manifest error of a newly read commit (the daemon); ``plan`` and ``sync``
        print them in their own output instead, so each is shown once."""
        return self.desired.log_manifest_errors

    @log_manifest_errors.setter
    def log_manifest_errors(self, value: bool) -> None:
        self.desired.log_manifest_errors = value

    def _open_build(self, spec: specs.AppSpec) -> int:
        """The deployment a build runs under (its log is that deployment's build log)."""
        app = self.store.ensure_app(spec, commit=None)
        return self.store.start_deployment(app.id, commit=app.commit, trigger="build", spec_hash="")

    def _on_event(self, event: runtime.Event) -> None:
        """The view changed: a unit died or vanished wakes a self-heal pass at once, and so does a
        relist or a part read again that changed (a swarm replaced a task: the pass records it)."""
        if event.kind in (runtime.RELIST, runtime.STALE) \
                or (event.unit is not None and (event.unit.state != planning.RUNNING or event.unit.health)) \
                or event.kind == runtime.GONE or event.oom:
            self.wakeup.request("self-heal")

    # -- one pass ---------------------------------------------------------------

    def run_pass(self, trigger: str = "poll") -> PassResult:
        with self._pass_lock:
            started = time.perf_counter()
            result = PassResult(commit=None, trigger=trigger)
            claimed = self._claim(trigger)
            try:
                self._run(result)
                if self.desired.new_commit:
                    self.desired.new_commit = False
                    freeze_heap()
            except Exception as exc:
                self.stats.passes.labels(trigger, "error").inc()
                self.last_crash = f"{type(exc).__name__}: {exc}"
                raise
            else:
                self.last_crash = None
                self.stats.passes.labels(trigger, "ok" if result.ok else "failed").inc()
            finally:
                result.duration_s = time.perf_counter() - started
                self.last_pass_at = time.monotonic()
                self.stats.pass_seconds.observe(result.duration_s)
                self._book(lambda: self._note_pass(result))
                if claimed:
                    self._book(lambda: self.store.finish_passes(
                        claimed, commit=result.commit, source_error=result.source_error or self.last_crash,
                        apps=[{"org": a.org, "app": a.name, "status": a.status, "error": a.error}
                              for a in result.apps]))
            return result

    def _claim(self, trigger: str) -> list[int]:
        """The passes a webhook asked for, which this one answers if it fetches (``store/passes.py``)."""
        if trigger in desired_state.NO_FETCH_TRIGGERS:
            return []
        try:
            return self.store.claim_passes()
        except CynchrodError as exc:  # the next pass takes them
            log.warning("requested passes not taken: %s", exc)
            return []

    def _run(self, result: PassResult) -> None:
        """One pass, one call per stage. Execute yields each app as it ends and record writes
        it down then, so an app's row shows its end while other apps still act."""
        rows = self.store.live_apps()
        wanted = self._desired(result, rows)
        inputs = self._observe(wanted, rows, result)
        # The open readiness gates are judged on what the view shows now, before deciding on it.
        self.gates.judge(inputs.desired, inputs.units, rows)
        inputs = self._rolled_back(dataclasses.replace(inputs, gates=self.gates.decided()))
        plan = [self._rollback_status(d) for d in self._decide(inputs)]
        with contextlib.closing(self._execute(plan, inputs, rows, result)) as executed:
            self._record(plan, executed, rows, result)
        self.desired.prune_files(lambda: self.store.live_apps().values())

    def sync(self, trigger: str = "poll", *, build_timeout: float = 1800) -> PassResult:
        """One pass, and one more after each round of builds it queued (``cynchrod sync``)."""
        result = self.run_pass(trigger)
        while self.builds is not None and self.builds.busy():
            self.builds.wait_idle(build_timeout)
            result = self.run_pass("build")
        # Then until every deployment it made is judged: with no event thread here (the view relists
        # on each pass), a short wait between passes stands in for the events (bounded by the
        # gates' own timeouts).
        while self.gates.pending() is not None:
            time.sleep(SYNC_GATE_WAIT_S)
            _merge(result, self.run_pass("self-heal"))
        return result

    def preview(self) -> tuple[PassResult, list[planning.Action]]:
        """What a pass would do now, changing nothing (``cynchrod plan``, the dashboard).

        The sources are fetched before the pass lock is taken: a page load waiting on a slow
        remote never holds up a pass (a self-heal above all). Build repositories are not
        fetched at all (``desired_state``)."""
        result = PassResult(commit=None, trigger=desired_state.PREVIEW)
        fetched = self.desired.fetch(result.trigger)
        with self._pass_lock:
            rows = self.store.live_apps()
            inputs = self._observe(self._desired(result, rows, fetched), rows, result)
            inputs = dataclasses.replace(inputs, gates=self.gates.decided())
            return result, [a for d in self._decide(inputs) for a in d.actions]

    def _note_pass(self, result: PassResult) -> None:
        last = {"commit": result.commit, "trigger": result.trigger, "source_error": result.source_error,
                "manifest_errors": result.manifest_errors}
        # Written only when it says something new: a no-op pass writes nothing.
        if {k: v for k, v in (self.store.meta("last_pass") or {}).items() if k != "at"} != last:
            self.store.set_meta("last_pass", {**last, "at": store.now()})
        # Not from a pass that crashed half-way, nor before every source has been read once.
        known = self.last_crash is None and self.desired.problems_known
        if known and result.problems != self._problems_written:
            self.store.set_problems(result.problems)
            self._problems_written = list(result.problems)

    # -- on_failure: rollback ---------------------------------------------------------

    def _healthy(self, key: tuple[str, str], spec: specs.AppSpec) -> None:
        """A deployment passed its readiness: its spec is the app's last healthy one (in the store)."""
        row = self.store.live_app(*key)
        if row is not None and row.healthy_spec != spec.json_text and key not in self._rollbacks:
            self._book(lambda: self.store.update_app(row.id, healthy_spec=spec.json_text))

    def _roll_back(self, key: tuple[str, str], gate: gates.Gate) -> None:
        """A deployment failed its readiness: with ``on_failure: rollback``, the last healthy spec
        goes back on the engine (not in Git) from this pass on, until the app's spec changes."""
        if gate.spec.on_failure != health.ROLLBACK:
            return
        row = self.store.live_app(*key)
        if row is None or not row.healthy_spec:
            log.warning("%s/%s: no healthy version to roll back to; the failed one is kept", *key)
            return
        previous = dataclasses.replace(specs.AppSpec.from_json(json.loads(row.healthy_spec)), path=gate.spec.path,
                                       source=gate.spec.source, on_failure=gate.spec.on_failure)
        if previous.hash == gate.spec.hash:
            return
        log.warning("%s/%s: rolling back to the last healthy version", *key)
        self._rollbacks[key] = (gate.spec.hash, previous, f"{gate.error}; rolled back to the previous version")
        self.gates.mark(key, serving=decisions.PREVIOUS)

    def _rolled_back(self, inputs: decisions.Inputs) -> decisions.Inputs:
        """The last healthy spec in place of a declared one that failed (until the declared one changes)."""
        if not self._rollbacks:
            return inputs
        desired = dict(inputs.desired)
        for key, (failed, previous, _) in list(self._rollbacks.items()):
            declared = desired.get(key)
            if declared is None or declared.hash != failed:
                del self._rollbacks[key]  # a new commit: it is deployed (and judged) as any other
                continue
            desired[key] = previous
        return dataclasses.replace(inputs, desired=desired)

    def _rollback_status(self, d: decisions.Decision) -> decisions.Decision:
        """A rolled-back app stays ``failed — previous version running`` until a new commit."""
        rolled = self._rollbacks.get(d.key)
        if rolled is None or d.spec is not rolled[1] or d.status not in (decisions.RUNNING, decisions.DEPLOYING):
            return d
        return dataclasses.replace(d, status=decisions.FAILED, error=rolled[2], serving=decisions.PREVIOUS,
                                   trigger="rollback" if d.actions else d.trigger)

    # -- the stages ----------------------------------------------------------------

    def _desired(self, result: PassResult, rows: dict[tuple[str, str], store.App],
                 fetched: desired_state.Fetched | None = None) -> desired_state.Wanted:
        """Desired: what the sources declare (fetched now unless ``fetched`` is given), resolved."""
        wanted = self.desired.read(fetched or self.desired.fetch(result.trigger), rows, trigger=result.trigger)
        result.commits.update(wanted.commits)
        result.commit = wanted.commit
        result.source_errors.extend(wanted.source_errors)
        result.manifest_errors.extend(wanted.errors)
        result.problems.extend(wanted.problems)
        return wanted

    def _observe(self, wanted: desired_state.Wanted, rows: dict[tuple[str, str], store.App],
                 result: PassResult) -> decisions.Inputs:
        """Observe: the units the view holds (no engine call when nothing changed), each app's
        back-off memory and the time, beside the desired state and the store's rows."""
        return decisions.Inputs(
            desired=wanted.specs, rows=rows, units=self.view.snapshot(), now=self._clock(), trigger=result.trigger,
            manifest_errors=wanted.manifest_errors, holds=wanted.holds, waiting=wanted.waiting,
            memory=dict(self._memory), read=wanted.read, all_read=wanted.all_read, max_apps=wanted.max_apps,
            ages=wanted.ages)

    @staticmethod
    def _decide(inputs: decisions.Inputs) -> list[decisions.Decision]:
        """Decide: pure (``decisions.decide``)."""
        started = time.perf_counter()
        plan = decisions.decide(inputs)
        log.debug("decided %d apps: %.1f ms", len(plan), (time.perf_counter() - started) * 1000)
        return plan

    def _execute(self, plan: Sequence[decisions.Decision], inputs: decisions.Inputs,
                 rows: dict[tuple[str, str], store.App], result: PassResult) -> Generator[Executed, None, None]:
        """Execute: the edge's routes, then the actions of every app acted on, ``concurrency``
        apps at a time and one app's actions in sequence, then the routes again. Yields each
        app's ``Executed`` as it ends (the record stage writes it down at once).

        Besides acting it writes the two statuses that say where an app's work is: ``queued``
        (decided, no worker yet) and ``deploying`` (a worker took it); record writes the rest."""
        self._sync_edge(inputs, plan)
        acting = [d for d in plan if d.acts or d.prune]
        if not acting:
            return
        built = self._queue(acting, result)
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            running = [pool.submit(self._prune if d.prune else self._apply, d, result, built.get(d.key),
                                   rows.get(d.key)) for d in acting]
            for ended in concurrent.futures.as_completed(running):
                yield ended.result()
        self._sync_edge(inputs, plan)

    def _record(self, plan: Sequence[decisions.Decision], executed: Iterable[Executed],
                rows: dict[tuple[str, str], store.App], result: PassResult) -> None:
        """Record: each app's row and deployment, its back-off memory and its outcome in ``result``:
        first the apps not acted on, then each acted-on app as its execution ends (``progress``
        counts them here, in the pass's thread)."""
        # The apps not acted on are written before ``executed`` is first drawn from, that is
        # before any app acts, on purpose: they wait for nothing the actions do, and written
        # after them a new commit's rows (the commit on every row, a failing manifest's error, a
        # quota refusal, a held app's reason and its back-off wake-up) would show only once the
        # pass's slowest deploy ends, or never if the daemon is killed during it. It is one
        # store transaction; the acted-on apps' rows are written by then only as ``queued``.
        self._book(lambda: self._settle_all(plan, rows, result))
        total = sum(d.acts or d.prune for d in plan)
        for done, ran in enumerate(executed, 1):
            outcome = self._recorded(ran, result)
            result.apps.append(outcome)
            if self.progress is not None:
                self.progress(done, total, "; ".join(outcome.actions) or "/".join(ran.decision.key))
        result.apps.sort(key=lambda a: (a.org, a.name))

    def _sync_edge(self, inputs: decisions.Inputs, plan: Sequence[decisions.Decision]) -> None:
        """The edge's routes for the desired apps and the units now running; drift is put back.
        An unreachable edge is logged and retried next pass: it never stops a pass."""
        if self.edge is None:
            return
        taken = [d.key for d in plan if d.failure is not None and d.failure.code == Code.DOMAIN_TAKEN]
        try:
            self.edge.sync(edge_mod.routes(inputs.desired, self.view.snapshot(), taken))
        except CynchrodError as exc:
            log.warning("edge: %s; retried next pass", exc)

    # -- execute -------------------------------------------------------------------

    def _queue(self, acting: Sequence[decisions.Decision], result: PassResult) -> dict[tuple[str, str], int | None]:
        """Each app about to be acted on is ``queued`` until a worker takes it (what the API shows
        meanwhile). A repo app's deploy continues the deployment its build ran under (returned)."""
        built: dict[tuple[str, str], int | None] = {}
        for d in acting:
            if d.spec is not None:
                built[d.key] = self.builds.deployment_of(d.spec) if self.builds is not None else None
                row = self._book(lambda d=d: self._row(d.spec, result))  # type: ignore[misc]
                if built[d.key] is None and row is not None and self.gates.deployment_of(d.spec) is None:
                    self._book(lambda r=row, d=d: self.store.ensure_queued(  # type: ignore[misc]
                        r.id, commit=result.commit_of(d.spec), trigger=d.trigger))
        return built

    def _apply(self, d: decisions.Decision, result: PassResult, build_deployment: int | None,
               live: store.App | None) -> Executed:
        """One app's actions, in a worker: its deployment goes ``deploying``, then each action runs."""
        spec = d.spec
        assert spec is not None
        row = self._book(lambda: self._row(spec, result)) or live
        # A deployment still being judged continues (a dependent its condition held starts now).
        deployment = self.gates.deployment_of(spec)
        if deployment is None and row is not None:
            deployment = self._book(lambda: self.store.start_deployment(
                row.id, commit=result.commit_of(spec), trigger=d.trigger, spec_hash=spec.hash,
                build_deployment=build_deployment))
        note: tuple[Code, str] | None = None
        kind = ""
        try:
            if d.trigger == "self-heal":
                note = self._death_note(d)
            if spec.secret_names and self.secrets is not None and any(a.kind != planning.STOP for a in d.actions):
                self.secrets.stage(spec)
            for action in d.actions:
                kind = action.kind
                log.info("%s", action.describe())
                with self.view.acting() as since:
                    served = self.runtime.apply(action)
                    if action.unit is not None and action.kind in (planning.REMOVE, planning.RECREATE):
                        self.view.drop([action.unit.instance])
                    if action.kind == planning.STOP and action.unit is not None:
                        self.view.put([dataclasses.replace(action.unit, state=planning.EXITED)], since=since)
                    self.view.put(served, since=since)
                self.stats.actions.labels(action.kind, "ok").inc()
        except CynchrodError as exc:
            self.stats.actions.labels(kind, "failed").inc()
            return Executed(d, row, deployment, error=exc)
        if self.builds is not None:
            self.builds.prune(spec)
        return Executed(d, row, deployment, note=note)

    def _prune(self, d: decisions.Decision, result: PassResult, build_deployment: int | None,
               live: store.App | None) -> Executed:
        """Declared nowhere any more (by a source that was read): its units and resources go
        (record removes its row)."""
        org, name = d.key
        try:
            for action in d.actions:
                log.info("prune %s", action.describe())
                self.runtime.apply(action)
                if action.unit is not None:
                    self.view.drop([action.unit.instance])
            self._remove_resources(org, name)
        except CynchrodError as exc:
            return Executed(d, live, error=exc)
        return Executed(d, live)

    def _remove_resources(self, org: str, app: str) -> None:
        """What a deleted app leaves besides units: network, built images, staged secrets."""
        self.runtime.remove_app(org, app)
        if self.secrets is not None:
            self.secrets.unstage(org, app)

    def _death_note(self, d: decisions.Decision) -> tuple[Code, str] | None:
        """Why a unit being healed died, when it was OOM-killed."""
        for action in d.actions:
            unit, service = action.unit, action.service_spec
            if unit is None or service is None or not unit.stopped:
                continue
            oom = unit.state == planning.OOM_KILLED or self.runtime.exit_details(unit)[1]
            if oom:
                return Code.OOM_KILLED, (f"service {service.name} of {d.key[0]}/{d.key[1]} was killed for "
                                      f"exceeding its memory limit of {service.memory} MB; restarted")
        return None

    # -- record --------------------------------------------------------------------

    def _settle_all(self, plan: Sequence[decisions.Decision], rows: dict[tuple[str, str], store.App],
                    result: PassResult) -> None:
        # One store transaction for every app not acted on: a new commit touches each
        # app's row (its commit), and one sync per row made a pass over 300 apps slow.
        with self.store.batch():
            for d in plan:
                if not (d.acts or d.prune):
                    settled = self._book(lambda d=d: self._settle(d, rows.get(d.key), result))  # type: ignore[misc]
                    result.apps.append(settled or AppOutcome(d.key[0], d.key[1], d.status, error=d.error))

    def _recorded(self, ran: Executed, result: PassResult) -> AppOutcome:
        """An acted-on app's end: pruned, failed or done."""
        if ran.decision.prune:
            return self._record_pruned(ran, result)
        if ran.error is not None:
            return self._record_failed(ran, ran.error, result)
        return self._record_done(ran, result)

    def _record_pruned(self, ran: Executed, result: PassResult) -> AppOutcome:
        d, row = ran.decision, ran.row
        org, name = d.key
        if ran.error is not None:
            log.warning("prune of %s/%s failed: %s", org, name, ran.error)
            return AppOutcome(org, name, decisions.FAILED, ran.described, str(ran.error))
        if row is not None:
            log.info("removed %s/%s: no longer declared by %s", org, name, row.source or "the repository")
            self._book(lambda: self.store.remove_app(row.id, commit=result.commit, trigger=result.trigger))
        self._memory.pop(d.key, None)
        self.gates.forget(d.key)
        return AppOutcome(org, name, decisions.REMOVED, ran.described)

    def _record_failed(self, ran: Executed, failed: CynchrodError, result: PassResult) -> AppOutcome:
        d, row, deployment = ran.decision, ran.row, ran.deployment
        spec = d.spec
        assert spec is not None
        org, name = d.key
        memory = decisions.after_failure(d.memory, failed, spec_hash=spec.hash, now=self._clock())
        self._remember(d.key, memory)
        if not failed.permanent:
            self.wakeup.request_at(memory.until - self._clock(), "self-heal")
        log.warning("%s/%s failed (%s, attempt %d): %s", org, name, "waits for a new commit" if failed.permanent
                    else f"retry in {decisions.delay(memory.failures):.0f}s", memory.failures, failed)
        if deployment is not None:
            self._book(lambda: self.store.finish_deployment(
                deployment, status=decisions.FAILED, error_code=failed.code, error=failed.message, merge=True))
        if row is not None:
            # What the failure left: units of an earlier version all up is "previous version running".
            failed_hashes = frozenset() if isinstance(d.failure, ManifestError) else frozenset(
                spec.service_hash(s) for s in spec.services)
            serving = decisions.PREVIOUS if decisions.previous_serving(
                self.view.app_units(org, name), failed_hashes=failed_hashes) else None
            self._book(lambda: self.store.update_app(row.id, status=decisions.FAILED, last_error=str(failed),
                                                     serving=serving, **self._unit_fields(spec, row)))
        return AppOutcome(org, name, decisions.FAILED, ran.described, str(failed))

    def _record_done(self, ran: Executed, result: PassResult) -> AppOutcome:
        d, row, note = ran.decision, ran.row, ran.note
        org, name = d.key
        self._remember(d.key, decisions.after_success(d.memory))
        error, noted = d.error, d.note
        if error is None and note is not None:
            error, noted = f"{note[0]}: {note[1]}", note[0]  # running again, but say why it had died
        status: str | None = d.status
        if row is not None:
            status = self._book(lambda: self._record_applied(d, row, ran.deployment, note, result, error, noted))
        return AppOutcome(org, name, status or d.status, ran.described, error)

    def _record_applied(self, d: decisions.Decision, row: store.App, deployment: int | None,
                        note: tuple[Code, str] | None, result: PassResult, error: str | None,
                        noted: Code | None) -> str:
        spec = d.spec
        assert spec is not None
        status = d.status
        if self.gates.enabled and status == decisions.RUNNING and any(a.kind in _STARTS for a in d.actions):
            # Health-gated: ``deploying`` until its units are ready (``gates``; judged at once).
            status = self.gates.open(spec, deployment, self.view.app_units(*d.key), note=note)
            if status == decisions.FAILED:
                error, noted = self.gates.decided()[d.key].error, None
        elif deployment is not None:
            self.store.finish_deployment(deployment, status=d.status if d.status != decisions.FAILED
                                         else decisions.RUNNING, error_code=note[0] if note else None,
                                         error=note[1] if note else None)
        if d.failure is not None and row.last_error != d.error:
            self._record_failure(row, d, result)
        self.store.update_app(row.id, status=status, last_error=error, note=noted, deployed_hash=spec.hash,
                              serving=d.serving, **self._unit_fields(spec, row))
        return status

    def _remember(self, key: tuple[str, str], memory: decisions.Backoff) -> None:
        if memory == _NO_MEMORY:
            if self._memory:
                self._memory.pop(key, None)
        else:
            self._memory[key] = memory

    def _row(self, spec: specs.AppSpec, result: PassResult) -> store.App:
        app = self.store.ensure_app(spec, commit=result.commit_of(spec))
        self.store.record_spec(app, spec, commit=result.commit_of(spec))
        return app

    def _settle(self, d: decisions.Decision, row: store.App | None, result: PassResult) -> AppOutcome:
        """Record an app that is not acted on this pass: in sync, held, waiting or backed off."""
        org, name = d.key
        self._remember(d.key, d.memory)
        if d.spec is None:
            return AppOutcome(org, name, d.status)
        if d.retry_in is not None:
            self.wakeup.request_at(d.retry_in, "self-heal")
        if d.failure is not None and d.failure.code == Code.QUOTA_EXCEEDED and row is None:
            # A refused new app gets a row, so the API and the next pass can see why.
            row = self._row(d.spec, result)
        if row is None:
            row = self._row(d.spec, result)
        elif not d.failure or d.failure.code != Code.QUOTA_EXCEEDED:
            self.store.record_spec(row, d.spec, commit=result.commit_of(d.spec))
        error = d.error
        if d.failure is not None and row.last_error != error:
            log.warning("%s/%s: %s", org, name, error)
            # A failed build has failed its own deployment already.
            if d.failure.code != Code.BUILD_FAILED:
                self._record_failure(row, d, result)
        elif d.record and d.status in (decisions.RUNNING, decisions.STOPPED):
            # A spec change that needed no unit change is still a deployment.
            done = self.store.start_deployment(row.id, commit=result.commit_of(d.spec), trigger=result.trigger,
                                               spec_hash=d.spec.hash)
            self.store.finish_deployment(done, status=d.status)
            row = self.store.app(row.id) or row
        fields = self._unit_fields(d.spec, row)
        fields.update(status=d.status, last_error=error, serving=d.serving, refusal=d.refusal, note=d.note)
        if d.record and d.status in (decisions.RUNNING, decisions.STOPPED):
            fields["deployed_hash"] = d.spec.hash
        if d.status == decisions.RUNNING and row.healthy_spec is None and d.key not in self._rollbacks:
            # Running from before health-gated deploys (or their first pass): its last healthy spec, once.
            fields["healthy_spec"] = d.spec.json_text
        if any(getattr(row, k) != v for k, v in fields.items()):
            self.store.update_app(row.id, **fields)
        return AppOutcome(org, name, d.status, error=error)

    def _record_failure(self, row: store.App, d: decisions.Decision, result: PassResult) -> None:
        """A failure found before acting; a manifest's carries all of the file's errors."""
        assert d.failure is not None and d.spec is not None
        manifest = isinstance(d.failure, ManifestError)
        self.store.record_failure(row.id, commit=result.commit_of(d.spec), trigger=result.trigger,
                                  spec_hash=None if manifest else d.spec.hash, code=d.failure.code,
                                  error=(d.error or str(d.failure)) if manifest else d.failure.message)

    def _unit_fields(self, spec: specs.AppSpec, row: store.App) -> dict[str, object]:
        """What the API shows of an app's units: the main service's, and each service's.

        Kept per app while neither the spec nor the units change (units are frozen
        and replaced on every change): a no-op pass serialises nothing.
        """
        units = tuple(self.view.app_units(*spec.key))
        cached = self._fields.get(spec.key)
        if cached is not None and cached[0] is spec and len(cached[1]) == len(units) \
                and all(a is b for a, b in zip(cached[1], units, strict=True)) and cached[2]["container_id"]:
            return dict(cached[2])
        main = store.main_service(spec)
        first = next((u for u in sorted(units, key=lambda u: u.replica) if u.service == main.name), None)
        fields: dict[str, object] = {"container_id": first.instance if first else row.container_id,
                                     "host_port": first.endpoint if first else None,
                                     "services_json": store.services_json(spec, list(units))}
        self._fields[spec.key] = (spec, units, fields)
        return dict(fields)

    def _book(self, fn: Callable[[], T]) -> T | None:
        """A store write that may fail when the state dir is full or read-only: healing
        goes on without it (it needs no write); the failure shows on /healthz."""
        try:
            return fn()
        except StateUnwritable as exc:
            if self.state_error is None:
                log.error("%s; apps are still healed, nothing new is recorded", exc)
            self.state_error = str(exc)
            return None

    # -- the daemon loop ----------------------------------------------------------

    def serve(self, *, interval: float, stop: threading.Event) -> None:
        """Run passes until ``stop`` is set: every ``interval`` s, or at once when woken.

        ``self.interval`` may be changed while it runs (a reloaded config). Owns the
        view's event thread and the scheduler; both end with it.
        """
        self.interval = interval
        events = threading.Thread(target=self.view.run, args=(stop,), name="engine-events")
        events.start()

        def wake_on_stop() -> None:
            stop.wait()
            self.view.stop()
            self.wakeup.request("stop")

        stopper = threading.Thread(target=wake_on_stop, name="stopper")
        stopper.start()
        triggers = {"poll"}
        first = True
        try:
            while not stop.is_set():
                try:
                    result = self.run_pass(strongest(triggers))
                    self._log_pass(result, always=first)
                    first = False
                except CynchrodError as exc:
                    log.warning("pass failed: %s", exc)
                except Exception:
                    log.exception("pass crashed")
                triggers = self.wakeup.wait(self.interval) or {"poll"}
        finally:
            stop.set()
            self.view.stop()
            self.wakeup.scheduler.stop()
            if self.builds is not None:
                self.builds.stop()
            events.join(10)
            stopper.join(10)

    def _log_pass(self, result: PassResult, *, always: bool = False) -> None:
        acted = sum(bool(a.actions) for a in result.apps)
        failed = sum(a.status == decisions.FAILED for a in result.apps)
        # A timer pass with nothing to say is logged at debug level: the log tells what happened.
        said = always or acted or failed or result.source_error or result.trigger != "poll"
        level = logging.INFO if said else logging.DEBUG
        log.log(level, "pass %s commit=%s apps=%d acted=%d failed=%d in %.3fs%s", result.trigger,
                (result.commit or "-")[:12], len(result.apps), acted, failed, result.duration_s,
                f" source_error={result.source_error}" if result.source_error else "")
