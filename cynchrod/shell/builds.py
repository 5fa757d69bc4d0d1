"""Repo apps: images built from their own source repository, in a queue of their own.

Called by the reconciler. Each pass resolves a build's ``ref`` to a commit
(a bare mirror under ``state/builds``, fetched once a pass) and names the image
``cynchrod/<org>-<app>[-<service>]:<commit12>``, so a new source commit is a
new spec. ``state(spec)`` says whether the images exist; when one is missing it
is queued, and the build runs on this module's own worker thread, never inside
a pass: a slow build holds up nothing else. The tree at the commit is exported to
a temporary build context and built by the engine (one build at a time), its
output written to ``state/builds/logs/<deployment id>.log``; when it ends the
reconciler is woken (``on_done``) and the next pass deploys the image. A failed
build fails that deployment with the tail of the log, and the running version
stays until a new source commit. After a good deploy, the app's older images are
pruned, keeping the last few.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import logging
import pathlib
import queue
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

from cynchrod.core import specs
from cynchrod.core.errors import CynchrodError, PermanentError, SourceError
from cynchrod.core.errors import NotFetched as NotFetched
from cynchrod.desired import config, source

log = logging.getLogger("cynchrod.builds")  # the name the logs have always shown
KEEP_IMAGES = 3
LOG_TAIL_LINES = 30
MAX_LOG_BYTES = 4 * 1024 * 1024


BUILDING = "building"


def deny_local(org: str, url: str) -> bool:
    """The default policy: remote repositories only (no ``builds.localRepos``)."""
    return config.repo_allowed(url, ())


def refusal(url: str) -> str:
    return (f"build.repo {url!r} is a repository on this machine, and the config's builds.localRepos "
            "does not allow it for this org")


class Builder(Protocol):
    """What builds need of a runtime."""

    def image_exists(self, image: str) -> bool: ...

    def build_image(self, context: pathlib.Path, *, dockerfile: str, tag: str, args: dict[str, str],
                    org: str, app: str, log: Callable[[str], None], target: str = "") -> None: ...

    def prune_images(self, org: str, app: str, *, keep: int) -> list[str]: ...


class Repo(Protocol):
    """What builds need of a build repository's mirror (``source.Source``)."""

    def fetch(self) -> str: ...

    def resolve(self) -> str: ...

    def export(self, commit: str, dest: pathlib.Path) -> None: ...


def open_mirror(build: specs.Build, state_dir: pathlib.Path) -> Repo:
    """A build repository's bare mirror under ``state_dir``."""
    return source.Source(build.repo, branch=build.ref, state_dir=state_dir)


