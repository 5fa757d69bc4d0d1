"""The image update checker: a thread of its own beside the reconciler, never inside a pass.

Every ``TICK`` it reads the live apps from the store (their last good specs) and finds the services
with an ``update:`` block whose interval has passed. Those are grouped by (registry, repository,
credentials): each group costs one tag list (and one digest ``HEAD`` per followed tag) however many
apps share the image, run on a small pool so a slow registry holds up only its own group. Then, per
service, ``core.updates`` decides; a ``newer`` tag is committed through ``Control.bump_image`` (the
commit-back path of every imperative call: the daemon's identity, compare-and-swap, replayed over
concurrent pushes; message ``update org/app: web 1.4.2 → 1.5.0``), and the normal pass deploys it.
With ``commit: false`` the row says ``available`` instead.

Never fighting a person (state in the store, ``image_updates``):
- a change of the declared image that goes back (an API rollback, a Git revert to an older tag)
  pauses the service's updates until the app's manifest changes again;
- a bump whose deployment failed is remembered, and that tag (or digest) is never proposed again;
- a digest pinned by hand (``image@sha256:…`` without ``digest: true``) is never bumped.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from cynchrod import store
from cynchrod.core import specs, updates
from cynchrod.core.codes import Code
from cynchrod.core.errors import CynchrodError, RegistryError
from cynchrod.desired import registry
from cynchrod.shell import control, metrics

log = logging.getLogger("cynchrod.updates")

TICK = 1.0
WORKERS = 4


@dataclasses.dataclass(frozen=True)
class _Item:
    app: store.App
    spec: specs.AppSpec
    service: specs.ServiceSpec
    policy: updates.UpdatePolicy
    ref: updates.ImageRef


_Group = tuple[str, str, registry.Credentials | None]


class Checker:
    def __init__(self, *, db: store.Store, ctl: control.Control, client: registry.Registry | None = None,
                 credentials: Callable[[str], bytes | None] | None = None, stats: metrics.Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic, workers: int = WORKERS) -> None:
        self.store = db
        self.control = ctl
        self.client = client or registry.Registry()
        #: org -> the ``registry-auths`` secret's value (None when unset).
        self.credentials = credentials or (lambda org: None)
        self.stats = stats
        self.clock = clock
        self._due: dict[tuple[str, str], float] = {}
        self._specs: dict[str, tuple[str, specs.AppSpec]] = {}
        self._inflight: set[_Group] = set()
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="updates")

    def serve(self, stop: threading.Event, *, tick: float = TICK) -> None:
        while not stop.is_set():
            try:
                self.tick()
            except Exception:  # one bad tick never stops the checker
                log.exception("image update check failed")
            stop.wait(tick)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()

    # -- scheduling --------------------------------------------------------------------------------
    def _spec(self, app: store.App) -> specs.AppSpec | None:
        if not app.spec_json:
            return None
        cached = self._specs.get(app.id)
        if cached is None or cached[0] != app.spec_json:
            spec = app.spec
            if spec is None:
                return None
            cached = self._specs[app.id] = (app.spec_json, spec)
        return cached[1]

    def tick(self) -> list[concurrent.futures.Future[None]]:
        """Start the checks that are due; returns their futures (tests wait on them).

        A group (one repository, one set of credentials) is checked when any of its services is due,
        and then for all of them: services added at different times fall into one schedule, so a
        repository is asked once per interval however many apps follow it."""
        now = self.clock()
        groups: dict[_Group, list[_Item]] = {}
        due: set[_Group] = set()
        auths: dict[str, dict[str, registry.Credentials] | RegistryError] = {}
        for app in self.store.live_apps().values():
            spec = self._spec(app)
            if spec is None or spec.state != "running":
                continue
            for service in spec.services:
                policy = service.update
                if policy is None or service.build is not None:
                    continue
                try:
                    ref = updates.parse_reference(service.image)
                except ValueError:
                    continue
                if app.org not in auths:
                    try:
                        auths[app.org] = registry.parse_auths(self.credentials(app.org))
                    except RegistryError as exc:
                        auths[app.org] = exc
                    except CynchrodError as exc:  # the secret cannot be decrypted
                        auths[app.org] = RegistryError(f"{registry.AUTH_SECRET}: {exc.message}",
                                                       code=Code.REGISTRY_UNAUTHORIZED)
                org_auths = auths[app.org]
                item = _Item(app, spec, service, policy, ref)
                is_due = self._due.get((app.id, service.name), 0) <= now
                if isinstance(org_auths, RegistryError):
                    if is_due:
                        self._due[(app.id, service.name)] = now + policy.interval
                        self._record_error(item, org_auths)
                    continue
                group = (ref.registry, ref.repository, org_auths.get(ref.registry))
                groups.setdefault(group, []).append(item)
                if is_due:
                    due.add(group)
        futures = []
        with self._lock:
            for group in due:
                if group in self._inflight:
                    continue
                self._inflight.add(group)
                items = groups[group]
                for item in items:
                    self._due[(item.app.id, item.service.name)] = now + item.policy.interval
                futures.append(self._pool.submit(self._check_group, group, items))
        return futures

    # -- one repository ----------------------------------------------------------------------------
    def _check_group(self, group: _Group, items: list[_Item]) -> None:
        host, _, creds = group
        ref = items[0].ref
        try:
            tags: list[str] = []
            digests: dict[str, str | None] = {}
            try:
                if any(not i.policy.digest for i in items):
                    tags = self.client.tags(ref, credentials=creds)
                for tag in sorted({i.ref.tag for i in items if i.policy.digest and i.ref.tag}):
                    digests[tag] = self.client.digest(ref, tag, credentials=creds)
            except RegistryError as exc:
                self._count("errors", host, exc.code)
                for item in items:
                    self._record_error(item, exc)
                return
            self._count("checks", host)
            for item in items:
                try:
                    self._decide(item, tags, digests)
                except Exception:
                    log.exception("image update of %s/%s failed", item.app.org, item.app.name)
        finally:
            with self._lock:
                self._inflight.discard(group)

    def _count(self, what: str, host: str, code: str | None = None) -> None:
        if self.stats is None:
            return
        if what == "checks":
            self.stats.update_checks.labels(registry=host).inc()
        elif what == "errors":
            self.stats.update_errors.labels(registry=host, code=code or "").inc()
        else:
            self.stats.updates_committed.labels(registry=host).inc()

    def _state(self, item: _Item) -> store.UpdateState:
        found = next((s for s in self.store.update_states(item.app.id) if s.service == item.service.name), None)
        return found or store.UpdateState(app_id=item.app.id, service=item.service.name)

    def _record_error(self, item: _Item, exc: CynchrodError) -> None:
        state = self._state(item)
        self.store.put_update_state(dataclasses.replace(
            state, checked_at=store.now(), error_code=exc.code, error=exc.message))

    def _decide(self, item: _Item, tags: list[str], digests: dict[str, str | None]) -> None:
        state = self._state(item)
        image, policy, app = item.service.image, item.policy, item.app
        if state.bumped_commit is not None and state.seen_commit is not None and app.commit == state.seen_commit:
            # Our bump is committed but no pass has recorded it yet: nothing to decide.
            self.store.put_update_state(dataclasses.replace(state, checked_at=store.now()))
            return
        paused = state.paused_spec
        if state.image and image != state.image and image != state.bumped_to:
            if updates.is_rollback(policy, before=state.image, after=image, bumped_to=state.bumped_to):
                paused = app.spec_json or ""
                log.info("%s/%s: %s went back to %s: image updates pause until its manifest changes",
                         app.org, app.name, state.image, image)
            else:
                paused = None
        elif paused is not None and app.spec_json != paused:
            paused = None  # a person changed the manifest again
        failed = list(state.failed)
        if state.bumped_to is not None and state.bumped_to == image and app.status == store.FAILED:
            tried = image if policy.digest else item.ref.tag
            if tried and tried not in failed:
                failed.append(tried)  # our update failed to deploy: never that one again
        if policy.digest:
            choice = updates.choose_digest(image, digests.get(item.ref.tag or ""), failed=failed,
                                           paused=paused is not None)
        else:
            choice = updates.choose(policy, image, tags, failed=failed, paused=paused is not None)
        fields: dict[str, Any] = {"image": image, "checked_at": store.now(), "candidate": choice.candidate,
                                  "reason": choice.reason, "error_code": None, "error": None,
                                  "paused_spec": paused, "failed": tuple(failed)}
        if choice.reason == "newer" and not policy.commit:
            fields["reason"] = "available"
        elif choice.reason == "newer":
            new = updates.bumped_image(image, choice)
            name = item.ref.repository.rsplit("/", 1)[-1]
            message = (f"update {app.org}/{app.name}: {name} {updates.display_version(image)} → "
                       f"{updates.display_version(new)}")
            try:
                accepted = self.control.bump_image(app, service=item.service.name if item.spec.multi else None,
                                                   expected=image, image=new, message=message)
            except CynchrodError as exc:
                fields.update(error_code=exc.code if exc.code != "temporary" else Code.IMAGE_UPDATE_FAILED,
                              error=exc.message)
            else:
                fields.update(reason="committed", bumped_to=new, bumped_commit=accepted.commit,
                              bumped_at=store.now(), image=new, seen_commit=app.commit)
                self._count("committed", item.ref.registry)
                log.info("%s (commit %s)", message, (accepted.commit or "")[:12])
        self.store.put_update_state(dataclasses.replace(state, **fields))
