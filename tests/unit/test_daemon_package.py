"""``python -m cynchrod.daemon.apiserver`` runs ``cynchrod/daemon/__init__.py`` before the
apiserver's first line, which patches sockets and TLS with gevent: that ``__init__`` must import
nothing that imports them (docker, urllib3, ssl), and still give ``daemon.serve`` and the rest."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_the_daemon_package_imports_no_socket_library_until_a_name_is_asked_for() -> None:
    code = textwrap.dedent("""
        import sys
        import cynchrod.daemon as daemon
        early = sorted({"ssl", "socket", "docker", "urllib3", "watchfiles"} & set(sys.modules))
        assert not early, early
        from cynchrod.daemon import StopSignals
        assert callable(daemon.serve) and daemon.Daemon.build and StopSignals and daemon.local_git_dir
        assert daemon.WORKER_CONNECTIONS > 0 and daemon.HEADER_TIMEOUT_S > 0 and daemon.REF_QUIET_MS > 0
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_the_api_process_patches_before_ssl_is_imported() -> None:
    """gevent says so on stderr when ssl came first (the API then blocks a worker on TLS)."""
    done = subprocess.run([sys.executable, "-m", "cynchrod.daemon.apiserver", "99"], capture_output=True,
                          text=True, timeout=60)
    assert "MonkeyPatchWarning" not in done.stderr, done.stderr


WORKER_PATCH = textwrap.dedent("""
    import importlib.metadata, sys
    from cynchrod.daemon import apiserver
    groups = ["gevent.plugins.monkey.will_patch_all", "gevent.plugins.monkey.did_patch_all", "console_scripts"]
    before = [sorted(ep.name for ep in importlib.metadata.entry_points(group=g)) for g in groups]
    if sys.argv[1] == "once":
        apiserver._read_gevent_plugins_once()  # as the API process does before it forks its workers
    read, scans = importlib.metadata.distributions, []
    importlib.metadata.distributions = lambda *a, **k: scans.append(1) or read(*a, **k)
    from gevent import monkey
    monkey.patch_all()  # what each gunicorn gevent worker does first
    gevent_scans = len(scans)
    after = [sorted(ep.name for ep in importlib.metadata.entry_points(group=g)) for g in groups]
    print(gevent_scans, after == before, len(before[2]) > 0)
""")


def test_a_worker_patches_without_reading_every_installed_distribution() -> None:
    """gevent looks for plugins at each patch event; a worker's ``patch_all`` read every installed
    distribution's entry points 25 times (0.45 s of its 0.57 s start). The API process reads them
    once before the fork; gevent's groups and everyone else's give what they gave."""
    def run(mode: str) -> list[str]:
        done = subprocess.run([sys.executable, "-c", WORKER_PATCH, mode], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert run("once") == ["0", "True", "True"]
    scans, same, _ = run("as-gevent-does")
    assert int(scans) > 0 and same == "True"  # the control: without it, gevent reads them at every event
