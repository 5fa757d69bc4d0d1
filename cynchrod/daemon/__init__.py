"""The daemon: one reconciler process beside N API worker processes.

``cynchrod serve`` holds the state lock and becomes the reconciler process: the
only writer of deployments and the only one acting on the engine (``Daemon``).
Before it starts a thread it forks the API, which execs ``cynchrod.daemon.apiserver`` (a
fresh interpreter, gevent patched before anything imports sockets or TLS): a
gunicorn master with ``--workers`` gevent workers (one per core by default,
``cynchrod.daemon.apiworker``), each serving the Flask app over a
``Front``: the store (SQLite WAL, read directly, caches checked by
``Store.generation``), imperative commits (``control``, pushed from a thread pool
under the mirror's file lock), and the reconciler's memory (health, units,
previews) and wake-ups over the channel socket (``cynchrod.shell.channel``).

A connection costs a greenlet, not a thread: a request's line and headers must
arrive within ``HEADER_TIMEOUT_S`` and its body within ``BODY_TIMEOUT_S``, each
worker takes at most ``WORKER_CONNECTIONS`` connections, and every engine call
on a request path has a deadline (``REQUEST_DEADLINE_S``), so idle, slow or
hostile clients and a hung Docker cannot take the API. SIGTERM to the daemon
stops the API and then the reconciler between passes.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import pathlib
import pickle
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import watchfiles

from cynchrod import runtime, store
from cynchrod.core import planning
from cynchrod.core.errors import CynchrodError, PermanentError
from cynchrod.desired import config, secrets, source
from cynchrod.runtime import local
from cynchrod.shell import builds, channel, control, metrics, reconciler
from cynchrod.shell.front import PREVIEW_WAIT_S, Change, Unit, make_runtime

if TYPE_CHECKING:
    from cynchrod.store import App

log = logging.getLogger("cynchrod")
#: How long a watched repository's refs must be quiet before a push wakes a pass.
REF_QUIET_MS = 10
#: Connections one API worker serves at once (each a greenlet).
WORKER_CONNECTIONS = 1000
#: Seconds a client has to send a request's line and headers (also the keep-alive idle time).
HEADER_TIMEOUT_S = 5
#: Seconds a client has to send a request's body.
BODY_TIMEOUT_S = 30


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
    _thread: threading.Thread | None = None
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
        rt = make_runtime(cfg, instance=db.instance_id(), vault=vault)
        stats = metrics.Metrics(db)

        rec = reconciler.Reconciler(src=srcs, rt=rt, db=db, concurrency=cfg.concurrency, stats=stats,
                                    secrets=vault, max_apps=cfg.max_apps, resync_s=cfg.resync,
                                    builds=builds.Builds(state_dir=cfg.state, rt=rt, allow=cfg.build_repo_allowed),
                                    edge=rt.edge if isinstance(rt, local.LocalRuntime) else None)
        ctl = control.Control(src=srcs, db=db, wake=rec.wakeup.request, max_apps=cfg.max_apps,
                              build_allowed=cfg.build_repo_allowed)
        return cls(settings=cfg, store=db, source=srcs[0], runtime=rt, reconciler=rec, control=ctl, metrics=stats,
                   secrets=vault)

    _started_at: float = dataclasses.field(default_factory=time.monotonic)

    def recover(self) -> None:
        """Before the first pass: finish or undo a zero-downtime swap a crash interrupted."""
        if isinstance(self.runtime, local.LocalRuntime):
            try:
                self.runtime.recover_swaps()
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
        if self._watched():
            self._watcher = threading.Thread(target=self._watch, name="watch", daemon=True)
            self._watcher.start()

    def health(self) -> list[dict[str, str]]:
        """What stops this daemon from doing its job now, as (code, message) pairs; [] when healthy.

        Cheap enough for every probe: the view's event-stream state, the reconciler's
        last pass, and one small write in the state dir (a full disk fails it).
        """
        problems = []
        rec = self.reconciler
        if rec.view.error is not None:
            problems.append({"code": "docker_unavailable", "message": rec.view.error})
        if rec.last_crash is not None:
            problems.append({"code": "pass_crashed", "message": rec.last_crash})
        stale = 3 * rec.interval
        since = time.monotonic() - (rec.last_pass_at if rec.last_pass_at is not None else self._started_at)
        if since > stale:
            problems.append({"code": "passes_stalled",
                             "message": f"no pass has finished for {since:.0f}s (3 intervals is {stale:.0f}s)"})
        # A byte written and synced decides: when it goes through, earlier store write
        # failures are over (the next write will tell otherwise).
        unwritable = _unwritable(self.settings.state)
        if unwritable:
            problems.append({"code": "state_unwritable", "message": unwritable})
        else:
            rec.state_error = None
        return problems

    def stop(self, timeout: float = 30) -> None:
        self.stop_event.set()
        for thread in (self._thread, self._watcher):
            if thread is not None:
                thread.join(timeout)

    # -- watching: local working directories and the config file ----------------

    def _watches(self) -> list[tuple[list[pathlib.Path], bool, Callable[[watchfiles.Change, str], bool],
                                     Callable[[], object], int]]:
        """What is watched, as (paths, recursive, filter, action, quiet ms), each as cheaply as it can be:

        * the apps directories of local working trees, recursively: a save wakes a pass
          once the folder has been quiet for 50 ms (an editor's save is several writes);
        * each local repository's ``refs/`` (recursively) and its folder (not recursively,
          for ``packed-refs``): a push moves a ref, after its objects are written, in one
          rename, so 10 ms of quiet is enough (watchfiles yields after one to two quiet
          periods: 50 ms made a push wait 50-100 ms for nothing);
        * the config file, through its folder (not recursively, filtered to its name: an
          editor's save replaces the file, which a watch on the file itself would lose).
        """
        wake = lambda: self.reconciler.wakeup.request("watch")  # noqa: E731
        plain = watchfiles.DefaultFilter()
        watches: list[tuple[list[pathlib.Path], bool, Callable[[watchfiles.Change, str], bool],
                            Callable[[], object], int]] = []
        if self.settings.watch == "on":
            trees = [s.apps_dir for s in self.reconciler.sources if isinstance(s, source.WorkTreeSource)]
            gits = [g for s in self.reconciler.sources if (g := local_git_dir(s)) is not None]
            refs = [d for g in gits for d in (g / "refs", g / "reftable") if d.is_dir()]
            if trees:
                watches.append((trees, True, lambda change, path: bool(plain(change, path)), wake, 50))
            if refs:
                watches.append((refs, True, lambda change, path: bool(plain(change, path)), wake, REF_QUIET_MS))
            if gits:
                watches.append((gits, False, lambda change, path: path.endswith("/packed-refs"), wake,
                                REF_QUIET_MS))
        if self.settings.config_path:
            config_file = pathlib.Path(self.settings.config_path).resolve()
            only = str(config_file)
            watches.append(([config_file.parent], False, lambda change, path: path == only, self.reload_config,
                            50))
        return [w for w in watches if all(p.is_dir() for p in w[0])]

    def _watched(self) -> bool:
        return bool(self._watches())

    def _watch(self) -> None:
        """watchfiles, debounced, one thread per kind of watch (see ``_watches``)."""
        def loop(paths: list[pathlib.Path], recursive: bool, wanted: Callable[[watchfiles.Change, str], bool],
                 act: Callable[[], object], quiet_ms: int) -> None:
            try:
                for _ in watchfiles.watch(*paths, debounce=200, step=quiet_ms, stop_event=self.stop_event,
                                          raise_interrupt=False, recursive=recursive, watch_filter=wanted):
                    log.debug("watch: %s changed", paths[0])
                    act()
            except Exception:
                log.exception("the file watcher stopped; changes are picked up by the %ss poll",
                              self.settings.interval)

        first, *others = self._watches()
        for watch in others:
            threading.Thread(target=loop, name="watch", daemon=True, args=watch).start()
        loop(*first)

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


def _next_spec(action: planning.Action) -> str:
    service = action.service_spec
    if action.kind == planning.REMOVE or action.spec is None or service is None:
        return ""
    return service.canonical(restarted_at=action.spec.restarted_at)


def local_git_dir(src: source.Followed) -> pathlib.Path | None:
    """The git directory of a repository on this machine (bare or not) that ``src`` mirrors, else None.

    Its refs are watched, so a ``git push`` into it is applied at once without a webhook.
    """
    if isinstance(src, source.WorkTreeSource):
        return None  # its files on disk are watched instead
    url = src.url.removeprefix("file://")
    if "://" in url or not url.startswith("/"):
        return None
    root = pathlib.Path(url)
    for candidate in (root, root / ".git"):
        if (candidate / "HEAD").is_file() and (candidate / "refs").is_dir():
            return candidate.resolve()
    return None


def _unwritable(state: pathlib.Path) -> str | None:
    """Why nothing can be written in the state dir now (a byte written and synced), else None."""
    probe = state / ".healthz"
    try:
        with open(probe, "wb") as out:
            out.write(b"1")
            out.flush()
            os.fsync(out.fileno())
        probe.unlink()
    except OSError as exc:
        return f"the state directory {state} cannot be written: {exc.strerror or exc}"
    return None


def _die_with_parent() -> None:
    """Linux: this process gets SIGTERM when the process that forked it dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def serve(cfg: config.Settings, rebuild: Callable[[], config.Settings] | None = None) -> int:
    """``cynchrod serve`` under the state lock: fork the API, then run the reconciler here until
    SIGTERM or SIGINT (or the API's end). Returns the exit code."""
    store.Store(cfg.state / "cynchrod.db").close()  # the schema is made once, before any fork
    metrics.use_directory(metrics.directory_for(cfg.state))
    parent = os.getpid()
    settings_r, settings_w = os.pipe()
    api_pid = os.fork()
    if api_pid == 0:  # the API: a fresh interpreter (cynchrod.daemon.apiserver), gunicorn's master and its workers
        try:
            os.close(settings_w)
            _die_with_parent()  # kept across exec
            # Ctrl-C in a terminal sends SIGINT to the whole process group: the reconciler
            # process takes it and stops the API with SIGTERM (gunicorn's workers turned
            # SIGINT into tracebacks). Kept across exec; gunicorn's master and workers keep
            # ignoring it (ApiServer, apiworker.Worker).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            if os.getppid() != parent:
                os._exit(0)
            os.set_inheritable(settings_r, True)
            package_root = str(pathlib.Path(__file__).resolve().parents[2])  # the folder that holds cynchrod/
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root,
                                                                               os.environ.get("PYTHONPATH")]))}
            os.execve(sys.executable, [sys.executable, "-m", "cynchrod.daemon.apiserver", str(settings_r)], env)
        except BaseException:
            log.exception("the API did not start")
        finally:
            os._exit(1)
    os.close(settings_r)
    with contextlib.suppress(BrokenPipeError), os.fdopen(settings_w, "wb") as pipe:
        pickle.dump((cfg, rebuild), pipe)  # an API that did not start is seen below as exited

    stop = StopSignals(signal.SIGTERM, signal.SIGINT)
    d = Daemon.build(cfg)
    d.rebuild = rebuild
    d.on_reload = lambda: _signal(api_pid, signal.SIGHUP)
    server = channel.ChannelServer(channel.socket_path(cfg.state), d.channel_handlers())
    server.start(d.stop_event)
    d.start()
    log.info("API listening on http://%s (%d worker processes)", cfg.listen, cfg.api_workers)
    code = 0
    while not stop.wait(0.5):
        pid, status = os.waitpid(api_pid, os.WNOHANG)
        if pid == api_pid:
            log.error("the API process exited (status %s); stopping", status)
            api_pid, code = 0, 1
            break
    if api_pid:
        _signal(api_pid, signal.SIGTERM)
    d.stop()
    server.close()
    if api_pid:
        deadline = time.monotonic() + 15
        while os.waitpid(api_pid, os.WNOHANG)[0] == 0:
            if time.monotonic() > deadline:
                log.warning("the API process did not stop in time; killing it")
                _signal(api_pid, signal.SIGKILL)
                os.waitpid(api_pid, 0)
                break
            time.sleep(0.1)
    return code


class StopSignals:
    """Signals as a flag, and a byte on a socket pair that ends :meth:`wait` at once.

    The handler takes no lock. One that called ``threading.Event.set()`` (as this code once
    did) can run while this same thread holds that Event's lock inside its ``wait`` (Python
    runs handlers between bytecodes, and ``wait`` holds the lock across a few of them), and
    then blocks on it forever: a daemon that ignored SIGTERM for 30 s was seen once in CI.
    """

    def __init__(self, *signals: int) -> None:
        self.received: int | None = None
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        for sig in signals:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.received = signum

    def wait(self, timeout: float) -> bool:
        """True once a signal came; else after ``timeout`` s, False."""
        if self.received is None:
            select.select([self._r], [], [], timeout)
            with contextlib.suppress(BlockingIOError):
                while self._r.recv(4096):
                    pass
        return self.received is not None


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
