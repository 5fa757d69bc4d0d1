"""The daemon's processes: ``serve`` forks the API (``apiserver``, exec'd) and runs the reconciler
here, supervising the API until SIGTERM or SIGINT (``StopSignals``), or the API's end.

Called by ``cynchrod serve`` (``cynchrod.cli``). The wiring is ``wiring.Daemon``'s.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pathlib
import pickle
import select
import signal
import sys
import time
from collections.abc import Callable

from cynchrod import store
from cynchrod.daemon.signals import StopSignals
from cynchrod.daemon.wiring import Daemon
from cynchrod.desired import config
from cynchrod.shell import channel, metrics

log = logging.getLogger("cynchrod")


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
    if api_pid and not _exited(api_pid, API_STOP_S):
        log.warning("the API process did not stop in time; killing it")
        _signal(api_pid, signal.SIGKILL)
        os.waitpid(api_pid, 0)
    return code


#: How long the API process has to stop (its workers finish what they serve) before it is killed.
API_STOP_S = 15


def _exited(pid: int, timeout: float) -> bool:
    """Reap the child ``pid`` once it exits, within ``timeout`` s (woken by its exit, not polled)."""
    fd = os.pidfd_open(pid)
    try:
        deadline = time.monotonic() + timeout
        while os.waitpid(pid, os.WNOHANG)[0] == 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            select.select([fd], [], [], left)
        return True
    finally:
        os.close(fd)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
