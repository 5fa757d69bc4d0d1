"""The CLI and the daemon as a user runs them: real processes, real signals."""

from __future__ import annotations

import contextlib
import datetime
import pathlib
import signal

import docker
import pytest

from cynchrod import store
from tests.helpers import GitRepo, cli, manifest, owned, wait_for


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


def test_a_push_into_a_local_bare_repo_is_applied_at_once(repo: GitRepo, daemons, owner: str,
                                                         docker_client: docker.DockerClient) -> None:
    """No webhook, a 300 s timer: the watched refs of the local repository are what wake the pass.

    Asserted as what woke it (a watch pass, within seconds of a 300 s timer), not as a time:
    the push-to-running figure is the benchmark's (bench/run.py --only push)."""
    repo.push({"apps/.keep": ""})
    daemon = daemons(interval=300).start()
    wait_for(lambda: "pass poll" in daemon.output(), 30, "the first pass")
    repo.push({"apps/hello.yaml": manifest("hello")})
    took = wait_for(lambda: [c["State"] for c in owned(docker_client, owner)] == ["running"], 10,
                    "the pushed app to run")
    print(f"push-to-running {took:.2f}s")
    # The pass logs its line when it ends, after the container runs: wait for it (a poll pass, the
    # only other kind this daemon makes within 300 s, never writes it).
    wait_for(lambda: "pass watch" in daemon.output(), 10, "the watch pass's line")
    assert daemon.stop() == 0


def test_self_heal_comes_from_docker_events(repo: GitRepo, daemons, owner: str,
                                            docker_client: docker.DockerClient) -> None:
    repo.push({"apps/a.yaml": manifest("a")})
    daemon = daemons(interval=300).start()  # the timer cannot be what heals
    wait_for(lambda: [c["State"] for c in owned(docker_client, owner)] == ["running"], 30, "a to run")
    [first] = owned(docker_client, owner)
    docker_client.api.kill(first["Id"])
    wait_for(lambda: [c["State"] for c in owned(docker_client, owner)] == ["running"], 10, "a to restart")
    docker_client.api.remove_container(first["Id"], force=True)
    wait_for(lambda: [c["State"] for c in owned(docker_client, owner)] == ["running"], 10, "a to return")
    assert daemon.stop() == 0


def test_crash_loop_backs_off(repo: GitRepo, daemons, owner: str, docker_client: docker.DockerClient,
                              tmp_path: pathlib.Path) -> None:
    """Restarts of a crashing app back off 0, 0, 1, 2, 4 ... s. Asserted as the back-off's lower
    bound (five heals span at least its delays), which a loaded machine only lengthens; no
    back-off makes five heals within a couple of seconds."""
    repo.push({"apps/crash.yaml": manifest("crash", command="[sh, -c, 'exit 3']")})
    daemon = daemons(interval=300).start()
    db = store.Store(tmp_path / "state" / "cynchrod.db")

    def heals() -> list[store.Deployment]:
        app = db.live_apps().get(("default", "crash"))
        rows = db.deployments(app.id, limit=100) if app is not None else []
        return sorted((d for d in rows if d.trigger == "self-heal"), key=lambda d: d.id)

    wait_for(lambda: len(heals()) >= 5, 60, "five self-heals")
    # Between two heals (the sixth waits 8 s), it is failed with the reason.
    wait_for(lambda: db.live_apps()[("default", "crash")].status == "failed", 30, "crash to be failed")
    daemon.stop()
    first, fifth = (datetime.datetime.fromisoformat(d.started_at.replace("Z", "+00:00")) for d in heals()[0:5:4])
    # Delays before heals 2-5: 0 + 1 + 2 + 4 = 7 s (timestamps have whole seconds).
    assert (fifth - first).total_seconds() >= 6, [d.started_at for d in heals()]
    app = db.live_apps()[("default", "crash")]
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
    def deployed() -> bool:  # and its deployment judged ready (docs/health.md), not left deploying by a stop
        with contextlib.closing(store.Store(tmp_path / "state" / "cynchrod.db")) as seen:
            return seen.live_apps()[("default", "a")].status == "running"

    repo.push({"apps/a.yaml": manifest("a")})
    if point == "after-remove":
        # A deployed app, then a change: the crash comes in the middle of its recreate.
        first = daemons().start()
        wait_for(lambda: [c["State"] for c in owned(docker_client, owner)] == ["running"], 30, "a to run")
        wait_for(deployed, 30, "a to be running")
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
    wait_for(deployed, 30, "a to be running")
    healthy.stop()
    [row] = owned(docker_client, owner)
    cmd = docker_client.api.inspect_container(row["Id"])["Config"]["Cmd"]
    assert cmd == (["sleep", "4000"] if point == "after-remove" else ["sleep", "3600"])
    db = store.Store(tmp_path / "state" / "cynchrod.db")
    deployments = db.deployments(db.live_apps()[("default", "a")].id)
    assert all(d.status != "deploying" for d in deployments)
    assert [d.error_code for d in deployments if d.status == "failed"] == ["interrupted"]


