"""The reconciler: the imperative shell around the pure decisions.

Called by ``cynchrod sync`` (one pass), ``cynchrod plan`` (``preview``) and the
daemon (``serve``: a loop woken by the timer, webhooks, watched files, the API,
finished builds and the engine's events). A pass is

    fetch (sources → desired specs, parsed once per blob)
    → resolve (secret digests, built image tags; holds for what is missing)
    → decide (``decisions.decide``: pure)
    → execute (the runtime, bounded concurrency, one app's actions in sequence)
    → record (store rows and deployments; the view learns what the actions left).

It owns: the view of the engine (``view.View``, fed by the engine's events), the
wake-up queue and its one scheduler thread for delayed wake-ups, each app's
back-off memory, and the build queue's results. It never imports ``docker``: it
speaks to a ``runtime.Runtime``. Passes are level-based and one at a time; a
failing app is that app's own retried error, never the pass's.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gc
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from cynchrod import edge as edge_mod
from cynchrod import runtime, store
from cynchrod.core import decisions, planning, specs
from cynchrod.core.decisions import TRIGGERS
from cynchrod.core.errors import CynchrodError, ManifestError, PermanentError, SourceError, StateUnwritable
from cynchrod.desired import manifests, source
from cynchrod.desired import secrets as secrets_mod
from cynchrod.runtime import view
from cynchrod.shell import builds as builds_mod
from cynchrod.shell import metrics

log = logging.getLogger("cynchrod.reconciler")  # the name the logs have always shown
T = TypeVar("T")
_NO_MEMORY = decisions.Backoff()

#: Webhook bursts: deliveries closer than this coalesce into the pass that the first
#: one woke plus one more. Short, so that pushes made one after another are each
#: applied at once rather than held for the trailing pass.
DEBOUNCE_S = 0.5
__all__ = ["TRIGGERS", "PassResult", "Reconciler", "Wakeup", "strongest"]


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


@dataclasses.dataclass
class _Burst:
    last: float
    more: bool = False


class Scheduler:
    """One thread for every delayed call (back-off wake-ups, trailing webhook passes)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + max(delay_s, 0.0), next(self._seq), fn))
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cond.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                if self._stopped:
                    return
                _, _, fn = heapq.heappop(self._heap)
            try:
                fn()
            except Exception:
                log.exception("scheduled call failed")

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(5)


class Wakeup:
    """A coalescing trigger queue: many requests before a pass become one pass."""

    def __init__(self, scheduler: Scheduler | None = None) -> None:
        self._cond = threading.Condition()
        self._pending: set[str] = set()
        self._bursts: dict[str, _Burst] = {}
        self.scheduler = scheduler or Scheduler()

    def request_debounced(self, trigger: str, quiet_s: float = DEBOUNCE_S) -> None:
        """Leading and trailing edge: the first request of a burst wakes a pass at once;
        the rest of the burst becomes one more pass once ``quiet_s`` passes without one."""
        with self._cond:
            burst = self._bursts.get(trigger)
            now = time.monotonic()
            if burst is None:
                self._bursts[trigger] = _Burst(last=now)
                self._pending.add(trigger)
                self._cond.notify_all()
                self.scheduler.call_later(quiet_s, lambda: self._trailing(trigger, quiet_s))
            else:
                burst.last, burst.more = now, True

    def _trailing(self, trigger: str, quiet_s: float) -> None:
        with self._cond:
            burst = self._bursts[trigger]
            wait = burst.last + quiet_s - time.monotonic()
            if wait > 0:
                self.scheduler.call_later(wait, lambda: self._trailing(trigger, quiet_s))
                return
            del self._bursts[trigger]
            if burst.more:
                self._pending.add(trigger)
                self._cond.notify_all()

    def request(self, trigger: str) -> None:
        with self._cond:
            self._pending.add(trigger)
            self._cond.notify_all()

    def request_at(self, delay_s: float, trigger: str) -> None:
        self.scheduler.call_later(delay_s, lambda: self.request(trigger))

    def wait(self, timeout: float) -> set[str]:
        with self._cond:
            if not self._pending:
                self._cond.wait(timeout)
            pending, self._pending = self._pending, set()
            return pending


#: Passes that put back what the last fetch declared, without fetching.
NO_FETCH_TRIGGERS = frozenset({"self-heal", "build"})


