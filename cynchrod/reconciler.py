"""The reconciler: one pass is fetch → parse → observe → plan → apply → record.

Called by ``cynchrod sync`` (one pass) and ``cynchrod serve`` (a loop woken by
the timer, Docker's death events and, later, webhooks and the API). Passes are
level-based: each re-reads Git and Docker and never trusts a delta.

Safety rules, in the order a pass meets them:

* The source failing (unreachable, branch gone, no ``apps/`` directory) never
  tears anything down: the pass keeps the last good desired state (from memory,
  or from the store after a restart) and only repairs.
* A manifest that fails keeps its app's last good spec running and marks that
  app ``failed`` with ``file:line: code: message``; other apps are untouched.
* A permanent failure (``image_not_found``, ``name_conflict`` ...) is not
  retried until the app's spec changes; temporary ones retry next pass.
* Self-healing a container that keeps dying backs off exponentially
  (1 s, 2 s, 4 s ... 5 min), reset once the app stays up for a minute.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from cynchrod import builds as builds_mod
from cynchrod import manifests, metrics, planning, runtime, source, specs, store
from cynchrod import secrets as secrets_mod
from cynchrod.errors import CynchrodError, ManifestError, PermanentError, SourceError

log = logging.getLogger(__name__)

#: Trigger names, as deployment rows record them, strongest first.
TRIGGERS = ("api", "webhook", "watch", "build", "self-heal", "poll")
HEAL_BACKOFF_MAX_S = 300.0
HEAL_RESET_S = 60.0
#: How long a death event is followed up when Docker's list still shows the container running.
SUSPECT_S = 10.0
SUSPECT_RECHECK_S = 0.1
#: Webhook bursts: deliveries closer than this coalesce into the pass that the first
#: one woke plus one more. Short, so that pushes made one after another are each
#: applied at once rather than held for the trailing pass.
DEBOUNCE_S = 0.5


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

    @property
    def source_error(self) -> str | None:
        return "; ".join(self.source_errors) or None

    def commit_of(self, spec: specs.AppSpec) -> str | None:
        return self.commits.get(spec.source, self.commit)

    @property
    def ok(self) -> bool:
        return not self.source_error and not self.manifest_errors and all(a.status != store.FAILED for a in self.apps)


@dataclasses.dataclass
class _Heal:
    count: int = 0
    last: float = 0.0
    next_allowed: float = 0.0


@dataclasses.dataclass
class _Burst:
    last: float
    more: bool = False


@dataclasses.dataclass(frozen=True)
class _Plan:
    desired: dict[tuple[str, str], specs.AppSpec]
    manifest_errors: dict[tuple[str, str], ManifestError]
    #: Sources whose commit was read: only their undeclared apps are removed.
    prune: frozenset[str]
    observed: list[planning.Observed]
    actions: list[planning.Action]
    #: Apps not acted on this pass (quota, missing secret): their containers stay as they are.
    held: dict[tuple[str, str], CynchrodError]


class Wakeup:
    """A coalescing trigger queue: many requests before a pass become one pass."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: set[str] = set()
        self._bursts: dict[str, _Burst] = {}

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
                self._schedule_trailing(trigger, quiet_s)
            else:
                burst.last, burst.more = now, True

    def _schedule_trailing(self, trigger: str, quiet_s: float) -> None:
        def check() -> None:
            with self._cond:
                burst = self._bursts[trigger]
                wait = burst.last + quiet_s - time.monotonic()
                if wait > 0:
                    timer = threading.Timer(wait, check)
                    timer.daemon = True
                    timer.start()
                    return
                del self._bursts[trigger]
                if burst.more:
                    self._pending.add(trigger)
                    self._cond.notify_all()

        timer = threading.Timer(quiet_s, check)
        timer.daemon = True
        timer.start()

    def request(self, trigger: str) -> None:
        with self._cond:
            self._pending.add(trigger)
            self._cond.notify_all()

    def request_at(self, delay_s: float, trigger: str) -> None:
        timer = threading.Timer(max(delay_s, 0.0), self.request, args=(trigger,))
        timer.daemon = True
        timer.start()

    def wait(self, timeout: float) -> set[str]:
        with self._cond:
            if not self._pending:
                self._cond.wait(timeout)
            pending, self._pending = self._pending, set()
            return pending


