"""The API process: ``python -m cynchrod.daemon.apiserver FD``, started by ``cynchrod serve``.

``serve`` forks and this module is exec'd in the child, a fresh interpreter, so gevent
patches ``socket``, ``ssl`` and threads before anything imports them: forked from the
reconciler, the API had ``ssl`` and urllib3 (through docker) imported unpatched, and
urllib3 kept direct references to the unpatched ``SSLContext`` (gevent's "Monkey-
patching ssl after ssl has already been imported"), so a TLS connection to a remote
engine would have blocked a whole worker. The settings and the function that re-reads
them (on SIGHUP) come pickled through file descriptor ``FD``.

Then, before gunicorn forks its workers, everything a worker imports is imported here
and moved out of the collector's sight (``gc.freeze``), so the workers share those
pages with this process instead of each having its own copy.
"""

from __future__ import annotations

from gevent import monkey

# Before any other import: sockets and TLS, and threads (the locks the API's modules make at
# import are then gevent's, as in the workers). The workers patch the rest (gunicorn's gevent
# worker); this process stays gunicorn's master, with the real os, signal and select.
monkey.patch_socket()
monkey.patch_ssl()
monkey.patch_thread()
monkey.patch_queue()

import functools  # noqa: E402
import gc  # noqa: E402
import importlib.metadata  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

from gunicorn.app.base import BaseApplication  # noqa: E402

from cynchrod import daemon  # noqa: E402
from cynchrod.core.errors import CynchrodError  # noqa: E402
from cynchrod.desired import config  # noqa: E402
from cynchrod.shell import front  # noqa: E402

log = logging.getLogger("cynchrod")


def _read_gevent_plugins_once() -> None:
    """gevent looks for plugins at every patch event (``gevent.events.notify_and_call_entry_points``),
    and each look reads the entry points of every installed distribution: 25 looks in a worker's
    ``patch_all``, 0.45 s of the 0.57 s a worker took to start (cProfile), for each worker at each
    start. Here the installed entry points are read once, before the fork, and gevent's groups are
    answered from that; every other caller reads them as before. No distribution is installed
    into a running process, so what gevent finds is the same."""
    read = importlib.metadata.entry_points
    everything = functools.cache(read)

    def entry_points(**params: Any) -> Any:
        if params.keys() == {"group"} and str(params["group"]).startswith("gevent."):
            return everything().select(**params)
        return read(**params)

    everything()
    importlib.metadata.entry_points = entry_points


def _in_thread_pool() -> Callable[[Callable[[], Any]], Any]:
    """Run a blocking call (a push, a fetch, a wait on another process's file lock) in the
    gevent hub's pool of native threads, so the worker's other requests go on meanwhile."""
    import gevent

    def run(call: Callable[[], Any]) -> Any:
        # An error comes back as a value and is raised here: gevent's pool would print the
        # traceback of every error a task raises (a 409 is an answer, not a crash).
        def guarded() -> tuple[bool, Any]:
            try:
                return True, call()
            except Exception as exc:
                return False, exc

        ok, value = gevent.get_hub().threadpool.apply(guarded)
        if not ok:
            raise value
        return value

    return run


def _ignore_interrupt(_arbiter: Any) -> None:
    """gunicorn's master set its own SIGINT handler: back to ignored (see ``daemon.serve``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ApiServer(BaseApplication):  # type: ignore[misc]
    """gunicorn, configured in code: ``settings.api_workers`` gevent workers serving the Flask app."""

    def __init__(self, cfg: config.Settings, rebuild: Callable[[], config.Settings] | None = None) -> None:
        self.settings = cfg
        self.rebuild = rebuild
        self._loaded_once = False
        from cynchrod.daemon.apiworker import Share

        # Connections held per worker (workers may be more than ``api_workers`` for a moment, during a reload).
        self.share = Share(max(8, 4 * cfg.api_workers))
        from cynchrod.api import throttle

        # Authentication failures per client address, made before the fork: every worker counts in it.
        self.failures = throttle.Table(free=cfg.auth_failures)
        super().__init__()

    def load_config(self) -> None:
        # Runs in gunicorn's master at start and on every reload (SIGHUP from the reconciler
        # process): the master keeps the last config that was valid, which the new workers
        # then serve; an invalid one leaves it as it was (as the reconciler does).
        if self.rebuild is not None and getattr(self, "cfg", None) is not None and self._loaded_once:
            try:
                self.settings = self.rebuild()
            except CynchrodError as exc:
                log.error("API workers keep the config they had: %s", exc)
        self._loaded_once = True
        options = {
            "bind": self.settings.listen, "workers": self.settings.api_workers,
            "worker_class": "cynchrod.daemon.apiworker.Worker", "worker_connections": daemon.WORKER_CONNECTIONS,
            "keepalive": daemon.HEADER_TIMEOUT_S, "timeout": 60, "graceful_timeout": 5, "accesslog": None,
            "errorlog": "-", "loglevel": "warning", "proc_name": "cynchrod-api", "control_socket_disable": True,
            "pre_fork": self.share.pre_fork, "child_exit": self.share.child_exit,
            "when_ready": _ignore_interrupt,
        }
        for key, value in options.items():
            if key in self.cfg.settings:
                self.cfg.set(key, value)

    def load(self) -> Any:
        from cynchrod.api import create_app

        return create_app(front.Front(self.settings, blocking=_in_thread_pool()), failures=self.failures)



def main(argv: list[str]) -> int:
    # As the reconciler process set them up (``cynchrod.cli.main``, ``daemon.serve``).
    logging.basicConfig(level=os.environ.get("CYNCHROD_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with os.fdopen(int(argv[0]), "rb") as pipe:
        cfg, rebuild = pickle.load(pipe)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # set by metrics.use_directory in the parent
        from prometheus_client import values

        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]

    # What the workers import, imported once here: they share these pages.
    import cynchrod.api
    import cynchrod.api.apps
    import cynchrod.api.dashboard
    import cynchrod.api.logs
    import cynchrod.api.meta
    import cynchrod.api.secrets
    import cynchrod.api.webhooks
    import cynchrod.daemon.apiworker  # noqa: F401

    _read_gevent_plugins_once()
    gc.collect()
    gc.freeze()
    try:
        ApiServer(cfg, rebuild).run()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        gc.unfreeze()  # see Worker.run
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