class Builds:
    def __init__(self, *, state_dir: pathlib.Path, rt: Builder,
                 open_deployment: Callable[[specs.AppSpec], int] | None = None,
                 fail_deployment: Callable[[int, CynchrodError], object] | None = None,
                 allow: Callable[[str, str], bool] = deny_local,
                 open_repo: Callable[[specs.Build, pathlib.Path], Repo] = open_mirror) -> None:
        #: ``allow(org, url)``: whether an app of ``org`` may build from ``url`` (the config's
        #: ``builds.localRepos``): a local path or file:// URL anywhere else is ``policy_violation``,
        #: so no token or committer can build from another repository on this machine.
        self.allow = allow
        self.root = state_dir / "builds"
        self.logs = self.root / "logs"
        self.runtime = rt
        #: Opens a build repository's mirror (tests count its fetches).
        self.open_repo = open_repo
        self._sources: dict[tuple[str, str], Repo] = {}
        self._lock = threading.Lock()  # one build at a time on this host
        #: Called (from the build worker) when a build ends, to wake the reconciler.
        self.on_done: Callable[[], None] = lambda: None
        #: Open a deployment row for a build (the reconciler's store), and fail one.
        self.open_deployment = open_deployment
        self.fail_deployment = fail_deployment
        self._state_lock = threading.Condition()
        #: Per spec hash: the deployment its build runs under, and a failure when it failed.
        self._deployments: dict[str, int] = {}
        self._failed: dict[str, CynchrodError] = {}
        self._queued: set[str] = set()
        #: The local build contexts (compose ``build:``) of the queued and running builds: copies under
        #: the state dir that must outlive a new commit while they are built from.
        self._contexts: dict[str, list[str]] = {}
        #: Images known to exist (no engine call per pass for them).
        self._present: set[str] = set()
        self._queue: queue.Queue[specs.AppSpec | None] = queue.Queue()
        self._worker: threading.Thread | None = None

    def _source(self, build: specs.Build) -> Repo:
        key = (build.repo, build.ref)
        if key not in self._sources:
            digest = hashlib.sha256(build.repo.encode()).hexdigest()[:8]
            self._sources[key] = self.open_repo(build, self.root / digest)
        return self._sources[key]

    @staticmethod
    def tag(spec: specs.AppSpec, service: specs.ServiceSpec, commit: str) -> str:
        suffix = f"-{service.name}" if spec.multi else ""
        return f"cynchrod/{spec.org}-{spec.name}{suffix}:{commit[:12]}"

    def resolve(self, spec: specs.AppSpec, fetched: dict[tuple[str, str], str], *, fetch: bool = True,
                fetch_unseen: bool = True) -> specs.AppSpec:
        """The spec with each built service's image set to the tag of its source commit.

        ``fetched`` memoises commits within one pass. With ``fetch`` the source is fetched
        (once a pass); without, the commit its mirror holds is used, and a source never fetched
        here is fetched only with ``fetch_unseen`` (else ``NotFetched``). An unreachable source
        falls back to the commit last fetched; never fetched is ``build_source_unavailable``.
        """
        services = []
        for service in spec.services:
            if service.build is None or service.build.local:  # a compose build is tagged by its content
                services.append(service)
                continue
            if not self.allow(spec.org, service.build.repo):
                raise PermanentError(refusal(service.build.repo), code="policy_violation")
            key = (service.build.repo, service.build.ref)
            if key not in fetched:
                fetched[key] = self._commit(service.build, fetch=fetch, fetch_unseen=fetch_unseen)
            services.append(dataclasses.replace(service, image=self.tag(spec, service, fetched[key])))
        return dataclasses.replace(spec, services=tuple(services))

    def _commit(self, build: specs.Build, *, fetch: bool, fetch_unseen: bool) -> str:
        src = self._source(build)
        if not fetch:
            try:
                return src.resolve()
            except SourceError:
                if not fetch_unseen:
                    raise NotFetched(build.repo) from None
        try:
            return src.fetch()
        except SourceError as exc:
            try:
                return src.resolve()
            except SourceError:
                raise PermanentError(str(exc.message), code="build_source_unavailable") from exc

    def _missing(self, spec: specs.AppSpec) -> list[specs.ServiceSpec]:
        missing = []
        for service in spec.services:
            if service.build is None or service.image in self._present:
                continue
            if self.runtime.image_exists(service.image):
                self._present.add(service.image)
            else:
                missing.append(service)
        return missing

    def state(self, spec: specs.AppSpec) -> str | CynchrodError | None:
        """None when every image of the (resolved) spec exists; ``BUILDING`` while a build
        is queued or running (one is queued now if needed); the error of a failed build."""
        with self._state_lock:
            if spec.hash in self._failed:
                return self._failed[spec.hash]
            if spec.hash in self._queued:
                return BUILDING
        if not self._missing(spec):
            return None
        with self._state_lock:
            self._queued.add(spec.hash)
            self._contexts[spec.hash] = [s.build.context for s in spec.services if s.build and s.build.local]
            if self.open_deployment is not None:
                self._deployments[spec.hash] = self.open_deployment(spec)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="builds", daemon=True)
                self._worker.start()
        self._queue.put(spec)
        return BUILDING

    def deployment_of(self, spec: specs.AppSpec) -> int | None:
        """The deployment the build of this spec ran under (the deploy continues it)."""
        with self._state_lock:
            return self._deployments.pop(spec.hash, None)

    def _work(self) -> None:
        while (spec := self._queue.get()) is not None:
            deployment = self._deployments.get(spec.hash, 0)
            try:
                self.ensure(spec, deployment_id=deployment)
            except CynchrodError as exc:
                log.warning("build of %s/%s failed: %s", spec.org, spec.name, exc.message.splitlines()[0])
                with self._state_lock:
                    self._failed[spec.hash] = exc
                    self._deployments.pop(spec.hash, None)
                if self.fail_deployment is not None and deployment:
                    self.fail_deployment(deployment, exc)
            except Exception:
                log.exception("build of %s/%s crashed", spec.org, spec.name)
            finally:
                with self._state_lock:
                    self._queued.discard(spec.hash)
                    self._contexts.pop(spec.hash, None)
                    self._state_lock.notify_all()
            self.on_done()

    def contexts(self) -> list[str]:
        """The copies compose builds queued or running now are built from."""
        with self._state_lock:
            return [c for found in self._contexts.values() for c in found]

    def busy(self) -> bool:
        with self._state_lock:
            return bool(self._queued)

    def wait_idle(self, timeout: float) -> bool:
        """Until no build is queued or running (``cynchrod sync`` waits, then deploys)."""
        with self._state_lock:
            return self._state_lock.wait_for(lambda: not self._queued, timeout)

    def stop(self) -> None:
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(1)

    def ensure(self, spec: specs.AppSpec, *, deployment_id: int) -> bool:
        """Build every missing image of ``spec``; True when something was built."""
        built = False
        for service in spec.services:
            if service.build is None or self.runtime.image_exists(service.image):
                continue
            self._build(spec, service, deployment_id)
            self._present.add(service.image)
            built = True
        return built

    def log_path(self, deployment_id: int) -> pathlib.Path:
        return self.logs / f"{deployment_id}.log"

    @contextlib.contextmanager
    def _log(self, deployment_id: int) -> Iterator[tuple[Callable[[str], None], collections.deque[str]]]:
        """A build's log file (``log_path``, capped at ``MAX_LOG_BYTES``), under the one-build lock:
        the function that writes a line, and the last lines (the error's tail)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        with self._lock, open(self.log_path(deployment_id), "a", encoding="utf-8") as out:
            written = 0

            def line(text: str) -> None:
                nonlocal written
                tail.append(text)
                if written < MAX_LOG_BYTES:
                    out.write(text + "\n")
                    out.flush()
                    written += len(text) + 1

            yield line, tail

    def _run(self, spec: specs.AppSpec, service: specs.ServiceSpec, context: pathlib.Path,
             line: Callable[[str], None], tail: collections.deque[str]) -> None:
        assert service.build is not None
        build = service.build
        try:
            self.runtime.build_image(context, dockerfile=build.dockerfile, tag=service.image, args=dict(build.args),
                                     org=spec.org, app=spec.name, log=line, target=build.target)
        except PermanentError as exc:
            raise PermanentError(f"build failed: {exc.message}\n" + "\n".join(tail), code="build_failed") from exc
        line(f"# built {service.image}")

    def _build(self, spec: specs.AppSpec, service: specs.ServiceSpec, deployment_id: int) -> None:
        assert service.build is not None
        build = service.build
        if build.local:
            self._build_local(spec, service, deployment_id)
            return
        commit = service.image.rsplit(":", 1)[1]
        with self._log(deployment_id) as (line, tail), tempfile.TemporaryDirectory(prefix="cynchrod-build-") as tmp:
            line(f"# build {spec.org}/{spec.name} [{service.name}] from {build.repo} {build.ref} "
                 f"({commit}) as {service.image}")
            src = self._source(build)
            full = src.resolve()
            src.export(full, pathlib.Path(tmp) / "src")
            context = (pathlib.Path(tmp) / "src" / build.context).resolve()
            if not context.is_relative_to(pathlib.Path(tmp)) or not context.is_dir():
                line(f"context {build.context!r} is not a directory of the source")
                raise PermanentError(f"build context {build.context!r} not found", code="build_failed")
            self._run(spec, service, context, line, tail)

    def _build_local(self, spec: specs.AppSpec, service: specs.ServiceSpec, deployment_id: int) -> None:
        """A compose service's ``build:``: its context is the copy of the app's folder under the
        state dir (named by its content, written when the compose file was parsed)."""
        assert service.build is not None
        build = service.build
        with self._log(deployment_id) as (line, tail):
            target = f" target {build.target}" if build.target else ""
            line(f"# build {spec.org}/{spec.name} [{service.name}] from {spec.path} ({build.dockerfile}{target}) "
                 f"as {service.image}")
            context = pathlib.Path(build.context)
            if not context.is_dir():
                line(f"the copy of the build context {context} is missing")
                raise PermanentError(f"build context copy {context} not found", code="build_failed")
            self._run(spec, service, context, line, tail)

    def prune(self, spec: specs.AppSpec) -> None:
        if any(s.build for s in spec.services):
            removed = self.runtime.prune_images(spec.org, spec.name, keep=KEEP_IMAGES * len(spec.services))
            if removed:
                log.info("pruned %d old image(s) of %s/%s", len(removed), spec.org, spec.name)

