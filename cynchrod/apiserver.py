"""The API process: ``python -m cynchrod.apiserver FD``, started by ``cynchrod serve``.

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

import gc  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import sys  # noqa: E402


def main(argv: list[str]) -> int:
    # As the reconciler process set them up (``cynchrod.cli.main``, ``daemon.serve``).
    logging.basicConfig(level=os.environ.get("CYNCHROD_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with os.fdopen(int(argv[0]), "rb") as pipe:
        cfg, rebuild = pickle.load(pipe)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # set by metrics.use_directory in the parent
        from prometheus_client import values

        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]

    import cynchrod.api
    import cynchrod.api.apps
    import cynchrod.api.dashboard
    import cynchrod.api.logs
    import cynchrod.api.meta
    import cynchrod.api.secrets
    import cynchrod.api.webhooks
    import cynchrod.apiworker  # noqa: F401
    from cynchrod import daemon

    gc.collect()
    gc.freeze()
    try:
        daemon.ApiServer(cfg, rebuild).run()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        gc.unfreeze()  # see Worker.run
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
