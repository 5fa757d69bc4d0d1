"""The desired stage of a pass: what the followed repositories declare, ready for ``decisions.decide``.

Called by the reconciler, in two steps so that the network is never waited on under its pass lock
when it need not be:

    fetch  (``DesiredState.fetch``: each source's remote → the commit to read; no shared state
            is touched, so ``preview`` runs it before taking the lock)
    → read (``DesiredState.read``: that commit's manifests, parsed once per blob and tagged with
            their source; the last good spec of an app whose file now fails; secret digests and
            built image tags; quota caps and file ages) → ``Wanted``.

A pass woken by the engine (``self-heal``) or by a finished build (``build``) puts back what the
last fetch declared: it fetches neither the manifests repositories nor the build repositories
(no round trip to a remote delays a repair; the next poll or webhook brings new commits). A
preview (``plan``, the dashboard) never fetches a build repository either: it reads the commit
the last pass fetched, and an app whose build repository no pass has fetched yet waits for one.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from cynchrod import store
from cynchrod.core import decisions, specs
from cynchrod.core.errors import CynchrodError, ManifestError, PermanentError, SourceError, StateUnwritable
from cynchrod.desired import declared, source
from cynchrod.desired import secrets as secrets_mod
from cynchrod.desired.compose import files as compose_files
from cynchrod.shell import builds as builds_mod

log = logging.getLogger("cynchrod.reconciler")  # the name the logs have always shown

Key = tuple[str, str]

#: Passes that put back what the last fetch declared, without fetching.
NO_FETCH_TRIGGERS = frozenset({"self-heal", "build"})
#: The trigger of a preview (``Reconciler.preview``): it changes nothing and fetches no build repo.
PREVIEW = "plan"

#: From this many apps in a commit, the heap is frozen after the pass that loaded it (below,
#: the collector's cost is small and a full collection per commit would cost more).
FREEZE_APPS = 500


@dataclasses.dataclass
class Fetched:
    """What the fetch step found: per source URL, the commit to read (None: no good commit can
    be read), and the errors met on the way (shown as the pass's ``source_error``)."""

    commits: dict[str, str | None] = dataclasses.field(default_factory=dict)
    errors: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Wanted:
    """The desired stage's result: the parts of ``decisions.Inputs`` Git and the config give,
    and what the pass reports of the sources."""

    #: Resolved specs (secret digests, built image tags), by app.
    specs: dict[Key, specs.AppSpec]
    manifest_errors: dict[Key, list[ManifestError]]
    #: Sources whose commit was read (only their undeclared apps may be pruned).
    read: frozenset[str]
    all_read: bool
    holds: dict[Key, CynchrodError]
    waiting: dict[Key, str]
    max_apps: dict[str, int]
    ages: dict[Key, int]
    #: Per source URL, the commit read; and the first source's.
    commits: dict[str, str]
    commit: str | None
    source_errors: list[str]
    #: Every manifest error, as text (``PassResult.manifest_errors``).
    errors: list[str]
    #: Errors of files that declare no app.
    problems: list[store.Problem]


class DesiredState:
    """The followed sources, their parse caches and what each last declared (kept between passes)."""

    def __init__(self, *, sources: Sequence[source.Followed], db: store.Store,
                 secrets: secrets_mod.Secrets | None = None, builds: builds_mod.Builds | None = None,
                 max_apps: Callable[[str], int] = lambda org: decisions.DEFAULT_MAX_APPS) -> None:
        self.sources = list(sources)
        self.store = db
        self.secrets = secrets
        self.builds = builds
        self.max_apps = max_apps
        # Compose apps' bind-mounted repository files are copied under the state dir (see compose.files).
        files_dir = secrets.state_dir / "files" if secrets is not None else None
        self.files_dir = files_dir
        #: A new commit was read since the last ``prune_files`` (the copies some app used may be unused now).
        self.read_new = False
        self.caches = {s.url: declared.Cache(org=s.org, files_dir=files_dir) for s in self.sources}
        #: Log each manifest error of a newly read commit (the daemon); ``plan`` and ``sync``
        #: print them in their own output instead, so each is shown once.
        self.log_manifest_errors = True
        #: A read loaded a new commit of many apps (the reconciler freezes the heap after the pass).
        self.new_commit = False
        #: Per source URL: the last commit loaded and what it declared.
        self._loaded: dict[str, tuple[str, declared.Desired]] = {}
        #: Per source URL and app: the spec the parse cache gave and its copy tagged with the source.
        self._tags: dict[str, dict[Key, tuple[specs.AppSpec, specs.AppSpec]]] = {}
        #: Per source URL: the problems its last read commit gave (kept while it cannot be read).
        self._problems: dict[str, list[store.Problem]] = {}

    @property
    def problems_known(self) -> bool:
        """Every source has been read once (before that, the store's list of problems is kept)."""
        return all(s.url in self._problems for s in self.sources)

    def loaded(self, url: str) -> declared.Desired | None:
        """What the source last declared (its last loaded commit), if it was loaded."""
        last = self._loaded.get(url)
        return last[1] if last is not None else None

    # -- fetch: the remotes; safe outside the pass lock ----------------------------

    def fetch(self, trigger: str) -> Fetched:
        """Per source, the commit to read: fetched from its remote, or, for a pass that puts back
        what the last fetch declared (``NO_FETCH_TRIGGERS``), the one its mirror holds. A source
        that cannot be fetched falls back to its mirror's commit (its error is reported)."""
        fetched = Fetched()
        for src in self.sources:
            started = time.perf_counter()
            try:
                if trigger in NO_FETCH_TRIGGERS and src.url in self._loaded:
                    commit = src.resolve()
                else:
                    commit = src.fetch()
                    log.debug("fetched %s: %.1f ms", commit[:12], (time.perf_counter() - started) * 1000)
            except (SourceError, StateUnwritable) as exc:  # the mirror's last commit is read instead
                fetched.errors.append(str(exc))
                try:
                    commit = src.resolve()
                except SourceError:
                    fetched.commits[src.url] = None
                    continue
            fetched.commits[src.url] = commit
        return fetched

    # -- read: parse, keep last good, resolve; under the pass lock ---------------------

    def read(self, fetched: Fetched, rows: Mapping[Key, store.App], *, trigger: str) -> Wanted:
        """The desired state of the fetched commits (``rows``: the store's live apps)."""
        source_errors = list(fetched.errors)
        commits: dict[str, str] = {}
        desired: dict[Key, specs.AppSpec] = {}
        manifest_errors: dict[Key, list[ManifestError]] = {}
        problems: list[store.Problem] = []
        errors_text: list[str] = []
        read: set[str] = set()
        for src in self.sources:
            commit = fetched.commits.get(src.url)
            if commit is not None:
                commits[src.url] = commit
            loaded = self._load(src, commit, source_errors)
            if loaded is None:
                # No good commit: repair what the store last knew of its apps, prune none of them.
                for key, app in rows.items():
                    if app.source in (src.url, "") and (spec := app.spec) is not None:
                        desired.setdefault(key, dataclasses.replace(spec, source=src.url))
                problems.extend(self._problems.get(src.url, []))
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
                by_path.setdefault(loaded.owners.get(err.path, err.path), []).append(err)
            # A file that now fails keeps its app's last good spec running.
            for key, app in rows.items():
                if app.source in (src.url, "") and app.path in by_path and (spec := app.spec) is not None:
                    desired.setdefault(key, dataclasses.replace(spec, source=src.url))
                    manifest_errors[key] = by_path.pop(app.path)
            # What is left belongs to no app: the desired state's problems, listed beside the apps.
            self._problems[src.url] = [
                store.Problem(path=e.path, line=e.line, code=e.code, message=e.message,
                              org=orgs.get(loaded.owners.get(e.path, e.path), src.org))
                for found in by_path.values() for e in found]
            problems.extend(self._problems[src.url])
            errors_text.extend(str(e) for e in errors)
        held, waiting = self._resolve(desired, trigger=trigger)
        caps = {org: self.max_apps(org) for org in {k[0] for k in desired}}
        return Wanted(specs=desired, manifest_errors=manifest_errors, read=frozenset(read),
                      all_read=len(read) == len(self.sources), holds=held, waiting=waiting, max_apps=caps,
                      ages=self._ages(desired, rows, caps, commits), commits=commits,
                      commit=commits.get(self.sources[0].url), source_errors=source_errors, errors=errors_text,
                      problems=problems)

    def _load(self, src: source.Followed, commit: str | None, source_errors: list[str]) -> declared.Desired | None:
        """What ``commit`` of the source declares, parsed once per blob; None when there is no good commit."""
        if commit is None:
            return None
        started = time.perf_counter()
        last = self._loaded.get(src.url)
        if last is not None and last[0] == commit:
            return last[1]
        try:
            files, refused = src.files(commit)
        except SourceError as exc:
            source_errors.append(str(exc))
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
        self.read_new = True
        self.new_commit = self.new_commit or len(desired.apps) >= FREEZE_APPS
        log.debug("read and parsed %d manifests of %s: %.1f ms", len(files), commit[:12],
                  (time.perf_counter() - started) * 1000)
        return desired

    def _tagged(self, url: str, apps: dict[Key, specs.AppSpec]) -> dict[Key, specs.AppSpec]:
        """Each parsed spec tagged with its source, reusing last commit's tagged copy when the parse
        cache gave the same spec object (its file did not change): recomputing 300 hashes and JSON
        texts for a push that changed one file was most of a pass's own time."""
        before = self._tags.get(url, {})
        now: dict[Key, tuple[specs.AppSpec, specs.AppSpec]] = {}
        for key, parsed in apps.items():
            pair = before.get(key)
            now[key] = pair if pair is not None and pair[0] is parsed else (
                parsed, dataclasses.replace(parsed, source=url))
        self._tags[url] = now
        return {key: pair[1] for key, pair in now.items()}

    def _resolve(self, desired: dict[Key, specs.AppSpec], *, trigger: str
                 ) -> tuple[dict[Key, CynchrodError], dict[Key, str]]:
        """Fill in secret digests and built image tags (in place); return the apps held,
        and why, and the apps waiting for a build under way.

        Build repositories are fetched by the passes that fetch the manifests (once each per
        pass); the others read the commit their mirror holds. A self-heal or build pass still
        fetches a build repository this host has never fetched (as it does a manifests source
        it never read: there is nothing else to deploy); a preview never does, and shows the
        app waiting for the pass that will."""
        held: dict[Key, CynchrodError] = {}
        waiting: dict[Key, str] = {}
        fetched: dict[tuple[str, str], str] = {}
        fetch = trigger not in NO_FETCH_TRIGGERS and trigger != PREVIEW
        for key, spec in list(desired.items()):
            try:
                if any(s.build for s in spec.services):
                    if self.builds is None:
                        raise PermanentError("this daemon does not build images", code="build_failed")
                    try:
                        desired[key] = spec = self.builds.resolve(spec, fetched, fetch=fetch,
                                                                  fetch_unseen=trigger != PREVIEW)
                    except builds_mod.NotFetched:
                        waiting[key] = decisions.PENDING
                        continue
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
                    if trigger != PREVIEW:
                        self.secrets.stage_inline(spec)  # once per value per process: not in the store
            except CynchrodError as exc:
                held[key] = exc
        return held, waiting

    def prune_files(self, rows: Callable[[], Iterable[store.App]]) -> list[str]:
        """After a pass that read a new commit: remove the copies of repository files (bind mounts,
        configs, build contexts: ``compose.files``) that neither the commits last read, nor a build under
        way, nor any app's recorded or last healthy spec (``rows()``, read after the pass recorded its
        deployments: what runs, what a rollback puts back) refers to, a bounded number at a time.
        Nothing to do (no store read, no file listed, no engine call) otherwise."""
        if not self.read_new or self.files_dir is None:
            return []
        self.read_new = False
        texts = [t for cache in self.caches.values() for t in cache.spec_texts()]
        texts.extend(t for row in rows() for t in (row.spec_json, row.healthy_spec) if t)
        if self.builds is not None:
            texts.extend(self.builds.contexts())
        removed = compose_files.prune(self.files_dir, texts)
        if removed:
            log.info("removed %d unused copies of repository files from %s", len(removed), self.files_dir)
        return removed

    def _ages(self, desired: Mapping[Key, specs.AppSpec], rows: Mapping[Key, store.App], caps: Mapping[str, int],
              commits: Mapping[str, str]) -> dict[Key, int]:
        """For new apps over a cap: how many commits ago their file appeared (older ones are admitted first)."""
        ages: dict[Key, int] = {}
        over = decisions.over_cap(desired, rows, caps)
        for src in self.sources:
            mine = [k for k in over if desired[k].source == src.url]
            commit = commits.get(src.url)
            if mine and commit:
                found = src.introduced(commit, [desired[k].path for k in mine])
                ages.update({k: found.get(desired[k].path, 0) for k in mine})
        return ages
