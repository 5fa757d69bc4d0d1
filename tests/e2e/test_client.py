"""The client commands (apps, status, logs, deployments, restart/stop/start/delete) against a real
`cynchrod serve`, a real dockerd and a bare Git repository."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.helpers import CLI, TEST_IMAGE, Daemon, GitRepo, cli, wait_for

TICKER = "[sh, -c, 'i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.2; done']"


@pytest.fixture
def served(repo: GitRepo, daemons: Callable[..., Daemon], tmp_path: pathlib.Path) -> Iterator[dict[str, str]]:
    """A daemon with two apps, and the environment the demo prints (CYNCHROD_API, CYNCHROD_TOKEN)."""
    state = tmp_path / "state"
    token = cli("token", "create", "--org", "default", "--name", "alice", "--state", str(state)).stdout.strip()
    repo.push({"apps/web.yaml": f"name: web\nimage: {TEST_IMAGE}\ncommand: [sleep, '3600']\nmemory: 64\n",
               "apps/ticker.yaml": f"name: ticker\nimage: {TEST_IMAGE}\ncommand: {TICKER}\nmemory: 64\n"})
    daemon = daemons(interval=300).start()
    env = {"CYNCHROD_API": daemon.api, "CYNCHROD_TOKEN": token}
    wait_for(lambda: _statuses(env) == {"default/ticker": "running", "default/web": "running"}, 30, "two apps")
    yield env
    assert daemon.stop() == 0


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

    follow = subprocess.Popen([*CLI, "logs", "default/ticker", "--tail", "2", "-f"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, **served})
    try:
        assert follow.stdout is not None
        got = [follow.stdout.readline().strip() for _ in range(8)]  # 2 from the tail, then live ones
    finally:
        follow.send_signal(signal.SIGINT)
        follow.wait(timeout=10)
    seen = [int(line.split()[1]) for line in got]
    assert seen == list(range(seen[0], seen[0] + 8)), got  # in order: nothing lost or doubled at the seam


def test_imperative_commands(served: dict[str, str]) -> None:
    stopped = cli("stop", "default/web", env=served)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.startswith("stop default/web: commit ")
    assert stopped.stdout.split()[-1] in ("queued", "deploying")
    wait_for(lambda: _status(served, "default/web")["app"]["status"] == "stopped", 20, "stopped")
    refused = cli("restart", "default/web", env=served)
    assert refused.returncode == 1 and "app_stopped" in refused.stderr
    assert "cynchrod start default/web" in refused.stderr
    started = cli("start", "default/web", "-o", "json", env=served)
    reply = json.loads(started.stdout)
    assert reply["action"] == "start" and reply["deployment_id"] and reply["app"]["status"] in ("queued", "deploying")
    wait_for(lambda: _status(served, "default/web")["app"]["status"] == "running", 20, "running again")
    again = cli("start", "default/web", env=served)
    assert again.stdout.strip() == "start default/web: nothing to change (status running)"
    app_id = _status(served, "default/web")["app"]["id"]
    assert cli("restart", app_id, env=served).returncode == 0  # an id works as well as org/name
    deleted = cli("delete", "default/web", env=served)
    assert deleted.returncode == 0, deleted.stderr
    wait_for(lambda: _status(served, "default/web")["app"]["status"] == "removed", 20, "removed")
    assert "default/web" not in _statuses(served)
    assert "default/web" in cli("apps", "--all", env=served).stdout
    triggers = [d["trigger"] for d in _status(served, app_id)["deployments"]]
    assert triggers[:4] == ["api", "api", "api", "api"]
