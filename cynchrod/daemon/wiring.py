"""The composition root: ``Daemon`` wires the store, the sources, the runtime, the reconciler,
the imperative calls and the secrets together (``Daemon.build``), starts the reconciler and the
watchers, and answers the API workers over the channel (``channel_handlers``).

Used by ``processes.serve`` (the reconciler process) and by the CLI's one-shot commands
(``sync``, ``plan``, ``rollback``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cynchrod import runtime, store
from cynchrod.core import planning
from cynchrod.core.codes import Code
from cynchrod.core.errors import CynchrodError, PermanentError, SecretMissing
from cynchrod.daemon import watchers
from cynchrod.desired import config, registry, secrets, source
from cynchrod.shell import builds, channel, control, liveness, metrics, notify, reconciler, updates
from cynchrod.shell.front import PREVIEW_WAIT_S, Change, Unit, make_edge, make_runtime

if TYPE_CHECKING:
    from cynchrod.store import App

log = logging.getLogger("cynchrod")


@dataclasses.dataclass
class Daemon:
    settings: config.Settings
    store: store.Store
    source: source.Followed
    runtime: runtime.Runtime
    reconciler: reconciler.Reconciler
    control: control.Control
    metrics: metrics.Metrics
    secrets: secrets.Secrets
    stop_event: threading.Event = dataclasses.field(default_factory=threading.Event)
    #: Re-reads flags, environment and the config file (for a reload when the file changes).
    rebuild: Callable[[], config.Settings] | None = None
    #: Called after a reload (the API workers are restarted to read the new config).
    on_reload: Callable[[], None] = lambda: None
    #: Probes of the engine and the edge (``liveness``), started with the reconciler.
    liveness: liveness.Liveness | None = None
    #: Image updates (``shell.updates``): its own thread, started with the reconciler.
    checker: updates.Checker | None = None
    #: Notifications and commit statuses (``shell/notify``), started with the reconciler.
    notifier: notify.Notifier | None = None
    _thread: threading.Thread | None = None
    _checker_thread: threading.Thread | None = None
    _watcher: threading.Thread | None = None
    #: One preview at a time: page loads during a long pass must not pile up behind it.
    _previewing: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    @classmethod
    def build(cls, cfg: config.Settings, *, mirrors: pathlib.Path | None = None) -> Daemon:
        """Everything a daemon (or one CLI command) needs, wired together.

        ``mirrors``: where the repository mirrors go instead of the state dir, for a
        command that runs beside a daemon holding the state lock (``plan``, ``rollback``).
        """
        if not cfg.sources:
            raise PermanentError("--repo (or CYNCHROD_REPO) is required", code="usage")
        db = store.Store(cfg.state / "cynchrod.db")
        srcs = [source.open_source(c.repo, branch=c.branch, path=c.path, state_dir=mirrors or cfg.state, org=c.org)
                for c in cfg.sources]
        vault = secrets.Secrets(db, state_dir=cfg.state, files=cfg.runtime != "swarm")
        if vault.files:
            vault.restage_all()  # on a tmpfs: empty after a reboot
        front = make_edge(cfg)
        rt = make_runtime(cfg, instance=db.instance_id(), vault=vault, edge=front)
        stats = metrics.Metrics(db)

        rec = reconciler.Reconciler(src=srcs, rt=rt, db=db, concurrency=cfg.concurrency, stats=stats,
                                    secrets=vault, max_apps=cfg.max_apps, resync_s=cfg.resync,
                                    builds=builds.Builds(state_dir=cfg.state, rt=rt, allow=cfg.build_repo_allowed),
                                    edge=front)
        ctl = control.Control(src=srcs, db=db, wake=rec.wakeup.request, max_apps=cfg.max_apps,
                              build_allowed=cfg.build_repo_allowed)
        probes = [liveness.Probe(name="docker", meta=liveness.ENGINE_META, code=Code.DOCKER_UNAVAILABLE,
                                 check=rt.ping, on_down=rec.view.lost, db=db)]
        if front is not None:
            probes.append(liveness.Probe(name="edge", meta=liveness.EDGE_META, code=Code.EDGE_UNAVAILABLE,
                                         check=front.reassert, db=db))
        made = cls(settings=cfg, store=db, source=srcs[0], runtime=rt, reconciler=rec, control=ctl, metrics=stats,
                   secrets=vault, liveness=liveness.Liveness(probes),
                   checker=updates.Checker(db=db, ctl=ctl, credentials=lambda org: _registry_auths(vault, org),
                                           stats=stats,
                                           client=registry.Registry(insecure=registry.insecure_hosts(cfg.registry_url))))
        # Reads the settings at each use, so a reloaded config's targets apply at once.
        made.notifier = notify.Notifier(db, notify.Targets(lambda: made.settings))
        return made

    _started_at: float = dataclasses.field(default_factory=time.monotonic)

    def recover(self) -> None:
        """Before the first pass: finish or undo a zero-downtime swap a crash interrupted."""
        try:
            self.runtime.recover()
        except CynchrodError as exc:
            log.warning("interrupted swaps not checked (%s); the passes converge them", exc)

    def start(self) -> None:
        self.recover()
        interrupted = self.store.interrupt_unfinished()
        if interrupted:
            log.warning("%d deployment(s) were interrupted by a stop; they are retried", interrupted)
        self._thread = threading.Thread(target=self.reconciler.serve, name="reconciler",
                                        kwargs={"interval": self.settings.interval, "stop": self.stop_event})
        self._thread.start()
        if self.liveness is not None:
            self.liveness.start(self.stop_event)
        if self.notifier is not None:
            self.notifier.start(self.stop_event)
        if self._watched():
            self._watcher = threading.Thread(target=self._watch, name="watch", daemon=True)
            self._watcher.start()
        if self.checker is not None:
            self._checker_thread = threading.Thread(target=self.checker.serve, name="updates", args=(self.stop_event,),
                                                    daemon=True)
            self._checker_thread.start()

    def health(self) -> list[dict[str, str]]:
        """What stops this daemon from doing its job now, as (code, message) pairs; [] when healthy.

        Cheap enough for every probe: the liveness probes' findings (engine, edge), the view's
        event-stream state, the reconciler's last pass, and one small write in the state dir
        (a full disk fails it).
        """
        problems = list(self.liveness.problems()) if self.liveness is not None else []
        rec = self.reconciler
        if rec.view.error is not None and not any(p["code"] == Code.DOCKER_UNAVAILABLE for p in problems):
            problems.append({"code": Code.DOCKER_UNAVAILABLE.value, "message": rec.view.error})
        if rec.last_crash is not None:
            problems.append({"code": Code.PASS_CRASHED.value, "message": rec.last_crash})
        stale = 3 * rec.interval
        since = time.monotonic() - (rec.last_pass_at if rec.last_pass_at is not None else self._started_at)
        if since > stale:
            problems.append({"code": Code.PASSES_STALLED.value,
                             "message": f"no pass has finished for {since:.0f}s (3 intervals is {stale:.0f}s)"})
        # A byte written and synced decides: when it goes through, earlier store write
        # failures are over (the next write will tell otherwise).
        unwritable = _unwritable(self.settings.state)
        if unwritable:
            problems.append({"code": Code.STATE_UNWRITABLE.value, "message": unwritable})
        else:
            rec.state_error = None
        return problems

    def stop(self, timeout: float = 30) -> None:
        self.stop_event.set()
        for thread in (self._thread, self._watcher, self._checker_thread):
            if thread is not None:
                thread.join(timeout)

    # -- watching: local working directories and the config file (``watchers``) ----

    def _watches(self) -> list[watchers.Watch]:
        return watchers.watches(self.settings, self.reconciler.sources,
                                wake=lambda: self.reconciler.wakeup.request("watch"), reload=self.reload_config)

    def _watched(self) -> bool:
        return bool(self._watches())

    def _watch(self) -> None:
        """watchfiles, debounced, one thread per kind of watch (see ``watchers.run``)."""
        watchers.run(self._watches(), stop=self.stop_event, poll_s=lambda: self.settings.interval)

    def reload_config(self) -> bool:
        """Apply a changed config file when it is valid; keep the old one (and say why) when not."""
        if self.rebuild is None:
            return False
        try:
            new = self.rebuild()
        except CynchrodError as exc:
            log.error("config not reloaded, the old one stays: %s", exc)
            self.store.set_meta("config_error", str(exc))
            return False
        if new.sources != self.settings.sources or new.state != self.settings.state:
            log.warning("changes to repositories or the state dir apply after a restart")
        self.settings = dataclasses.replace(new, sources=self.settings.sources, state=self.settings.state)
        self.reconciler.max_apps = self.control.max_apps = self.settings.max_apps
        self.reconciler.interval = self.settings.interval
        self.store.set_meta("config_error", None)
        log.info("config reloaded from %s", self.settings.config_path)
        self.on_reload()
        self.reconciler.wakeup.request("watch")
        return True


    # -- the channel: what the API workers ask of this process ------------------

    def channel_handlers(self) -> dict[str, channel.Handler]:
        def wake(req: dict[str, Any]) -> None:
            trigger = str(req.get("trigger") or "api")
            if req.get("debounced"):
                self.reconciler.wakeup.request_debounced(trigger)
            else:
                self.reconciler.wakeup.request(trigger)

        def units(req: dict[str, Any]) -> list[dict[str, Any]]:
            return [dataclasses.asdict(u) for u in self.app_units(str(req["org"]), str(req["name"]))]

        def preview(req: dict[str, Any]) -> list[dict[str, Any]] | None:
            found = self.preview(str(req["org"]), str(req["name"]))
            return None if found is None else [dataclasses.asdict(c) for c in found]

        def reload(req: dict[str, Any]) -> bool:
            return self.reload_config()

        return {"wake": wake, "health": lambda req: self.health(), "units": units, "preview": preview,
                "reload": reload}

    # -- read-only views for the dashboard (the seams to rewire to a new core) -----

    def app_units(self, org: str, name: str) -> list[Unit]:
        """The app's units as the reconciler's view holds them (no engine call)."""
        return [Unit(service=u.service if not u.replica else f"{u.service}#{u.replica}", instance=u.instance[:12],
                     state=u.state, host_port=u.endpoint)
                for u in sorted(self.reconciler.view.app_units(org, name), key=lambda u: (u.service, u.replica))]

    def log_tail(self, org: str, name: str, lines: int) -> list[tuple[str, str, str]]:
        """The last ``lines`` log lines of all the app's units as (service, timestamp, text)."""
        return [(line.service, line.timestamp, line.line) for line in self.runtime.tail(org, name, lines)]

    def manifest(self, app: App) -> bytes | None:
        """The app's manifest as committed (at the commit its row last recorded)."""
        src = next((s for s in self.reconciler.sources if s.url == app.source), self.source)
        return src.file_at(app.commit, app.path) if app.commit and app.path else None

    def preview(self, org: str, name: str, *, wait_s: float = PREVIEW_WAIT_S) -> list[Change] | None:
        """What the next pass would do to this app, changing nothing; None when that
        cannot be known within ``wait_s`` (a pass is running, or another preview is)."""
        if not self._previewing.acquire(blocking=False):
            return None
        found: list[list[Change]] = []
        done = threading.Event()

        def run() -> None:
            try:
                _, actions = self.reconciler.preview()
                mine = [a for a in actions if a.key == (org, name)]
                found.append([Change(kind=a.kind, service=a.service, reason=a.reason,
                                     running=a.unit.spec_json if a.unit is not None else "", next=_next_spec(a))
                              for a in mine])
            except CynchrodError as exc:
                log.warning("preview of %s/%s failed: %s", org, name, exc)
            finally:
                self._previewing.release()
                done.set()

        threading.Thread(target=run, name="preview", daemon=True).start()
        done.wait(wait_s)
        return found[0] if found else None


def _registry_auths(vault: secrets.Secrets, org: str) -> bytes | None:
    """The org's ``registry-auths`` secret (image updates' registry credentials), None when unset."""
    try:
        return vault.value(org, registry.AUTH_SECRET)
    except SecretMissing:
        return None


def _next_spec(action: planning.Action) -> str:
    service = action.service_spec
    if action.kind == planning.REMOVE or action.spec is None or service is None:
        return ""
    return service.canonical(restarted_at=action.spec.restarted_at)


def _unwritable(state: pathlib.Path) -> str | None:
    """Why nothing can be written in the state dir now (a byte written and synced), else None.

    The store's directory and the mirrors' (``repos``, where commits of API calls are made):
    either may be a mount of its own."""
    for where in (state, state / "repos"):
        if where != state and not where.is_dir():
            continue
        probe = where / ".healthz"
        try:
            with open(probe, "wb") as out:
                out.write(b"1")
                out.flush()
                os.fsync(out.fileno())
            probe.unlink()
        except OSError as exc:
            return f"the state directory {where} cannot be written: {exc.strerror or exc}"
    return None
