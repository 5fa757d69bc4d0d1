"""The daemon: the reconciler loop and the API in one process, served by gunicorn.

``cynchrod serve`` holds the state lock in gunicorn's master process and runs
one ``gthread`` worker. The worker builds the ``Daemon`` (store, source,
runtime, reconciler, control, metrics) after the fork, starts the reconciler
thread, and serves the Flask app; each open log WebSocket holds one of its
threads. SIGTERM stops the worker, which stops the reconciler between passes.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import watchfiles
from gunicorn.app.base import BaseApplication

from cynchrod import builds, config, control, metrics, reconciler, runtime, secrets, source, store
from cynchrod.errors import CynchrodError, PermanentError

if TYPE_CHECKING:
    from cynchrod.api.auth import Tickets

log = logging.getLogger("cynchrod")
#: Worker threads: API requests plus the log streams they may hold open.
THREADS = 32


@dataclasses.dataclass
class Daemon:
    settings: config.Settings
    store: store.Store
    source: source.Source
    runtime: runtime.DockerRuntime
    reconciler: reconciler.Reconciler
    control: control.Control
    metrics: metrics.Metrics
    tickets: Tickets
    secrets: secrets.Secrets
    stop_event: threading.Event = dataclasses.field(default_factory=threading.Event)
    #: Re-reads flags, environment and the config file (for a reload when the file changes).
    rebuild: Callable[[], config.Settings] | None = None
    _thread: threading.Thread | None = None
    _watcher: threading.Thread | None = None

    @classmethod
    def build(cls, cfg: config.Settings) -> Daemon:
        if not cfg.sources:
            raise PermanentError("--repo (or CYNCHROD_REPO) is required", code="usage")
        db = store.Store(cfg.state / "cynchrod.db")
        srcs = [source.open_source(c.repo, branch=c.branch, path=c.path, state_dir=cfg.state, org=c.org)
                for c in cfg.sources]
        vault = secrets.Secrets(db, state_dir=cfg.state)
        vault.restage_all()  # on a tmpfs: empty after a reboot
        rt = runtime.DockerRuntime(owner=cfg.owner, publish_address=cfg.publish_address,
                                   stop_timeout=cfg.stop_timeout, secrets_dir=vault.staging.resolve())
        stats = metrics.Metrics(db)
        rec = reconciler.Reconciler(src=srcs, rt=rt, db=db, concurrency=cfg.concurrency, stats=stats,
                                    secrets=vault, max_apps=cfg.max_apps,
                                    builds=builds.Builds(state_dir=cfg.state, rt=rt, allow=cfg.build_repo_allowed))
        ctl = control.Control(src=srcs, db=db, wake=rec.wakeup.request, max_apps=cfg.max_apps,
                              build_allowed=cfg.build_repo_allowed)
        from cynchrod.api.auth import Tickets  # flask stays out of the CLI's import path

        return cls(settings=cfg, store=db, source=srcs[0], runtime=rt, reconciler=rec, control=ctl, metrics=stats,
                   tickets=Tickets(), secrets=vault)

    def start(self) -> None:
        interrupted = self.store.interrupt_unfinished()
        if interrupted:
            log.warning("%d deployment(s) were interrupted by a stop; they are retried", interrupted)
        self._thread = threading.Thread(target=self.reconciler.serve, name="reconciler",
                                        kwargs={"interval": self.settings.interval, "stop": self.stop_event})
        self._thread.start()
        if self._watched():
            self._watcher = threading.Thread(target=self._watch, name="watch", daemon=True)
            self._watcher.start()

    def stop(self, timeout: float = 30) -> None:
        self.stop_event.set()
        for thread in (self._thread, self._watcher):
            if thread is not None:
                thread.join(timeout)

    # -- watching: local working directories and the config file ----------------

    def _watched(self) -> list[pathlib.Path]:
        """What is watched: the apps directories of local working trees (recursively) and the
        config file (through its folder, not recursively, filtered to that one name: an editor's
        save replaces the file, which a watch on the file itself would lose)."""
        dirs = [s.apps_dir for s in self.reconciler.sources if isinstance(s, source.WorkTreeSource)]
        if self.settings.config_path:
            dirs.append(pathlib.Path(self.settings.config_path).resolve())
        return [d for d in dirs if d.is_dir() or d.is_file()]

    def _watch(self) -> None:
        """watchfiles, debounced: a saved manifest wakes a pass; a saved config is reloaded."""
        watched = self._watched()
        config = next((p for p in watched if p.is_file()), None)
        apps = [p for p in watched if p.is_dir()]

        def loop(paths: list[pathlib.Path], recursive: bool, only: str | None, act: Callable[[], None]) -> None:
            def wanted(change: watchfiles.Change, path: str) -> bool:
                return path == only if only is not None else watchfiles.DefaultFilter()(change, path)

            try:
                for _ in watchfiles.watch(*paths, debounce=200, step=50, stop_event=self.stop_event,
                                          raise_interrupt=False, recursive=recursive, watch_filter=wanted):
                    act()
            except Exception:
                log.exception("the file watcher stopped; changes are picked up by the %ss poll",
                              self.settings.interval)

        if config is not None:
            threading.Thread(target=loop, name="watch-config", daemon=True,
                             args=([config.parent], False, str(config), self.reload_config)).start()
        if apps:
            loop(apps, True, None, lambda: self.reconciler.wakeup.request("watch"))

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
        self.reconciler.wakeup.request("watch")
        return True


class Server(BaseApplication):  # type: ignore[misc]
    """gunicorn, configured in code: one gthread worker that owns the daemon."""

    def __init__(self, cfg: config.Settings, rebuild: Callable[[], config.Settings] | None = None) -> None:
        self.settings = cfg
        self.rebuild = rebuild
        self.daemon: Daemon | None = None
        super().__init__()

    def load_config(self) -> None:
        options = {
            "bind": self.settings.listen, "workers": 1, "worker_class": "gthread", "threads": THREADS,
            "timeout": 60, "graceful_timeout": 5, "accesslog": None, "errorlog": "-", "loglevel": "warning",
            "proc_name": "cynchrod", "worker_exit": self._worker_exit,
        }
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from cynchrod.api import create_app

        self.daemon = Daemon.build(self.settings)
        self.daemon.rebuild = self.rebuild
        self.daemon.start()
        log.info("API listening on http://%s", self.settings.listen)
        return create_app(self.daemon)

    def _worker_exit(self, server: Any, worker: Any) -> None:
        if self.daemon is not None:
            self.daemon.stop()