def strongest(triggers: Iterable[str]) -> str:
    found = set(triggers)
    return next((t for t in TRIGGERS if t in found), "poll")


def _quota_refused(app: store.App) -> bool:
    return app.status == store.FAILED and (app.last_error or "").startswith("quota_exceeded")


class Reconciler:
    def __init__(self, *, src: source.Source | Sequence[source.Source], rt: runtime.DockerRuntime, db: store.Store,
                 concurrency: int = 4, clock: Callable[[], float] = time.monotonic,
                 stats: metrics.Metrics | None = None, secrets: secrets_mod.Secrets | None = None,
                 max_apps: Callable[[str], int] = lambda org: 10, builds: builds_mod.Builds | None = None) -> None:
        #: The repositories followed; the first is where apps created through the API go
        #: unless another one is pinned to the app's org.
        self.sources = [src] if isinstance(src, source.Source) else list(src)
        self.source = self.sources[0]
        self.secrets = secrets
        self.builds = builds
        self.max_apps = max_apps
        self.stats = stats or metrics.Metrics()
        self.runtime = rt
        self.store = db
        self.concurrency = concurrency
        self.caches = {s.url: manifests.Cache(org=s.org) for s in self.sources}
        self.wakeup = Wakeup()
        self._clock = clock
        #: Per source URL: the last commit loaded and what it declared.
        self._loaded: dict[str, tuple[str, manifests.Desired]] = {}
        self._heal: dict[tuple[str, str], _Heal] = {}
        #: Apps whose spec hash failed permanently: not retried until the hash changes.
        self._blocked: dict[tuple[str, str], str] = {}
        self._pass_lock = threading.Lock()
        self.interval = 30.0
        #: Called as (done, total, what was just done) after each app a pass acts on (``cynchrod sync``).
        self.progress: Callable[[int, int, str], None] | None = None
        #: Containers Docker said died, until a pass has seen them dead (id -> deadline).
        #: Docker emits ``die`` before its list view is updated, so the pass an
        #: event triggers can still see the container running: it looks again.
        self._suspects: dict[str, float] = {}
        self._suspects_lock = threading.Lock()

    def on_container_event(self, container_id: str, app: str, action: str) -> None:
        """Docker event callback: a death wakes a self-heal pass."""
        with self._suspects_lock:
            if action == "start":
                self._suspects.pop(container_id, None)
                return
            self._suspects[container_id] = self._clock() + SUSPECT_S
        log.info("container of %s: %s", app, action)
        self.wakeup.request("self-heal")

    def _follow_up_suspects(self, observed: list[planning.Observed]) -> None:
        state = {c.id: c.state for c in observed}
        now = self._clock()
        with self._suspects_lock:
            for cid, deadline in list(self._suspects.items()):
                if state.get(cid) != "running" or now > deadline:
                    del self._suspects[cid]
            pending = bool(self._suspects)
        if pending:
            self.wakeup.request_at(SUSPECT_RECHECK_S, "self-heal")

    # -- desired state --------------------------------------------------------

    def _load(self, src: source.Source, result: PassResult) -> manifests.Desired | None:
        """The desired state of the source's newest good commit, or None when there is none."""
        try:
            commit = src.fetch()
        except SourceError as exc:
            result.source_errors.append(str(exc))
            try:
                commit = src.resolve()
            except SourceError:
                return None
        result.commits[src.url] = commit
        last = self._loaded.get(src.url)
        if last is not None and last[0] == commit:
            return last[1]
        try:
            files, refused = src.files(commit)
        except SourceError as exc:
            result.source_errors.append(str(exc))
            return None
        desired = self.caches[src.url].load(files, src.read)
        # Tagged once per commit, so a no-op pass reuses the same spec objects (and their cached hashes).
        desired = dataclasses.replace(desired, apps={k: dataclasses.replace(v, source=src.url)
                                                      for k, v in desired.apps.items()})
        if refused:
            desired = dataclasses.replace(desired, errors=desired.errors + tuple(refused),
                                          failed_paths=desired.failed_paths | {e.path for e in refused})
        self._loaded[src.url] = (commit, desired)
        return desired

    # -- one pass ---------------------------------------------------------------

    def run_pass(self, trigger: str = "poll") -> PassResult:
        with self._pass_lock:
            started = time.perf_counter()
            result = PassResult(commit=None, trigger=trigger)
            try:
                self._run(result)
            except Exception:
                self.stats.passes.labels(trigger, "error").inc()
                raise
            else:
                self.stats.passes.labels(trigger, "ok" if result.ok else "failed").inc()
            finally:
                result.duration_s = time.perf_counter() - started
                self.stats.pass_seconds.observe(result.duration_s)
                self.store.set_meta("last_pass", {
                    "commit": result.commit, "trigger": trigger, "source_error": result.source_error,
                    "manifest_errors": result.manifest_errors, "at": store.now(),
                    "duration_s": round(result.duration_s, 4)})
            return result

    def preview(self) -> tuple[PassResult, list[planning.Action]]:
        """What a pass would do now, changing nothing (``cynchrod plan``)."""
        with self._pass_lock:
            result = PassResult(commit=None, trigger="plan")
            plan = self._prepare(result, self.store.live_apps())
            return result, plan.actions

    def _prepare(self, result: PassResult, live: dict[tuple[str, str], store.App]) -> _Plan:
        desired: dict[tuple[str, str], specs.AppSpec] = {}
        manifest_errors: dict[tuple[str, str], ManifestError] = {}
        good: set[str] = set()
        for src in self.sources:
            loaded = self._load(src, result)
            if loaded is None:
                # No good commit: repair what the store last knew of its apps, prune none of them.
                for key, app in live.items():
                    if app.source in (src.url, "") and (spec := app.spec) is not None:
                        desired.setdefault(key, dataclasses.replace(spec, source=src.url))
                continue
            good.add(src.url)
            errors = list(loaded.errors)
            for key, spec in loaded.apps.items():
                if key in desired:
                    errors.append(ManifestError(f"app {key[0]}/{key[1]} is already declared by another repository",
                                                code="duplicate_app", path=spec.path, line=1))
                else:
                    desired[key] = spec
            manifest_errors.update(self._keep_last_good(src.url, loaded, live, desired))
            result.manifest_errors.extend(str(e) for e in errors)
        result.commit = result.commits.get(self.source.url)
        prune = {url for url in good}
        held = self._hold(desired, live, result)
        observed = self.runtime.observe()
        all_good = len(good) == len(self.sources)

        def may_act(action: planning.Action) -> bool:
            if action.key in held:
                return False
            if action.key in desired:
                return True
            # Removing an undeclared app: only when the repository it came from was read.
            row = live.get(action.key)
            return all_good if row is None or not row.source else row.source in good

        actions = [a for a in planning.plan(desired, observed) if may_act(a)]
        return _Plan(desired, manifest_errors, frozenset(prune), observed, actions, held)

    def _hold(self, desired: dict[tuple[str, str], specs.AppSpec], live: dict[tuple[str, str], store.App],
              result: PassResult) -> dict[tuple[str, str], CynchrodError]:
        """Fill in secret digests and built image tags; return the apps that must not be
        acted on, and why."""
        held: dict[tuple[str, str], CynchrodError] = {}
        fetched: dict[tuple[str, str], str] = {}
        for key, spec in desired.items():
            if any(s.build for s in spec.services):
                if self.builds is None:
                    held[key] = PermanentError("this daemon does not build images", code="build_failed")
                    continue
                try:
                    desired[key] = spec = self.builds.resolve(spec, fetched)
                except CynchrodError as exc:
                    held[key] = exc
                    continue
            if not spec.secret_names:
                continue
            if self.secrets is None:
                held[key] = secrets_mod.SecretMissing("this daemon has no secret store")
                continue
            try:
                digests = self.secrets.digest(spec)
            except CynchrodError as exc:
                held[key] = exc
                continue
            desired[key] = dataclasses.replace(spec, services=tuple(
                dataclasses.replace(s, secret_digest=digests[s.name]) for s in spec.services))
        held.update(self._over_quota(desired, live, result))
        return held

    def _over_quota(self, desired: dict[tuple[str, str], specs.AppSpec], live: dict[tuple[str, str], store.App],
                    result: PassResult) -> dict[tuple[str, str], CynchrodError]:
        """New apps past their org's ``max_apps``: first come (by the commit that added
        their file) first served, ties by name. Apps already admitted are exempt."""
        by_org: dict[str, list[tuple[str, str]]] = {}
        for key in desired:
            by_org.setdefault(key[0], []).append(key)
        refused: dict[tuple[str, str], CynchrodError] = {}
        for org, keys in by_org.items():
            cap = self.max_apps(org)
            admitted = [k for k in keys if k in live and not _quota_refused(live[k])]
            new = [k for k in keys if k not in admitted]
            if len(admitted) + len(new) <= cap:
                continue
            age: dict[tuple[str, str], int] = {}
            for src in self.sources:
                mine = [k for k in new if desired[k].source == src.url]
                commit = result.commits.get(src.url)
                if mine and commit:
                    found = src.introduced(commit, [desired[k].path for k in mine])
                    age.update({k: found.get(desired[k].path, 0) for k in mine})
            new.sort(key=lambda k: (-age.get(k, 0), k[1]))
            room = max(cap - len(admitted), 0)
            for key in new[room:]:
                refused[key] = PermanentError(
                    f"org {org} is at its max_apps of {cap}; {key[1]} was not deployed", code="quota_exceeded")
        return refused

    def _run(self, result: PassResult) -> None:
        live = self.store.live_apps()
        plan = self._prepare(result, live)
        desired, manifest_errors = plan.desired, plan.manifest_errors
        by_app: dict[tuple[str, str], list[planning.Action]] = {}
        for action in plan.actions:
            by_app.setdefault(action.key, []).append(action)
        containers: dict[tuple[str, str], list[planning.Observed]] = {}
        for c in plan.observed:
            containers.setdefault(c.key, []).append(c)

        work: list[tuple[tuple[str, str], list[planning.Action]]] = []
        for key in sorted(set(desired) | set(by_app)):
            spec = desired.get(key)
            app_actions = by_app.get(key, [])
            if spec is None:
                work.append((key, app_actions))
                continue
            app = live.get(key) or self.store.ensure_app(spec, commit=result.commit_of(spec))
            if key not in manifest_errors:
                self.store.record_spec(app, spec, commit=result.commit_of(spec))
            if key in plan.held:
                result.apps.append(self._refuse(app, plan.held[key], result))
                continue
            gated = self._gate(app, spec, app_actions, containers.get(key, []))
            if gated is not None:
                result.apps.append(gated)
            elif app_actions:
                work.append((key, app_actions))
            else:
                result.apps.append(self._settle(app, spec, containers.get(key, []), manifest_errors.get(key),
                                                result))
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = [pool.submit(self._apply_app, key, acts, desired.get(key), live.get(key),
                                   manifest_errors.get(key), result)
                       for key, acts in work]
            for done, fut in enumerate(concurrent.futures.as_completed(futures), 1):
                result.apps.append(outcome := fut.result())  # sorted below
                if self.progress is not None:
                    self.progress(done, len(futures), "; ".join(outcome.actions) or f"{outcome.org}/{outcome.name}")
        for key, app in live.items():
            read = app.source in plan.prune or (not app.source and len(plan.prune) == len(self.sources))
            if read and key not in desired and key not in containers:
                # Declared nowhere and no container left (e.g. a stopped app): soft-delete the row.
                self._remove_resources(*key)
                self.store.remove_app(app.id, commit=result.commit, trigger=result.trigger)
        result.apps.sort(key=lambda a: (a.org, a.name))
        self._follow_up_suspects(plan.observed)

    def _keep_last_good(self, url: str, loaded: manifests.Desired, live: dict[tuple[str, str], store.App],
                        desired: dict[tuple[str, str], specs.AppSpec]) -> dict[tuple[str, str], ManifestError]:
        """Put back the last good spec of each app whose file now fails; return their errors."""
        first_error: dict[str, ManifestError] = {}
        for err in loaded.errors:
            first_error.setdefault(err.path, err)
        failed: dict[tuple[str, str], ManifestError] = {}
        for key, app in live.items():
            if app.source in (url, "") and app.path in loaded.failed_paths and (spec := app.spec) is not None:
                if key not in desired:
                    desired[key] = dataclasses.replace(spec, source=url)
                failed[key] = first_error[app.path]
        return failed

    def _gate(self, app: store.App, spec: specs.AppSpec, actions: list[planning.Action],
              containers: list[planning.Observed]) -> AppOutcome | None:
        """An outcome when the app must not be acted on this pass, else None."""
        key = spec.key
        if self._blocked.get(key) == spec.hash and actions:
            return AppOutcome(spec.org, spec.name, store.FAILED, error=app.last_error)
        if self._blocked.get(key) not in (None, spec.hash):
            del self._blocked[key]
        heal = self._heal.setdefault(key, _Heal())
        now = self._clock()
        if not actions or app.deployed_hash != spec.hash:
            if heal.count and now - heal.last >= HEAL_RESET_S:
                heal.count = 0
            return None
        # The spec was deployed and something diverged since: self-healing.
        if now < heal.next_allowed:
            wait = heal.next_allowed - now
            exited = next((c for c in containers if c.state == "exited"), None)
            why = f"exited with code {exited.exit_code}" if exited is not None else "container is gone"
            if exited is not None and self.runtime.exit_state(exited.id)[1]:
                why = f"oom_killed (service {exited.service} exceeded its memory limit)"
            error = f"crash_loop: {why}; restarting in {wait:.0f}s (restart {heal.count + 1})"
            self.store.update_app(app.id, status=store.FAILED, last_error=error)
            self.wakeup.request_at(wait, "self-heal")
            return AppOutcome(spec.org, spec.name, store.FAILED, error=error)
        heal.count += 1
        heal.last = now
        heal.next_allowed = now + (0.0 if heal.count == 1 else min(HEAL_BACKOFF_MAX_S, 2.0 ** (heal.count - 2)))
        return None

    def _settle(self, app: store.App, spec: specs.AppSpec, containers: list[planning.Observed],
                manifest_error: ManifestError | None, result: PassResult) -> AppOutcome:
        """Record the status of an app that needed no action this pass."""
        running = {c.service for c in containers if c.state == "running"}
        if spec.state == "stopped":
            status = store.STOPPED
        elif running >= {s.name for s in spec.services}:
            status = store.RUNNING
        else:
            status = app.status
        # An OOM note stays until the next deployment; other errors clear once in sync.
        error = app.last_error if (app.last_error or "").startswith("oom_killed") else None
        if manifest_error is not None:
            status, error = store.FAILED, self._record_manifest_error(app, manifest_error, result)
        elif app.deployed_hash != spec.hash:
            # A spec change that needed no container change is still a deployment.
            done = self.store.start_deployment(app.id, commit=result.commit_of(spec), trigger=result.trigger,
                                               spec_hash=spec.hash)
            self.store.finish_deployment(done, status=status)
        main = next((c for c in containers if c.service == spec.services[0].name), None)
        fields = {"status": status, "last_error": error, "deployed_hash": spec.hash,
                  "host_port": main.host_port if main else None,
                  "container_id": main.id if main else app.container_id}
        if any(getattr(app, k) != v for k, v in fields.items()):
            self.store.update_app(app.id, **fields)
        return AppOutcome(spec.org, spec.name, status, error=error)

    def _death_note(self, spec: specs.AppSpec, actions: list[planning.Action]) -> tuple[str, str] | None:
        """Why a container being healed died, when Docker says it was OOM-killed (one inspect)."""
        for action in actions:
            if action.container_id and action.kind in (planning.START, planning.RECREATE):
                _, oom = self.runtime.exit_state(action.container_id)
                service = action.service_spec
                if oom and service is not None:
                    return "oom_killed", (f"service {service.name} of {spec.org}/{spec.name} was killed for "
                                          f"exceeding its memory limit of {service.memory} MB; restarted")
        return None

    def _remove_resources(self, org: str, app: str) -> None:
        """What a deleted app leaves besides containers: network, built images, staged secrets."""
        self.runtime.remove_app_resources(org, app)
        if self.secrets is not None:
            self.secrets.unstage(org, app)

    def _record_manifest_error(self, app: store.App, error: CynchrodError, result: PassResult) -> str:
        """One failed deployment per distinct error, not one per pass."""
        text = str(error)
        if app.last_error != text:
            self.store.fail_deployment_now(app.id, commit=result.commit, trigger=result.trigger, spec_hash=None,
                                           code=error.code, error=text)
        return text

    def _refuse(self, app: store.App, error: CynchrodError, result: PassResult) -> AppOutcome:
        """An app held back this pass: recorded as failed, its containers left as they are."""
        text = self._record_manifest_error(app, error, result)
        if app.status != store.FAILED or app.last_error != text:
            self.store.update_app(app.id, status=store.FAILED, last_error=text)
        return AppOutcome(app.org, app.name, store.FAILED, error=text)

    def _apply_app(self, key: tuple[str, str], actions: list[planning.Action], spec: specs.AppSpec | None,
                   app: store.App | None, manifest_error: ManifestError | None, result: PassResult) -> AppOutcome:
        described = [a.describe() for a in actions]
        if spec is None:
            # Declared nowhere any more: remove its containers, soft-delete its row.
            try:
                for action in actions:
                    self.runtime.apply(action)
                self._remove_resources(*key)
            except CynchrodError as exc:
                log.warning("prune of %s/%s failed: %s", key[0], key[1], exc)
                return AppOutcome(key[0], key[1], store.FAILED, described, str(exc))
            if app is not None:
                self.store.remove_app(app.id, commit=result.commit, trigger=result.trigger)
            return AppOutcome(key[0], key[1], store.REMOVED, described)
        row = self.store.live_app(*key)
        assert row is not None
        action_kind = ""
        trigger = result.trigger if row.deployed_hash != spec.hash else "self-heal"
        deployment = self.store.start_deployment(row.id, commit=result.commit_of(spec), trigger=trigger,
                                                 spec_hash=spec.hash)
        container_id, host_port = row.container_id, row.host_port
        note: tuple[str, str] | None = None
        try:
            if trigger == "self-heal":
                note = self._death_note(spec, actions)
            if spec.secret_names and self.secrets is not None and any(a.kind != planning.STOP for a in actions):
                self.secrets.stage(spec)
            if self.builds is not None and any(a.kind in (planning.CREATE, planning.RECREATE) for a in actions):
                self.builds.ensure(spec, deployment_id=deployment)
            for action in actions:
                log.info("%s", action.describe())
                action_kind = action.kind
                served = self.runtime.apply(action)
                self.stats.actions.labels(action.kind, "ok").inc()
                if served is not None and action.service == spec.services[0].name:
                    container_id, host_port = served.container_id, served.host_port
        except CynchrodError as exc:
            self.stats.actions.labels(action_kind, "failed").inc()
            if exc.permanent:
                self._blocked[key] = spec.hash
            self.store.finish_deployment(deployment, status=store.FAILED, error_code=exc.code, error=exc.message)
            self.store.update_app(row.id, status=store.FAILED, last_error=str(exc))
            return AppOutcome(spec.org, spec.name, store.FAILED, described, str(exc))
        status = store.STOPPED if spec.state == "stopped" else store.RUNNING
        if self.builds is not None:
            self.builds.prune(spec)
        self.store.finish_deployment(deployment, status=status, error_code=note[0] if note else None,
                                     error=note[1] if note else None)
        error = self._record_manifest_error(row, manifest_error, result) if manifest_error else None
        if error is not None:
            status = store.FAILED
        elif note is not None:
            error = f"{note[0]}: {note[1]}"  # running again, but say why it had died
        self.store.update_app(row.id, status=status, last_error=error,
                              deployed_hash=spec.hash, container_id=container_id, host_port=host_port)
        return AppOutcome(spec.org, spec.name, status, described, error)

    # -- the daemon loop ----------------------------------------------------------

    def serve(self, *, interval: float, stop: threading.Event) -> None:
        """Run passes until ``stop`` is set: every ``interval`` s, or at once when woken.

        ``self.interval`` may be changed while it runs (a reloaded config).
        """
        self.interval = interval
        watcher = threading.Thread(target=self.runtime.watch_deaths, args=(self.on_container_event, stop), daemon=True,
                                   name="docker-events")
        watcher.start()
        def wake_on_stop() -> None:
            stop.wait()
            self.wakeup.request("stop")

        stopper = threading.Thread(target=wake_on_stop, daemon=True)
        stopper.start()
        triggers = {"poll"}
        while not stop.is_set():
            try:
                result = self.run_pass(strongest(triggers))
                log.info("pass %s commit=%s apps=%d failed=%d in %.3fs%s", result.trigger,
                         (result.commit or "-")[:12], len(result.apps),
                         sum(a.status == store.FAILED for a in result.apps), result.duration_s,
                         f" source_error={result.source_error}" if result.source_error else "")
            except CynchrodError as exc:
                log.warning("pass failed: %s", exc)
            except Exception:
                log.exception("pass crashed")
            triggers = self.wakeup.wait(self.interval) or {"poll"}
