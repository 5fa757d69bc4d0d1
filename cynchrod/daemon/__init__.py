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

The package: ``wiring`` (``Daemon``, the composition root), ``watchers`` (watchfiles:
working trees, local repositories' refs, the config file), ``processes`` (``serve``: the
fork of the API and its supervision), ``signals`` (``StopSignals``), ``apiserver`` and ``apiworker``
(the API process and its gevent worker).

This ``__init__`` imports none of them until a name is asked for (``daemon.serve``,
``daemon.Daemon``, ...): ``python -m cynchrod.daemon.apiserver`` runs it before
``apiserver``'s first line, which must patch sockets and TLS with gevent before anything
imports them (docker and urllib3 through ``wiring`` would, unpatched).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cynchrod.daemon.processes import serve
    from cynchrod.daemon.signals import StopSignals
    from cynchrod.daemon.watchers import REF_QUIET_MS, local_git_dir
    from cynchrod.daemon.wiring import Daemon

__all__ = ["BODY_TIMEOUT_S", "HEADER_TIMEOUT_S", "REF_QUIET_MS", "WORKER_CONNECTIONS", "Daemon", "StopSignals",
           "local_git_dir", "serve"]

#: Connections one API worker serves at once (each a greenlet).
WORKER_CONNECTIONS = 1000
#: Seconds a client has to send a request's line and headers (also the keep-alive idle time).
HEADER_TIMEOUT_S = 5
#: Seconds a client has to send a request's body.
BODY_TIMEOUT_S = 30

_WHERE = {"Daemon": "wiring", "serve": "processes", "StopSignals": "signals", "REF_QUIET_MS": "watchers",
          "local_git_dir": "watchers"}


def __getattr__(name: str) -> Any:
    """``daemon.serve``, ``daemon.Daemon``, ...: their module, imported when first asked for."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
