"""Imperative calls (restart, stop, start, delete, create) recorded as Git commits.

Called by the API (and usable from the CLI). Each call edits the app's manifest
on the branch tip (``edits``), commits it as ``cynchrod <cynchrod@localhost>``,
pushes it (``Source.commit_edit`` re-applies on a new tip when someone else
pushed first), queues a deployment row and wakes the reconciler. Git stays the
one source of truth: the container change is the next pass applying the commit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import posixpath
import time
from collections.abc import Callable, Sequence
from typing import Any

from cynchrod import store
from cynchrod.core import decisions
from cynchrod.core.codes import Code
from cynchrod.core.errors import Conflict as Conflict
from cynchrod.core.errors import Forbidden as Forbidden
from cynchrod.core.errors import InvalidManifest as InvalidManifest
from cynchrod.core.errors import NotFound as NotFound
from cynchrod.core.errors import QuotaExceeded as QuotaExceeded
from cynchrod.core.errors import StateUnwritable
from cynchrod.desired import compose, edits, manifests, source
from cynchrod.shell import builds

log = logging.getLogger("cynchrod.control")


def _runs(path: str, raw: bytes) -> bool:
    """Whether a manifest is valid and declares a running app (not ``state: stopped``)."""
    parsed = manifests.parse(path, raw)
    return parsed.spec is not None and parsed.spec.state == "running"


def _spec_hash(path: str, raw: bytes | None) -> str | None:
    """The app a manifest declares, as a hash; a restart (``restarted_at``) does not count, so
    a rollback goes back to another version, never to the same one before a restart."""
    parsed = manifests.parse(path, raw) if raw is not None else None
    if parsed is None or parsed.spec is None:
        return None
    return dataclasses.replace(parsed.spec, restarted_at=None).hash


def _compose_version(src: source.Followed, commit: str, directory: str) -> tuple[str, bool] | None:
    """A compose app's version at ``commit``: the hash of the spec its folder gives (a restart does not
    count; the values of secrets the repository gives do) and whether it runs; None when the folder is
    absent or does not parse. Bound files and build contexts count by their content (not copied here)."""
    files = src.dir_at(commit, directory) if commit else None
    if not files:
        return None
    spec = compose.parse(directory, files, org=src.org).spec
    if spec is None:
        return None
    secrets = hashlib.sha256(repr(spec.secret_values).encode()).hexdigest()
    return dataclasses.replace(spec, restarted_at=None).hash + secrets, spec.state == "running"


@dataclasses.dataclass(frozen=True)
class Accepted:
    """An imperative call that reached the remote (``commit``) or needed no change (None)."""

    app: store.App
    action: str
    commit: str | None
    deployment_id: int | None


class Control:
    def __init__(self, *, src: source.Followed | Sequence[source.Followed], db: store.Store,
                 wake: Callable[[str], None],
                 max_apps: Callable[[str], int] = lambda org: decisions.DEFAULT_MAX_APPS,
                 build_allowed: Callable[[str, str], bool] = builds.deny_local,
                 blocking: Callable[[Callable[[], Any]], Any] | None = None) -> None:
        self.build_allowed = build_allowed
        self.sources = [src] if isinstance(src, source.Followed) else list(src)
        self.store = db
        self.wake = wake
        self.max_apps = max_apps
        #: Runs a call that may wait on the network or on another process's lock (a push,
        #: a fetch): an API worker passes its thread pool, so its other requests go on.
        self.blocking: Callable[[Callable[[], Any]], Any] = blocking or (lambda call: call())

    def _edit(self, app: store.App, action: str, actor: str,
              edit: Callable[[bytes | None], bytes | None], *, trigger: str = "api") -> Accepted:
        if app.status == store.REMOVED:
            raise Conflict(f"app {app.org}/{app.name} is removed", code="app_removed")
        if not app.path:
            raise Conflict(f"app {app.org}/{app.name} has no manifest in the repository", code="not_in_repo")

        def checked(old: bytes | None) -> bytes | None:
            if old is None:
                raise Conflict(f"{app.path} is no longer in the repository", code="not_in_repo")
            return edit(old)

        src = self._source_of(app)
        message = f"{action} {app.org}/{app.name} (by {actor})"
        commit = self.blocking(lambda: src.commit_edit(app.path, checked, message))
        return self._accepted(app, action, commit, trigger=trigger)

    def _source_of(self, app: store.App) -> source.Followed:
        """The repository that declares the app (the first one for rows from before sources)."""
        return next((s for s in self.sources if s.url == app.source), self.sources[0])

    def source_for_org(self, org: str) -> source.Followed:
        """Where a new app of ``org`` is committed: the repository pinned to it, else the first unpinned."""
        pinned = next((s for s in self.sources if s.org == org), None)
        target = pinned or next((s for s in self.sources if s.org is None), None)
        if target is None:
            raise Forbidden(f"no followed repository accepts apps of org {org!r}")
        return target

    def _accepted(self, app: store.App, action: str, commit: str | None, *, trigger: str = "api") -> Accepted:
        deployment = None
        if commit is not None:
            try:
                deployment = self.store.queue_deployment(app.id, commit=commit, trigger=trigger)
            except StateUnwritable as exc:
                # The commit is in Git: the call is done, and the pass it wakes applies it (and
                # records its deployment once the state dir can be written).
                log.warning("%s: the deployment of commit %s is not queued: %s", app.id, commit[:12], exc)
            self.wake("update" if trigger == "update" else "api")
        return Accepted(app=app, action=action, commit=commit, deployment_id=deployment)

    def bump_image(self, app: store.App, *, service: str | None, expected: str, image: str,
                   message: str) -> Accepted:
        """Commit an image update (``shell.updates``): the manifest's ``image`` (of ``service``, or of the
        app when None) from ``expected`` to ``image``, as the daemon, through the same compare-and-swap
        commit-back as every imperative call; the deployment it queues has trigger ``update``."""
        if not app.path:
            raise Conflict(f"app {app.org}/{app.name} has no manifest in the repository", code="not_in_repo")

        def edit(old: bytes | None) -> bytes | None:
            if old is None:
                raise Conflict(f"{app.path} is no longer in the repository", code="not_in_repo")
            return edits.set_image(old, service, expected, image)

        src = self._source_of(app)
        commit = self.blocking(lambda: src.commit_edit(app.path, edit, message))
        return self._accepted(app, "update", commit, trigger="update")

    def restart(self, app: store.App, *, actor: str) -> Accepted:
        """Recreate a running app's containers. A stopped app is refused (``app_stopped``):
        a restart must not undo a stop that is recorded in Git; ``start`` is the call for that."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{time.time_ns() % 10**9:09d}Z"

        def edit(old: bytes | None) -> bytes | None:
            if edits.declared_state(app.path, old) == "stopped":
                raise Conflict(f"app {app.org}/{app.name} is stopped (state: stopped); start it instead: "
                               f"POST /apps/{app.id}/start or cynchrod start {app.org}/{app.name}",
                               code="app_stopped")
            return edits.set_keys(old or b"", {"restartedAt": stamp}, path=app.path)

        return self._edit(app, "restart", actor, edit)

    def stop(self, app: store.App, *, actor: str) -> Accepted:
        return self._edit(app, "stop", actor,
                          lambda old: edits.set_keys(old or b"", {"state": "stopped"}, path=app.path))

    def start(self, app: store.App, *, actor: str) -> Accepted:
        def edit(old: bytes | None) -> bytes | None:
            if edits.declared_state(app.path, old) == "running":
                return old  # already running: no commit
            return edits.set_keys(old or b"", {"state": "running"}, path=app.path)

        return self._edit(app, "start", actor, edit)

    def delete(self, app: store.App, *, actor: str) -> Accepted:
        return self._edit(app, "delete", actor, lambda old: None)

    def rollback(self, app: store.App, *, actor: str, deployment_id: int | None = None) -> Accepted:
        """Commit the manifest as it was at a previous successful deployment.

        By default: the newest deployment that ended ``running`` (never one whose
        manifest said ``state: stopped``) with a manifest whose app differs from the
        one on the branch now (compared as parsed specs, so comments, an explicit
        default or a restart do not count), so a failed or broken change is undone too.
        ``deployment_id`` may name any successful one (running or stopped).
        The file is restored byte for byte; the deployment's trigger is ``rollback``.
        """
        src = self._source_of(app)
        if compose.is_compose_file(app.path):
            return self._rollback_compose(app, src, actor=actor, deployment_id=deployment_id)

        def version(commit: str) -> tuple[str, bool] | None:
            raw = src.file_at(commit, app.path) if commit else None
            found = _spec_hash(app.path, raw)
            return None if found is None or raw is None else (found, _runs(app.path, raw))

        target = self._target(app, deployment_id, version, now=lambda: version(self.blocking(src.fetch)))
        assert target.commit is not None
        old = src.file_at(target.commit, app.path)
        if old is None:
            raise Conflict(f"{app.path} is not in commit {target.commit[:12]}", code="not_in_repo")
        return self._edit(app, f"rollback to deployment {target.id} ({target.commit[:12]})", actor,
                          lambda current: old, trigger="rollback")

    def _rollback_compose(self, app: store.App, src: source.Followed, *, actor: str,
                          deployment_id: int | None) -> Accepted:
        """A compose app is its folder (compose files, ``.env``, env files, bound files, build contexts):
        the folder is committed as it was at the chosen deployment, every file byte for byte (files
        added since are removed), chosen as ``rollback`` chooses a manifest, the versions compared as
        the specs the whole folder gives."""
        if app.status == store.REMOVED:
            raise Conflict(f"app {app.org}/{app.name} is removed", code="app_removed")
        directory = posixpath.dirname(app.path)
        target = self._target(app, deployment_id, lambda commit: _compose_version(src, commit, directory),
                              now=lambda: _compose_version(src, self.blocking(src.fetch), directory))
        assert target.commit is not None
        message = f"rollback to deployment {target.id} ({target.commit[:12]}) {app.org}/{app.name} (by {actor})"
        commit = self.blocking(lambda: src.restore_directory(directory, target.commit or "", message))
        return self._accepted(app, f"rollback to deployment {target.id} ({target.commit[:12]})", commit,
                              trigger="rollback")

    def _target(self, app: store.App, deployment_id: int | None,
                version: Callable[[str], tuple[str, bool] | None],
                now: Callable[[], tuple[str, bool] | None]) -> store.Deployment:
        """The deployment a rollback goes back to: ``deployment_id`` (any successful one), else the
        newest that ended ``running`` with a running version (``version(commit)``: its identity and
        whether it runs) other than the branch's now."""
        done = [d for d in self.store.deployments(app.id, limit=1000)
                if d.status in (store.RUNNING, store.STOPPED) and d.commit]
        if deployment_id is not None:
            found = next((d for d in done if d.id == deployment_id), None)
            if found is None:
                raise NotFound(f"no successful deployment {deployment_id} of app {app.id}")
            return found
        current = now()
        for d in done:
            if d.status != store.RUNNING:
                continue
            then = version(d.commit or "")
            if then is not None and then[1] and then[0] != (current[0] if current else None):
                return d
        raise Conflict(f"app {app.org}/{app.name} has no earlier successful deployment to go back to",
                       code="no_previous_deployment")

    def create(self, data: dict[str, Any], *, token: store.Token, body: bytes | None = None) -> Accepted:
        """Commit a new manifest for ``data`` (a manifest as a mapping).

        ``body`` is the request body ``data`` was read from (JSON or YAML): errors
        then point at its lines (``body:LINE: code: message``), not at the lines
        of the file that would have been generated.
        """
        if not isinstance(data, dict):
            raise InvalidManifest("the body must be a manifest: a mapping of keys to values", [])
        data = dict(data)
        org = data.setdefault("org", token.org)
        if not token.sees(str(org)):
            raise Forbidden(f"this token cannot create apps in org {org!r}")
        name = str(data.get("name", ""))
        target = self.source_for_org(str(org))
        path = posixpath.join(target.apps_prefix, str(org), f"{name}.yaml")
        raw = edits.new_manifest(data, header=f"created through the API by {token.name}")
        parsed = manifests.parse(path, raw, org=target.org)
        if parsed.spec is None:
            found = parsed.errors
            if body is not None:
                # JSON is YAML too, so the body parses with its own line numbers; a body
                # YAML reads differently from JSON (tabs, duplicate keys) keeps the file's.
                own = manifests.parse("body", body, org=target.org).errors
                if own and not any(e.code == Code.YAML_SYNTAX for e in own):
                    found = own
            errors = [str(e) for e in found]
            raise InvalidManifest("; ".join(errors), errors)
        spec = parsed.spec
        refused = [f"{path}:1: policy_violation: {builds.refusal(s.build.repo)}" for s in spec.services
                   if s.build is not None and not self.build_allowed(spec.org, s.build.repo)]
        if refused:
            raise InvalidManifest("; ".join(refused), refused)
        # Quota and existence are checked and a place reserved in one store transaction
        # (any process), so concurrent creates at the cap leave exactly max_apps apps;
        # no lock is held while the commit is pushed.
        try:
            self.store.reserve_app(spec.org, spec.name, cap=self.max_apps(spec.org))
        except store.AppExists as exc:
            raise Conflict(exc.message, code="app_exists") from exc
        except store.QuotaFull as exc:
            raise QuotaExceeded(exc.message) from exc
        try:
            def write(old: bytes | None) -> bytes | None:
                if old is not None:
                    raise Conflict(f"{path} already exists in the repository", code="app_exists")
                return raw

            commit = self.blocking(lambda: target.commit_edit(path, write,
                                                              f"create {spec.org}/{spec.name} (by {token.name})"))
            try:
                app = self.store.ensure_app(dataclasses.replace(spec, path=path, source=target.url), commit=commit)
            except StateUnwritable as exc:
                # Git has the app (the one source of truth): the next pass makes its row and deploys it.
                self.wake("api")
                raise StateUnwritable(f"{spec.org}/{spec.name} is committed ({str(commit)[:12]}) and will be "
                                      f"deployed, but its row could not be written: {exc.message}") from exc
        finally:
            with contextlib.suppress(StateUnwritable):  # a reservation expires by itself
                self.store.release_app(spec.org, spec.name)
        return self._accepted(app, "create", commit)
