"""The client commands (apps, status, logs, deployments, restart/stop/start/delete) against a real
`cynchrod serve`, a real dockerd and a bare Git repository."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import docker
import pytest

from tests.conftest import shared_daemons
from tests.helpers import CLI, TEST_IMAGE, Daemon, GitRepo, cli, new_token, wait_for

TICKER = "[sh, -c, 'i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.2; done']"


@contextlib.contextmanager
def serving(repo: GitRepo, make: Callable[..., Daemon], state: pathlib.Path) -> Iterator[dict[str, str]]:
    """A daemon with two apps, and the environment the demo prints (CYNCHROD_API, CYNCHROD_TOKEN)."""
    token = new_token(state, "default", "alice")
    repo.push({"apps/web.yaml": f"name: web\nimage: {TEST_IMAGE}\ncommand: [sleep, '3600']\nmemory: 64\n",
               "apps/ticker.yaml": f"name: ticker\nimage: {TEST_IMAGE}\ncommand: {TICKER}\nmemory: 64\n"})
    daemon = make(interval=300).start()
    env = {"CYNCHROD_API": daemon.api, "CYNCHROD_TOKEN": token}
    wait_for(lambda: _statuses(env) == {"default/ticker": "running", "default/web": "running"}, 30, "two apps")
    yield env
    assert daemon.stop() == 0


@pytest.fixture(scope="module")
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           docker_client: docker.DockerClient, images: object) -> Iterator[dict[str, str]]:
    """One daemon for the tests that only read (they change no app): starting one costs seconds."""
    with shared_daemons(request, tmp_path_factory, docker_client) as (repo, root, make), \
            serving(repo, make, root / "state") as env:
        yield env


@pytest.fixture
def own_served(repo: GitRepo, daemons: Callable[..., Daemon], tmp_path: pathlib.Path) -> Iterator[dict[str, str]]:
    """A daemon of the test's own, for a test that changes its apps."""
    with serving(repo, daemons, tmp_path / "state") as env:
        yield env


def _statuses(env: dict[str, str]) -> dict[str, str]:
    out = cli("apps", "-o", "json", env=env)
    if out.returncode != 0:
        return {}
    return {f"{a['org']}/{a['name']}": a["status"] for a in json.loads(out.stdout)["apps"]}


def _status(env: dict[str, str], app: str) -> dict[str, Any]:
    out = cli("status", app, "-o", "json", env=env)
    assert out.returncode == 0, out.stderr
    found: dict[str, Any] = json.loads(out.stdout)
    return found


def test_apps_and_status_tables(served: dict[str, str]) -> None:
    out = cli("apps", env=served)
    assert out.returncode == 0, out.stderr
    header, *rows = out.stdout.splitlines()
    assert header.split() == ["ID", "APP", "STATUS", "IMAGE", "PORTS", "UPDATED", "LAST", "ERROR"]
    assert [r.split()[1:4] for r in rows] == [["default/ticker", "running", TEST_IMAGE],
                                             ["default/web", "running", TEST_IMAGE]]
    # Aligned: each column starts at the same offset on every line.
    for column in ("APP", "STATUS", "IMAGE"):
        start = header.index(column)
        assert all(r[start - 2:start] == "  " and r[start] != " " for r in rows), out.stdout
    web_id = rows[1].split()[0]

    by_name = cli("status", "default/web", env=served)
    assert by_name.returncode == 0, by_name.stderr
    lines = by_name.stdout.splitlines()
    assert "status:     running" in lines and f"id:         {web_id}" in lines
    assert any(line.split()[:3] == [line.split()[0], "running", "poll"] for line in lines if line[:1].isdigit())
    by_id = cli("status", web_id, "-o", "json", env=served)
    assert json.loads(by_id.stdout)["app"]["id"] == web_id

    deployments = cli("deployments", "default/web", env=served)
    assert deployments.stdout.splitlines()[0].split() == ["ID", "STATUS", "TRIGGER", "COMMIT", "STARTED", "CODE",
                                                         "ERROR"]
    missing = cli("status", "default/nope", env=served)
    assert missing.returncode == 1 and missing.stderr.startswith("cynchrod: not_found: no app default/nope")
    wrong = cli("apps", "--token", "cyn_wrong", env=served)  # the flag wins over CYNCHROD_TOKEN
    assert wrong.returncode == 1 and "unauthorized" in wrong.stderr


