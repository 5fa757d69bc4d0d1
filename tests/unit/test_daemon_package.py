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