def test_a_failing_test_shows_the_daemon_log(tmp_path: pathlib.Path) -> None:
    """The conftest hook, run on an inner test that fails after its daemon wrote a line."""
    import subprocess
    import sys

    inner = tmp_path / "test_inner.py"
    inner.write_text(
        "import pathlib\n"
        "from tests.helpers import Daemon\n\n"
        "def test_inner(tmp_path):\n"
        "    d = Daemon('/nowhere', tmp_path / 'state', 'tinner')\n"
        "    d.log.write_text('the line that explains it\\n')\n"
        "    assert False\n")
    root = pathlib.Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                          "--rootdir", str(tmp_path), str(inner)], cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1, out.stdout
    assert "cynchrod serve log" in out.stdout and "the line that explains it" in out.stdout


def test_a_slow_build_holds_up_no_other_app(repo: GitRepo, daemons, owner: str, tmp_path: pathlib.Path,
                                           docker_client: docker.DockerClient) -> None:
    """Builds run on their own worker, never inside a pass: while a 60 s build runs,
    another app's killed container is healed at once."""
    import shutil

    from cynchrod import runtime
    from tests.helpers import git

    (tmp_path / "src").mkdir()
    src = GitRepo(tmp_path / "src")
    shutil.copy("/bin/busybox", src.work / "busybox")
    git("add", "busybox", cwd=src.work)
    src.push({"Dockerfile": 'FROM scratch\nCOPY busybox /bin/busybox\nRUN ["/bin/busybox", "sleep", "60"]\n'})
    repo.push({"apps/a.yaml": manifest("a"),
               "apps/slow.yaml": f"name: slow\nbuild: {{repo: {src.url}}}\nmemory: 64\n"})
    config = tmp_path / "cynchrod.yaml"
    config.write_text(f"builds: {{localRepos: ['{tmp_path / 'src'}']}}\n")  # a build from this machine
    daemon = daemons(interval=300)
    daemon.args += ["--config", str(config)]
    daemon.start()

    def a_running() -> bool:
        return [c["State"] for c in owned(docker_client, owner)
                if c["Labels"][runtime.LABEL_APP] == "a"] == ["running"]

    wait_for(a_running, 30, "a to run")
    logs = tmp_path / "state" / "builds" / "logs"
    wait_for(lambda: '"sleep", "60"]\n ---> Running in' in "".join(p.read_text() for p in logs.glob("*")),
             30, "the slow build to be running")
    def build_log() -> str:
        return "".join(p.read_text() for p in logs.glob("*"))

    for _ in range(2):
        [a] = [c for c in owned(docker_client, owner) if c["Labels"][runtime.LABEL_APP] == "a"]
        docker_client.api.kill(a["Id"])
        # Healed while the 60 s build still runs (no timing: a second death waits out the crash
        # back-off, so the bound is the build, not a number of seconds).
        wait_for(a_running, 20, "a to be healed during the build")
        assert "Successfully built" not in build_log() and "slow" not in {
            c["Labels"][runtime.LABEL_APP] for c in owned(docker_client, owner)}, build_log()[-2000:]
    assert "slow" not in {c["Labels"][runtime.LABEL_APP] for c in owned(docker_client, owner)}
    assert daemon.stop() == 0


def test_a_failed_verdict_outlives_a_daemon_restart(repo: GitRepo, daemons, owner: str, tmp_path: pathlib.Path,
                                                    docker_client: docker.DockerClient) -> None:
    repo.push({"apps/bad.yaml": manifest("bad", extra="healthcheck: {test: [CMD, 'false'], interval: 0.2, "
                                                      "retries: 1}\n")})
    first = daemons().start()
    with contextlib.closing(store.Store(tmp_path / "state" / "cynchrod.db")) as db:
        wait_for(lambda: db.live_apps().get(("default", "bad")) is not None
                 and db.live_apps()[("default", "bad")].status == "failed", 30, "the app to fail its healthcheck")
        app = db.live_apps()[("default", "bad")]
        deployments = db.deployments(app.id, limit=50)
        assert first.stop() == 0

        second = daemons().start()
        wait_for(lambda: "pass poll" in second.output(), 30, "the restarted daemon's first pass")
        # It reads the verdict back: still failed, with the same error, and nothing deployed again.
        again = db.live_apps()[("default", "bad")]
        assert (again.status, again.last_error) == ("failed", app.last_error)
        assert db.deployments(app.id, limit=50) == deployments
        assert [c["State"] for c in owned(docker_client, owner)] == ["running"]  # kept for inspection
        assert second.stop() == 0