def test_logs_tail_and_follow(served: dict[str, str]) -> None:
    wait_for(lambda: len(cli("logs", "default/ticker", "--tail", "3", env=served).stdout.splitlines()) == 3, 10,
             "three lines")
    tail = cli("logs", "default/ticker", "--tail", "3", env=served).stdout.splitlines()
    numbers = [int(line.split()[1]) for line in tail]
    assert numbers == list(range(numbers[0], numbers[0] + 3))
    assert cli("logs", "default/ticker", "--tail", "0", env=served).returncode == 2

    # SIGTERM (what `kill`, systemd and a test harness send) ends it as Ctrl-C does: the stream
    # closed, no traceback, 128 + the signal. SIGINT is sent with its default disposition restored
    # in the child: a background job of a non-interactive shell inherits SIGINT ignored (POSIX),
    # and the suite must pass there too.
    for sig, status in ((signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 130)):
        follow = subprocess.Popen([*CLI, "logs", "default/ticker", "--tail", "2", "-f"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env={**os.environ, **served},
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            assert follow.stdout is not None and follow.stderr is not None
            got = [follow.stdout.readline().strip() for _ in range(8)]  # 2 from the tail, then live ones
            follow.send_signal(sig)
            assert follow.wait(timeout=10) == status, (sig, follow.stderr.read())
            assert follow.stderr.read() == ""
        finally:
            if follow.poll() is None:
                follow.kill()
                follow.wait()
        seen = [int(line.split()[1]) for line in got]
        assert seen == list(range(seen[0], seen[0] + 8)), got  # in order: nothing lost or doubled at the seam


def _shell(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``command`` in bash, with ``$CLI`` the cynchrod command; stdout is the first stage's exit status."""
    return subprocess.run(["bash", "-c", command + '; echo "${PIPESTATUS[0]}"'], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **env, "CLI": " ".join(CLI)}, stdin=subprocess.DEVNULL)


def test_a_closed_pipe_is_a_quiet_141(served: dict[str, str]) -> None:
    # `true` reads nothing and exits: every write of the CLI meets a closed pipe.
    for command in ("$CLI status default/web | true", "$CLI apps | true",
                    "$CLI logs default/ticker -f | head -n 2 >/dev/null"):
        done = _shell(command, served)
        assert (done.stdout.strip(), done.stderr) == ("141", ""), command


def test_logs_of_a_removed_app_say_so(own_served: dict[str, str]) -> None:
    follow = subprocess.Popen([*CLI, "logs", "default/ticker", "--tail", "1", "-f"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, **own_served})
    try:
        assert follow.stdout is not None and follow.stderr is not None
        assert follow.stdout.readline().startswith("tick ")
        assert cli("delete", "default/ticker", env=own_served).returncode == 0
        assert follow.wait(timeout=30) == 1
        err = follow.stderr.read()
        assert err.startswith("cynchrod: app_removed: ") and err.count("\n") == 1, err
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    wait_for(lambda: _status(own_served, "default/ticker")["app"]["status"] == "removed", 20, "removed")
    for flags in ((), ("-f",)):
        done = cli("logs", "default/ticker", *flags, env=own_served)
        assert done.returncode == 1 and done.stdout == "", (flags, done.stderr)
        assert done.stderr.startswith("cynchrod: app_removed: ") and done.stderr.count("\n") == 1, done.stderr


def test_a_dropped_connection_is_one_line(repo: GitRepo, daemons: Callable[..., Daemon],
                                          tmp_path: pathlib.Path) -> None:
    token = new_token(tmp_path / "state", "default")
    repo.push({"apps/ticker.yaml": f"name: ticker\nimage: {TEST_IMAGE}\ncommand: {TICKER}\nmemory: 64\n"})
    daemon = daemons(interval=300).start()
    env = {"CYNCHROD_API": daemon.api, "CYNCHROD_TOKEN": token}
    wait_for(lambda: _statuses(env) == {"default/ticker": "running"}, 30, "the app")
    follow = subprocess.Popen([*CLI, "logs", "default/ticker", "--tail", "1", "-f"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    try:
        assert follow.stdout is not None and follow.stderr is not None
        assert follow.stdout.readline().startswith("tick ")
        assert daemon.proc is not None
        os.killpg(daemon.proc.pid, signal.SIGKILL)  # the daemon dies mid-stream (no close frame)
        daemon.proc.wait(10)
        assert follow.wait(timeout=30) == 1
        err = follow.stderr.read()
        assert err.startswith("cynchrod: ") and err.count("\n") == 1 and "Traceback" not in err, err
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    for args in (("apps",), ("status", "default/ticker"), ("logs", "default/ticker"), ("logs", "default/ticker", "-f")):
        done = cli(*args, env=env)  # nothing listens there any more
        assert done.returncode == 1 and done.stderr.startswith("cynchrod: api_unreachable: "), (args, done.stderr)
        assert done.stderr.count("\n") == 1


def test_imperative_commands(own_served: dict[str, str]) -> None:
    stopped = cli("stop", "default/web", env=own_served)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.startswith("stop default/web: commit ")
    assert stopped.stdout.split()[-1] in ("queued", "deploying")
    wait_for(lambda: _status(own_served, "default/web")["app"]["status"] == "stopped", 20, "stopped")
    refused = cli("restart", "default/web", env=own_served)
    assert refused.returncode == 1 and "app_stopped" in refused.stderr
    assert "cynchrod start default/web" in refused.stderr
    started = cli("start", "default/web", "-o", "json", env=own_served)
    reply = json.loads(started.stdout)
    assert reply["action"] == "start" and reply["deployment_id"] and reply["app"]["status"] in ("queued", "deploying")
    wait_for(lambda: _status(own_served, "default/web")["app"]["status"] == "running", 20, "running again")
    again = cli("start", "default/web", env=own_served)
    assert again.stdout.strip() == "start default/web: nothing to change (status running)"
    app_id = _status(own_served, "default/web")["app"]["id"]
    assert cli("restart", app_id, env=own_served).returncode == 0  # an id works as well as org/name
    deleted = cli("delete", "default/web", env=own_served)
    assert deleted.returncode == 0, deleted.stderr
    wait_for(lambda: _status(own_served, "default/web")["app"]["status"] == "removed", 20, "removed")
    assert "default/web" not in _statuses(own_served)
    assert "default/web" in cli("apps", "--all", env=own_served).stdout
    triggers = [d["trigger"] for d in _status(own_served, app_id)["deployments"]]
    assert triggers[:4] == ["api", "api", "api", "api"]
