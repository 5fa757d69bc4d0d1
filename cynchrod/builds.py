"""Repo apps: images built from their own source repository.

Called by the reconciler. Each pass resolves a build's ``ref`` to a commit
(a bare mirror under ``state/builds``, fetched once a pass) and names the image
``cynchrod/<org>-<app>[-<service>]:<commit12>``, so a new source commit is a
new spec. When that image is missing, the tree at the commit is exported to a
temporary build context and built by the engine (one build at a time), its
output written to ``state/builds/logs/<deployment id>.log``. A failed build
fails the deployment with the tail of that log; the running version stays.
After a good deploy, the app's older images are pruned, keeping the last few.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import pathlib
import tempfile
import threading
from collections.abc import Callable

from cynchrod import config, runtime, source, specs
from cynchrod.errors import PermanentError, SourceError

log = logging.getLogger(__name__)
KEEP_IMAGES = 3
LOG_TAIL_LINES = 30
MAX_LOG_BYTES = 4 * 1024 * 1024


def deny_local(org: str, url: str) -> bool:
    """The default policy: remote repositories only (no ``builds.localRepos``)."""
    return config.repo_allowed(url, ())


def refusal(url: str) -> str:
    return (f"build.repo {url!r} is a repository on this machine, and the config's builds.localRepos "
            "does not allow it for this org")


class Builds:
    def __init__(self, *, state_dir: pathlib.Path, rt: runtime.DockerRuntime,
                 allow: Callable[[str, str], bool] = deny_local) -> None:
        #: ``allow(org, url)``: whether an app of ``org`` may build from ``url`` (the config's
        #: ``builds.localRepos``): a local path or file:// URL anywhere else is ``policy_violation``,
        #: so no token or committer can build from another repository on this machine.
        self.allow = allow
        self.root = state_dir / "builds"
        self.logs = self.root / "logs"
        self.runtime = rt
        self._sources: dict[tuple[str, str], source.Source] = {}
        self._lock = threading.Lock()  # one build at a time on this host

    def _source(self, build: specs.Build) -> source.Source:
        key = (build.repo, build.ref)
        if key not in self._sources:
            digest = hashlib.sha256(build.repo.encode()).hexdigest()[:8]
            self._sources[key] = source.Source(build.repo, branch=build.ref, state_dir=self.root / digest)
        return self._sources[key]

    @staticmethod
    def tag(spec: specs.AppSpec, service: specs.ServiceSpec, commit: str) -> str:
        suffix = f"-{service.name}" if spec.multi else ""
        return f"cynchrod/{spec.org}-{spec.name}{suffix}:{commit[:12]}"

    def resolve(self, spec: specs.AppSpec, fetched: dict[tuple[str, str], str]) -> specs.AppSpec:
        """The spec with each built service's image set to the tag of its source commit.

        ``fetched`` memoises commits within one pass. An unreachable source
        falls back to the commit last fetched; never fetched is ``build_source_unavailable``.
        """
        services = []
        for service in spec.services:
            if service.build is None:
                services.append(service)
                continue
            if not self.allow(spec.org, service.build.repo):
                raise PermanentError(refusal(service.build.repo), code="policy_violation")
            key = (service.build.repo, service.build.ref)
            if key not in fetched:
                src = self._source(service.build)
                try:
                    fetched[key] = src.fetch()
                except SourceError as exc:
                    try:
                        fetched[key] = src.resolve()
                    except SourceError:
                        raise PermanentError(str(exc.message), code="build_source_unavailable") from exc
            services.append(dataclasses.replace(service, image=self.tag(spec, service, fetched[key])))
        return dataclasses.replace(spec, services=tuple(services))

    def ensure(self, spec: specs.AppSpec, *, deployment_id: int) -> bool:
        """Build every missing image of ``spec``; True when something was built."""
        built = False
        for service in spec.services:
            if service.build is None or self.runtime.image_exists(service.image):
                continue
            self._build(spec, service, deployment_id)
            built = True
        return built

    def log_path(self, deployment_id: int) -> pathlib.Path:
        return self.logs / f"{deployment_id}.log"

    def _build(self, spec: specs.AppSpec, service: specs.ServiceSpec, deployment_id: int) -> None:
        assert service.build is not None
        build = service.build
        commit = service.image.rsplit(":", 1)[1]
        self.logs.mkdir(parents=True, exist_ok=True)
        tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        with self._lock, open(self.log_path(deployment_id), "a", encoding="utf-8") as out, \
                tempfile.TemporaryDirectory(prefix="cynchrod-build-") as tmp:
            written = 0

            def line(text: str) -> None:
                nonlocal written
                tail.append(text)
                if written < MAX_LOG_BYTES:
                    out.write(text + "\n")
                    out.flush()
                    written += len(text) + 1

            line(f"# build {spec.org}/{spec.name} [{service.name}] from {build.repo} {build.ref} "
                 f"({commit}) as {service.image}")
            src = self._source(build)
            full = src.resolve()
            src.export(full, pathlib.Path(tmp) / "src")
            context = (pathlib.Path(tmp) / "src" / build.context).resolve()
            if not context.is_relative_to(pathlib.Path(tmp)) or not context.is_dir():
                line(f"context {build.context!r} is not a directory of the source")
                raise PermanentError(f"build context {build.context!r} not found", code="build_failed")
            try:
                self.runtime.build_image(context, dockerfile=build.dockerfile, tag=service.image,
                                         args=dict(build.args), org=spec.org, app=spec.name, log=line)
            except PermanentError as exc:
                raise PermanentError(f"build failed: {exc.message}\n" + "\n".join(tail),
                                     code="build_failed") from exc
            line(f"# built {service.image}")

    def prune(self, spec: specs.AppSpec) -> None:
        if any(s.build for s in spec.services):
            removed = self.runtime.prune_images(spec.org, spec.name, keep=KEEP_IMAGES * len(spec.services))
            if removed:
                log.info("pruned %d old image(s) of %s/%s", len(removed), spec.org, spec.name)

