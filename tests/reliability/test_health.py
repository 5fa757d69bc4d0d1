"""/healthz tells the truth, and a daemon keeps healing through the faults it reports.

Real daemon, dockerd and git; the faults are real too: a proxy on the Docker socket
that goes away, and a state dir on a small tmpfs that fills up.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import urllib.error
import urllib.request

import docker

from tests.helpers import GitRepo, manifest, new_token, owned, tmpfs, wait_for
from tests.reliability.dockerproxy import DockerProxy


def health(api: str) -> tuple[int, list[str]]:
    try:
        with urllib.request.urlopen(f"{api}/healthz", timeout=5) as response:
            return response.status, [p["code"] for p in json.load(response)["problems"]]
    except urllib.error.HTTPError as exc:
        return exc.code, [p["code"] for p in json.load(exc)["problems"]]
    except OSError:
        return 0, ["no answer"]


def running(client: docker.DockerClient, owner: str) -> bool:
    return [c["State"] for c in owned(client, owner)] == ["running"]


def test_healthz_says_when_docker_is_unreachable_and_recovers(repo: GitRepo, daemons, owner: str,
                                                              tmp_path: pathlib.Path,
                                                              docker_client: docker.DockerClient) -> None:
    proxy = DockerProxy(tmp_path / "docker.sock")
    try:
        repo.push({"apps/a.yaml": manifest("a")})
        daemon = daemons(interval=2, env={"DOCKER_HOST": f"unix://{proxy.path}"}).start()
        wait_for(lambda: running(docker_client, owner), 30, "a to run")
        wait_for(lambda: health(daemon.api) == (200, []), 15, "healthy")
        proxy.down()
        wait_for(lambda: "docker_unavailable" in health(daemon.api)[1], 15, "docker_unavailable on /healthz")
        assert health(daemon.api)[0] == 503
        proxy.up()
        wait_for(lambda: health(daemon.api) == (200, []), 15, "healthy again")
        [unit] = owned(docker_client, owner)
        docker_client.api.kill(unit["Id"])  # the event stream is back: a death heals at once
        wait_for(lambda: running(docker_client, owner), 10, "a to be healed")
        assert daemon.stop() == 0
    finally:
        proxy.close()


def test_a_frozen_engine_shows_on_healthz_metrics_and_statuses(repo: GitRepo, daemons, owner: str,
                                                              tmp_path: pathlib.Path,
                                                              docker_client: docker.DockerClient) -> None:
    """A paused engine answers nothing and sends no event, and a pass with nothing to do asks it
    nothing: only the liveness probe can see it. A death meanwhile is healed once it answers."""
    proxy = DockerProxy(tmp_path / "docker.sock")
    try:
        repo.push({"apps/a.yaml": manifest("a")})
        daemon = daemons(interval=300, env={"DOCKER_HOST": f"unix://{proxy.path}"}).start()
        token = new_token(tmp_path / "state", "default")
        wait_for(lambda: running(docker_client, owner), 30, "a to run")
        wait_for(lambda: health(daemon.api) == (200, []), 15, "healthy")
        # The container runs before its deployment is judged ready (min_ready later): wait for the verdict.
        wait_for(lambda: status(daemon.api, token) == "running", 15, "a to be judged running")

        proxy.freeze()
        [unit] = owned(docker_client, owner)
        docker_client.api.kill(unit["Id"])  # unseen: the engine the daemon talks to is frozen
        wait_for(lambda: "docker_unavailable" in health(daemon.api)[1], 40, "docker_unavailable on /healthz")
        assert health(daemon.api)[0] == 503
        assert status(daemon.api, token) == "unknown"  # not "running": we cannot see it
        assert metric(daemon.api, "cynchrod_engine_up") == 0
        assert metric(daemon.api, 'cynchrod_apps{status="unknown"}') == 1

        proxy.up()
        wait_for(lambda: running(docker_client, owner), 30, "a healed once the engine answers")
        wait_for(lambda: health(daemon.api) == (200, []), 20, "healthy again")
        assert status(daemon.api, token) == "running" and metric(daemon.api, "cynchrod_engine_up") == 1
        assert daemon.stop() == 0
    finally:
        proxy.close()


def status(api: str, token: str) -> str:
    request = urllib.request.Request(f"{api}/apps", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        [app] = json.load(response)["apps"]
    return str(app["status"])


def metric(api: str, name: str) -> float:
    with urllib.request.urlopen(f"{api}/metrics", timeout=5) as response:
        text = response.read().decode()
    return float(next(line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(name + " ")))


def test_a_full_state_dir_is_reported_and_apps_still_heal(repo: GitRepo, daemons, owner: str,
                                                         tmp_path: pathlib.Path,
                                                         docker_client: docker.DockerClient) -> None:
    with tmpfs(tmp_path / "state", "16m") as state:
        repo.push({"apps/a.yaml": manifest("a")})
        daemon = daemons(interval=300).start()
        wait_for(lambda: running(docker_client, owner), 30, "a to run")
        wait_for(lambda: health(daemon.api) == (200, []), 15, "healthy")
        subprocess.run(["dd", "if=/dev/zero", f"of={state / 'fill'}", "bs=1M"], capture_output=True)
        status, problems = health(daemon.api)
        assert status == 503 and "state_unwritable" in problems, problems
        for _ in range(2):
            [unit] = owned(docker_client, owner)
            docker_client.api.kill(unit["Id"])
            wait_for(lambda: running(docker_client, owner), 10, "a to be healed on a full disk")
        (state / "fill").unlink()
        wait_for(lambda: health(daemon.api) == (200, []), 70, "healthy once there is room")
        assert daemon.stop() == 0