def strongest(triggers: Iterable[str]) -> str:
    found = set(triggers)
    return next((t for t in TRIGGERS if t in found), "poll")


@dataclasses.dataclass(frozen=True)
class _Desired:
    specs: dict[tuple[str, str], specs.AppSpec]
    manifest_errors: dict[tuple[str, str], list[ManifestError]]
    read: frozenset[str]


#: From this many apps in a commit, the heap is frozen after the pass that loaded it (below,
#: the collector's cost is small and a full collection per commit would cost more).
FREEZE_APPS = 500


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
                 edge: edge_mod.Edge | None = None) -> None:
        #: The repositories followed; the first is where apps created through the API go
        #: unless another one is pinned to the app's org.
        self.sources = [src] if isinstance(src, source.Followed) else list(src)
        self.source = self.sources[0]
        self.secrets = secrets
        self.builds = builds
        self.max_apps = max_apps
        self.stats = stats or metrics.Metrics()
        self.runtime = rt
        #: Routes each app's domain (re-asserted before and after each pass acts).
        self.edge = edge
        self.store = db
        self.concurrency = concurrency
        self.caches = {s.url: manifests.Cache(org=s.org) for s in self.sources}
        self.wakeup = Wakeup()
        self.view = view.View(rt, resync_s=resync_s, on_change=self._on_event)
        self._clock = clock
        #: Per source URL: the last commit loaded and what it declared.
        self._loaded: dict[str, tuple[str, manifests.Desired]] = {}
        #: Per source URL and app: the spec the parse cache gave and its copy tagged with the source.
        self._tags: dict[str, dict[tuple[str, str], tuple[specs.AppSpec, specs.AppSpec]]] = {}
        self._memory: dict[tuple[str, str], decisions.Backoff] = {}
        self._fields: dict[tuple[str, str], tuple[specs.AppSpec, tuple[runtime.Unit, ...], dict[str, object]]] = {}
        self._pass_lock = threading.Lock()
        #: A pass loaded a new commit of many apps: the heap is frozen after it (``freeze_heap``).
        self._new_commit = False
        self.interval = 30.0
        #: When the last pass ended, and whether it crashed (for /healthz).
        self.last_pass_at: float | None = None
        self.last_crash: str | None = None
        #: Called with (done, total, what) while a pass acts (``cynchrod sync`` shows it).
        self.progress: Callable[[int, int, str], None] | None = None
        #: Why the store could not be written, while it cannot (for /healthz).
        self.state_error: str | None = None
        #: Per source URL: the problems its last read commit gave (kept while it cannot be read).
        self._problems: dict[str, list[store.Problem]] = {}
        #: The problems last written to the store (None: none written by this process yet).
        self._problems_written: list[store.Problem] | None = None
        #: Log each manifest error of a newly read commit (the daemon); ``plan`` and ``sync``
        #: print them in their own output instead, so each is shown once.
        self.log_manifest_errors = True
        if builds is not None:
            builds.on_done = lambda: self.wakeup.request("build")
            builds.open_deployment = self._open_build
            builds.fail_deployment = lambda deployment, exc: self.store.finish_deployment(
                deployment, status=decisions.FAILED, error_code=exc.code, error=exc.message)

    def _open_build(self, spec: specs.AppSpec) -> int:
        """The deployment a build runs under (its log is that deployment's build log)."""
        app = self.store.ensure_app(spec, commit=None)
        return self.store.start_deployment(app.id, commit=app.commit, trigger="build", spec_hash="")

    def _on_event(self, event: runtime.Event) -> None:
        """The view changed: a unit died or vanished wakes a self-heal pass at once."""
        if event.kind == runtime.RELIST or (event.unit is not None and event.unit.state != planning.RUNNING) \
                or event.kind == runtime.GONE or event.oom:
            self.wakeup.request("self-heal")

    # -- desired state --------------------------------------------------------

    def _load(self, src: source.Followed, result: PassResult) -> manifests.Desired | None:
        """The desired state of the source's newest good commit, or None when there is none.

        A pass woken by the engine (a container died) or by a finished build puts back what
        the last fetch declared, without fetching: no round trip to the remote delays the
        repair (the next poll or webhook brings new commits)."""
        started = time.perf_counter()
        last = self._loaded.get(src.url)
        try:
            if last is not None and result.trigger in NO_FETCH_TRIGGERS:
                commit = src.resolve()
            else:
                commit = src.fetch()
                log.debug("fetched %s: %.1f ms", commit[:12], (time.perf_counter() - started) * 1000)
        except SourceError as exc:
            result.source_errors.append(str(exc))
            try:
                commit = src.resolve()
            except SourceError:
                return None
        result.commits[src.url] = commit
        if last is not None and last[0] == commit:
            return last[1]
        try:
            files, refused = src.files(commit)
        except SourceError as exc:
            result.source_errors.append(str(exc))
            return None
        incumbents = {k: a.path for k, a in self.store.live_apps().items() if a.source in (src.url, "")}
        desired = self.caches[src.url].load(files, src.read, incumbents=incumbents)
        # Tagged once per parsed spec, so a no-op pass and a new commit that leaves an app's file
        # alone reuse the same spec objects (and their cached hashes and JSON).
        desired = dataclasses.replace(desired, apps=self._tagged(src.url, desired.apps))
        if refused:
            desired = dataclasses.replace(desired, errors=desired.errors + tuple(refused),
                                          failed_paths=desired.failed_paths | {e.path for e in refused})
        for error in desired.errors if self.log_manifest_errors else ():
            log.warning("manifest %s", error)
        self._loaded[src.url] = (commit, desired)
        self._new_commit = self._new_commit or len(desired.apps) >= FREEZE_APPS
        log.debug("read and parsed %d manifests of %s: %.1f ms", len(files), commit[:12],
                  (time.perf_counter() - started) * 1000)
        return desired

    def _tagged(self, url: str, apps: dict[tuple[str, str], specs.AppSpec]) -> dict[tuple[str, str], specs.AppSpec]:
        """Each parsed spec tagged with its source, reusing last commit's tagged copy when the parse
        cache gave the same spec object (its file did not change): recomputing 300 hashes and JSON
        texts for a push that changed one file was most of a pass's own time."""
        before = self._tags.get(url, {})
        now: dict[tuple[str, str], tuple[specs.AppSpec, specs.AppSpec]] = {}
        for key, parsed in apps.items():
            pair = before.get(key)
            now[key] = pair if pair is not None and pair[0] is parsed else (
                parsed, dataclasses.replace(parsed, source=url))
        self._tags[url] = now
        return {key: pair[1] for key, pair in now.items()}

    def _desired(self, result: PassResult, live: dict[tuple[str, str], store.App]) -> _Desired:
        desired: dict[tuple[str, str], specs.AppSpec] = {}
        manifest_errors: dict[tuple[str, str], list[ManifestError]] = {}
        read: set[str] = set()
        for src in self.sources:
            loaded = self._load(src, result)
            if loaded is None:
                # No good commit: repair what the store last knew of its apps, prune none of them.
                for key, app in live.items():
                    if app.source in (src.url, "") and (spec := app.spec) is not None:
                        desired.setdefault(key, dataclasses.replace(spec, source=src.url))
                result.problems.extend(self._problems.get(src.url, []))
                continue
            read.add(src.url)
            errors = list(loaded.errors)
            orgs = dict(loaded.failed_orgs)
            for key, spec in loaded.apps.items():
                if key in desired:
                    errors.append(ManifestError(f"app {key[0]}/{key[1]} is already declared by another repository",
                                                code="duplicate_app", path=spec.path, line=1))
                    orgs[spec.path] = key[0]
                else:
                    desired[key] = spec
            by_path: dict[str, list[ManifestError]] = {}
            for err in errors:
                by_path.setdefault(err.path, []).append(err)
            # A file that now fails keeps its app's last good spec running.
            for key, app in live.items():
                if app.source in (src.url, "") and app.path in by_path and (spec := app.spec) is not None:
                    desired.setdefault(key, dataclasses.replace(spec, source=src.url))
                    manifest_errors[key] = by_path.pop(app.path)
            # What is left belongs to no app: the desired state's problems, listed beside the apps.
            self._problems[src.url] = [
                store.Problem(path=e.path, line=e.line, code=e.code, message=e.message, org=orgs.get(e.path, src.org))
                for found in by_path.values() for e in found]
            result.problems.extend(self._problems[src.url])
            result.manifest_errors.extend(str(e) for e in errors)
        result.commit = result.commits.get(self.source.url)
        return _Desired(desired, manifest_errors, frozenset(read))

    def _resolve(self, desired: dict[tuple[str, str], specs.AppSpec]
                 ) -> tuple[dict[tuple[str, str], CynchrodError], dict[tuple[str, str], str]]:
        """Fill in secret digests and built image tags (in place); return the apps held,
        and why, and the apps waiting for a build under way."""
        held: dict[tuple[str, str], CynchrodError] = {}
        waiting: dict[tuple[str, str], str] = {}
        fetched: dict[tuple[str, str], str] = {}
        for key, spec in list(desired.items()):
            try:
                if any(s.build for s in spec.services):
                    if self.builds is None:
                        raise PermanentError("this daemon does not build images", code="build_failed")
                    desired[key] = spec = self.builds.resolve(spec, fetched)
                    state = self.builds.state(spec)
                    if isinstance(state, CynchrodError):
                        raise state
                    if state is not None:
                        waiting[key] = state
                        continue
                if spec.secret_names:
                    if self.secrets is None:
                        raise secrets_mod.SecretMissing("this daemon has no secret store")
                    digests = self.secrets.digest(spec)
                    desired[key] = dataclasses.replace(spec, services=tuple(
                        dataclasses.replace(s, secret_digest=digests[s.name]) for s in spec.services))
            except CynchrodError as exc:
                held[key] = exc
        return held, waiting

    def _inputs(self, result: PassResult, live: dict[tuple[str, str], store.App]) -> decisions.Inputs:
        wanted = self._desired(result, live)
        desired = dict(wanted.specs)
        held, waiting = self._resolve(desired)
        caps = {org: self.max_apps(org) for org in {k[0] for k in desired}}
        ages: dict[tuple[str, str], int] = {}
        over = decisions.over_cap(desired, live, caps)
        for src in self.sources:
            mine = [k for k in over if desired[k].source == src.url]
            commit = result.commits.get(src.url)
            if mine and commit:
                found = src.introduced(commit, [desired[k].path for k in mine])
                ages.update({k: found.get(desired[k].path, 0) for k in mine})
        return decisions.Inputs(
            desired=desired, rows=live, units=self.view.snapshot(), now=self._clock(), trigger=result.trigger,
            manifest_errors=wanted.manifest_errors, holds=held, waiting=waiting, memory=dict(self._memory),
            read=wanted.read, all_read=len(wanted.read) == len(self.sources), max_apps=caps, ages=ages)

    # -- one pass ---------------------------------------------------------------

    def run_pass(self, trigger: str = "poll") -> PassResult:
        with self._pass_lock:
            started = time.perf_counter()
            result = PassResult(commit=None, trigger=trigger)
            try:
                self._run(result)
                if self._new_commit:
                    self._new_commit = False
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
            return result

    def sync(self, trigger: str = "poll", *, build_timeout: float = 1800) -> PassResult:
        """One pass, and one more after each round of builds it queued (``cynchrod sync``)."""
        result = self.run_pass(trigger)
        while self.builds is not None and self.builds.busy():
            self.builds.wait_idle(build_timeout)
            result = self.run_pass("build")
        return result

    def _note_pass(self, result: PassResult) -> None:
        last = {"commit": result.commit, "trigger": result.trigger, "source_error": result.source_error,
                "manifest_errors": result.manifest_errors}
        # Written only when it says something new: a no-op pass writes nothing.
        if {k: v for k, v in (self.store.meta("last_pass") or {}).items() if k != "at"} != last:
            self.store.set_meta("last_pass", {**last, "at": store.now()})
        # Not from a pass that crashed half-way, nor before every source has been read once.
        known = self.last_crash is None and all(s.url in self._problems for s in self.sources)
        if known and result.problems != self._problems_written:
            self.store.set_problems(result.problems)
            self._problems_written = list(result.problems)

    def preview(self) -> tuple[PassResult, list[planning.Action]]:
        """What a pass would do now, changing nothing (``cynchrod plan``)."""
        with self._pass_lock:
            result = PassResult(commit=None, trigger="plan")
            inputs = self._inputs(result, self.store.live_apps())
            return result, [a for d in decisions.decide(inputs) for a in d.actions]

    def _run(self, result: PassResult) -> None:
        started = time.perf_counter()
        live = self.store.live_apps()
        inputs = self._inputs(result, live)
        decided = time.perf_counter()
        plan = decisions.decide(inputs)
        log.debug("inputs: %.1f ms; decided %d apps: %.1f ms", (decided - started) * 1000, len(plan),
                  (time.perf_counter() - decided) * 1000)
        self._sync_edge(inputs, plan)
        acting = [d for d in plan if d.acts or d.prune]

        def settle_all() -> None:
            # One store transaction for every app not acted on: a new commit touches each
            # app's row (its commit), and one sync per row made a pass over 300 apps slow.
            with self.store.batch():
                for d in plan:
                    if not (d.acts or d.prune):
                        settled = self._book(lambda d=d: self._settle(d, live.get(d.key), result))  # type: ignore[misc]
                        result.apps.append(settled or AppOutcome(d.key[0], d.key[1], d.status, error=d.error))

        self._book(settle_all)
        done = 0

        def run(d: decisions.Decision) -> AppOutcome:
            nonlocal done
            outcome = (self._prune(d, live.get(d.key), result) if d.prune
                       else self._apply(d, result, built.get(d.key), live.get(d.key)))
            done += 1
            if self.progress is not None:
                self.progress(done, len(acting), "; ".join(outcome.actions) or f"{d.key[0]}/{d.key[1]}")
            return outcome

        built: dict[tuple[str, str], int | None] = {}
        for d in acting:
            if d.spec is not None:
                # Queued until a worker takes it (then deploying): what the API shows meanwhile.
                # A repo app's deploy continues the deployment its build ran under.
                built[d.key] = self.builds.deployment_of(d.spec) if self.builds is not None else None
                row = self._book(lambda d=d: self._row(d.spec, result))  # type: ignore[misc]
                if built[d.key] is None and row is not None:
                    self._book(lambda r=row, d=d: self.store.ensure_queued(  # type: ignore[misc]
                        r.id, commit=result.commit_of(d.spec), trigger=d.trigger))
        if acting:
            with concurrent.futures.ThreadPoolExecutor(max_workers=self.concurrency) as pool:
                result.apps.extend(pool.map(run, acting))
            self._sync_edge(inputs, plan)
        result.apps.sort(key=lambda a: (a.org, a.name))

    def _sync_edge(self, inputs: decisions.Inputs, plan: Sequence[decisions.Decision]) -> None:
        """The edge's routes for the desired apps and the units now running; drift is put back.
        An unreachable edge is logged and retried next pass: it never stops a pass."""
        if self.edge is None:
            return
        taken = [d.key for d in plan if d.failure is not None and d.failure.code == "domain_taken"]
        try:
            self.edge.sync(edge_mod.routes(inputs.desired, self.view.snapshot(), taken))
        except CynchrodError as exc:
            log.warning("edge: %s; retried next pass", exc)

    # -- carrying out decisions -------------------------------------------------

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
        if d.failure is not None and d.failure.code == "quota_exceeded" and row is None:
            # A refused new app gets a row, so the API and the next pass can see why.
            row = self._row(d.spec, result)
        if row is None:
            row = self._row(d.spec, result)
        elif not d.failure or d.failure.code != "quota_exceeded":
            self.store.record_spec(row, d.spec, commit=result.commit_of(d.spec))
        error = d.error
        if d.failure is not None and row.last_error != error:
            log.warning("%s/%s: %s", org, name, error)
            # A failed build has failed its own deployment already.
            if d.failure.code != "build_failed":
                self._record_failure(row, d, result)
        elif d.record and d.status in (decisions.RUNNING, decisions.STOPPED):
            # A spec change that needed no unit change is still a deployment.
            done = self.store.start_deployment(row.id, commit=result.commit_of(d.spec), trigger=result.trigger,
                                               spec_hash=d.spec.hash)
            self.store.finish_deployment(done, status=d.status)
            row = self.store.app(row.id) or row
        fields = self._unit_fields(d.spec, row)
        fields.update(status=d.status, last_error=error, serving=d.serving, refusal=d.refusal)
        if d.record and d.status in (decisions.RUNNING, decisions.STOPPED):
            fields["deployed_hash"] = d.spec.hash
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

    def _prune(self, d: decisions.Decision, row: store.App | None, result: PassResult) -> AppOutcome:
        """Declared nowhere any more (by a source that was read): units, resources, row."""
        org, name = d.key
        described = [a.describe() for a in d.actions]
        try:
            for action in d.actions:
                log.info("prune %s", action.describe())
                self.runtime.apply(action)
                if action.unit is not None:
                    self.view.drop([action.unit.instance])
            self._remove_resources(org, name)
        except CynchrodError as exc:
            log.warning("prune of %s/%s failed: %s", org, name, exc)
            return AppOutcome(org, name, decisions.FAILED, described, str(exc))
        if row is not None:
            log.info("removed %s/%s: no longer declared by %s", org, name, row.source or "the repository")
            self._book(lambda: self.store.remove_app(row.id, commit=result.commit, trigger=result.trigger))
        self._memory.pop(d.key, None)
        return AppOutcome(org, name, decisions.REMOVED, described)

    def _remove_resources(self, org: str, app: str) -> None:
        """What a deleted app leaves besides units: network, built images, staged secrets."""
        self.runtime.remove_app(org, app)
        if self.secrets is not None:
            self.secrets.unstage(org, app)

    def _death_note(self, d: decisions.Decision) -> tuple[str, str] | None:
        """Why a unit being healed died, when it was OOM-killed."""
        for action in d.actions:
            unit, service = action.unit, action.service_spec
            if unit is None or service is None or not unit.stopped:
                continue
            oom = unit.state == planning.OOM_KILLED or self.runtime.exit_details(unit)[1]
            if oom:
                return "oom_killed", (f"service {service.name} of {d.key[0]}/{d.key[1]} was killed for "
                                      f"exceeding its memory limit of {service.memory} MB; restarted")
        return None

    def _apply(self, d: decisions.Decision, result: PassResult, build_deployment: int | None,
               live: store.App | None) -> AppOutcome:
        spec = d.spec
        assert spec is not None
        org, name = d.key
        described = [a.describe() for a in d.actions]
        row = self._book(lambda: self._row(spec, result)) or live
        deployment = None if row is None else self._book(lambda: self.store.start_deployment(
            row.id, commit=result.commit_of(spec), trigger=d.trigger, spec_hash=spec.hash,
            build_deployment=build_deployment))
        note: tuple[str, str] | None = None
        kind = ""
        try:
            if d.trigger == "self-heal":
                note = self._death_note(d)
            if spec.secret_names and self.secrets is not None and any(a.kind != planning.STOP for a in d.actions):
                self.secrets.stage(spec)
            for action in d.actions:
                kind = action.kind
                log.info("%s", action.describe())
                served = self.runtime.apply(action)
                if action.unit is not None and action.kind in (planning.REMOVE, planning.RECREATE):
                    self.view.drop([action.unit.instance])
                if action.kind == planning.STOP and action.unit is not None:
                    self.view.put([dataclasses.replace(action.unit, state=planning.EXITED)])
                self.view.put(served)
                self.stats.actions.labels(action.kind, "ok").inc()
        except CynchrodError as exc:
            self.stats.actions.labels(kind, "failed").inc()
            memory = decisions.after_failure(d.memory, exc, spec_hash=spec.hash, now=self._clock())
            self._remember(d.key, memory)
            if not exc.permanent:
                self.wakeup.request_at(memory.until - self._clock(), "self-heal")
            log.warning("%s/%s failed (%s, attempt %d): %s", org, name, "waits for a new commit" if exc.permanent
                        else f"retry in {decisions.delay(memory.failures):.0f}s", memory.failures, exc)
            failed = exc
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
            return AppOutcome(org, name, decisions.FAILED, described, str(exc))
        self._remember(d.key, decisions.after_success(d.memory))
        if self.builds is not None:
            self.builds.prune(spec)
        error = d.error
        if error is None and note is not None:
            error = f"{note[0]}: {note[1]}"  # running again, but say why it had died
        if row is not None:
            self._book(lambda: self._record_applied(d, row, deployment, note, result, error))
        return AppOutcome(org, name, d.status, described, error)

    def _record_applied(self, d: decisions.Decision, row: store.App, deployment: int | None,
                        note: tuple[str, str] | None, result: PassResult, error: str | None) -> None:
        spec = d.spec
        assert spec is not None
        if deployment is not None:
            self.store.finish_deployment(deployment, status=d.status if d.status != decisions.FAILED
                                         else decisions.RUNNING, error_code=note[0] if note else None,
                                         error=note[1] if note else None)
        if d.failure is not None and row.last_error != d.error:
            self._record_failure(row, d, result)
        self.store.update_app(row.id, status=d.status, last_error=error, deployed_hash=spec.hash, serving=d.serving,
                              **self._unit_fields(spec, row))

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
