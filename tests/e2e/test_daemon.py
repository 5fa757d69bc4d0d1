"""The CLI and the daemon as a user runs them: real processes, real signals."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import docker
import pytest

from cynchrod import runtime, store
from tests.conftest import TEST_IMAGE, GitRepo

CLI = [sys.executable, "-m", "cynchrod"]


def manifest(name: str, command: str = "[sleep, '3600']", extra: str = "") -> str:
    return f"name: {name}\nimage: {TEST_IMAGE}\ncommand: {command}\nmemory: 64\n{extra}"


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def wait_for(check: Callable[[], object], timeout: float, what: str) -> float:
    """Poll ``check`` until truthy; returns the seconds it took (the bound is the assertion)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Daemon:
    def __init__(self, repo: GitRepo, state: pathlib.Path, owner: str, *, interval: float = 300,
                 env: dict[str, str] | None = None) -> None:
        self.log = state.parent / f"daemon-{time.monotonic_ns()}.log"
        self.args = ["serve", "--repo", repo.url, "--state", str(state), "--owner", owner,
                     "--interval", str(interval), "--stop-timeout", "1"]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([*CLI, *self.args], stdout=out, stderr=subprocess.STDOUT, env=self.env)
        return self

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture
def daemons(repo: GitRepo, owner: str, images: object, tmp_path: pathlib.Path) -> Iterator[Callable[..., Daemon]]:
    made: list[Daemon] = []

    def make(**kw: object) -> Daemon:
        d = Daemon(repo, tmp_path / "state", owner, **kw)  # type: ignore[arg-type]
        made.append(d)
        return d

    yield make
    for d in made:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()


def owned(client: docker.DockerClient, owner: str) -> list[dict]:  # type: ignore[type-arg]
    rows: list[dict] = client.api.containers(  # type: ignore[type-arg]
        all=True, filters={"label": [f"{runtime.LABEL_OWNER}={owner}"]})
    return rows


def test_push_is_applied_within_one_pass(repo: GitRepo, daemons, owner: str,
                                         docker_client: docker.DockerClient) -> None:
    repo.push({"apps/.keep": ""})
    daemon = daemons(interval=2).start()
    wait_for(lambda: "pass poll" in daemon.output(), 20, "the first pass")
    repo.push({"apps/hello.yaml": manifest("hello")})
    took = wait_for(lambda: [c["State"] for c in owned(docker_client, owner)] == ["running"], 20,
                    "the pushed app to run")
    assert took < 10
    assert daemon.stop() == 0


def test_self_heal_comes_from_docker_events(repo: GitRepo, daemons, owner: str,
                                            docker_client: docker.DockerClient) -> None:
    repo.push({"apps/a.yaml": manifest("a")})
    daemon = daemons(interval=300).start()  # the timer cannot be what heals
    wait_for(lambda: [c["State"] for c in owned(docker_client, owner)] == ["running"], 30, "a to run")
    [first] = owned(docker_client, owner)
    docker_client.api.kill(first["Id"])
    took = wait_for(lambda: [c["State"] for c in owned(docker_client, owner)] == ["running"], 10, "a to restart")
    assert took < 5
    docker_client.api.remove_container(first["Id"], force=True)
    took = wait_for(lambda: [c["State"] for c in owned(docker_client, owner)] == ["running"], 10, "a to return")
    assert took < 5
    assert daemon.stop() == 0


def test_crash_loop_backs_off(repo: GitRepo, daemons, owner: str, docker_client: docker.DockerClient,
                              tmp_path: pathlib.Path) -> None:
    repo.push({"apps/crash.yaml": manifest("crash", command="[sh, -c, 'exit 3']")})
    daemon = daemons(interval=300).start()
    time.sleep(12)
    daemon.stop()
    db = store.Store(tmp_path / "state" / "cynchrod.db")
    app = db.live_apps()[("default", "crash")]
    heals = [d for d in db.deployments(app.id, limit=100) if d.trigger == "self-heal"]
    # Back-off 0, 0, 1, 2, 4, 8 s: about 5 restarts in 12 s, where no back-off makes dozens.
    assert 3 <= len(heals) <= 6, [d.started_at for d in heals]
    assert app.status == "failed"
    assert app.last_error is not None and app.last_error.startswith("crash_loop: exited with code 3")


def test_second_daemon_refuses_the_same_state_dir(repo: GitRepo, daemons, tmp_path: pathlib.Path) -> None:
    repo.push({"apps/.keep": ""})
    first = daemons().start()
    wait_for(lambda: "pass poll" in first.output(), 20, "the first pass")
    second = cli("sync", "--repo", repo.url, "--state", str(tmp_path / "state"))
    assert second.returncode == 2
    assert "state_locked: state directory" in second.stderr
    assert f"pid {first.proc.pid}" in second.stderr  # type: ignore[union-attr]
    assert first.stop() == 0


@pytest.mark.parametrize("point", ["after-create", "after-remove"])
def test_sigkill_mid_apply_converges_to_one_container(repo: GitRepo, daemons, owner: str, point: str,
                                                      docker_client: docker.DockerClient,
                                                      tmp_path: pathlib.Path) -> None:
    repo.push({"apps/a.yaml": manifest("a")})
    if point == "after-remove":
        # A deployed app, then a change: the crash comes in the middle of its recreate.
        first = daemons().start()
        wait_for(lambda: [c["State"] for c in owned(docker_client, owner)] == ["running"], 30, "a to run")
        assert first.stop() == 0
        repo.push({"apps/a.yaml": manifest("a", command="[sleep, '4000']")})
    crashing = daemons(env={"CYNCHROD_CRASHPOINT": point}).start()
    assert crashing.proc is not None
    assert crashing.proc.wait(timeout=30) == -signal.SIGKILL
    states = [c["State"] for c in owned(docker_client, owner)]
    assert states == (["created"] if point == "after-create" else [])
    db = store.Store(tmp_path / "state" / "cynchrod.db")
    app = db.live_apps()[("default", "a")]
    assert db.last_deployment(app.id).status == "deploying"  # type: ignore[union-attr]
    db.close()

    healthy = daemons().start()
    wait_for(lambda: [c["State"] for c in owned(docker_client, owner)] == ["running"], 30, "one running a")
    healthy.stop()
    [row] = owned(docker_client, owner)
    cmd = docker_client.api.inspect_container(row["Id"])["Config"]["Cmd"]
    assert cmd == (["sleep", "4000"] if point == "after-remove" else ["sleep", "3600"])
    db = store.Store(tmp_path / "state" / "cynchrod.db")
    deployments = db.deployments(db.live_apps()[("default", "a")].id)
    assert all(d.status != "deploying" for d in deployments)
    assert [d.error_code for d in deployments if d.status == "failed"] == ["interrupted"]
