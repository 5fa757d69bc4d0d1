"""The container image as a user runs it: ``scripts/build-image``, then ``docker run ... cynchrod:<version>``
with the engine's socket and a bare repository mounted in (docs/container.md).

The image is built once per session and cached by the engine (a build with nothing changed takes about a
second; the first one, which makes the Debian base, about a minute and a half). The daemon in the container
runs as its unprivileged user with the socket's group added, deploys an app of the test image, answers on the
published port, stages a secret set through the API where the engine mounts it from, records an imperative
call as a commit pushed back into the mounted repository (which the host still pushes to), reports
healthy through the image's HEALTHCHECK and stops cleanly on ``docker stop``.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
from collections.abc import Callable, Iterator

import docker
import pytest
import requests

from cynchrod import __version__
from cynchrod.desired import secrets
from tests.helpers import TEST_IMAGE, TEST_LABEL, GitRepo, free_port, git, owned, wait_for

ROOT = pathlib.Path(__file__).resolve().parents[2]
TAG = f"cynchrod:{__version__}"
#: The image's user (Dockerfile, ARG UID).
IMAGE_UID = 10001
#: Where the daemon in the image stages secrets (its state dir is /var/lib/cynchrod): the engine bind-mounts
#: them into apps from this path on the host, so it is mounted at the same path (docs/container.md).
STAGING = secrets.staging_candidates(pathlib.Path("/var/lib/cynchrod"))[1]

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]


def docker_cli(*args: str, timeout: float = 60) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"docker {' '.join(args)}: {done.stderr}"
    return done.stdout.strip()


@pytest.fixture(scope="session")
def image() -> str:
    done = subprocess.run([str(ROOT / "scripts" / "build-image")], capture_output=True, text=True, timeout=880)
    assert done.returncode == 0, done.stdout + done.stderr
    return TAG


@pytest.fixture
def container(image: str, repo: GitRepo, owner: str, images: object) -> Iterator[Callable[[], tuple[str, str]]]:
    """Starts ``cynchrod serve`` in a container as docs/container.md runs it: (container id, API URL)."""
    made: list[str] = []
    made_staging: list[pathlib.Path] = []

    def start() -> tuple[str, str]:
        # As docs/container.md: the repository stays its owner's (the test's pushes go on working) and is
        # shared with the image's group, so that API calls can push commits into it.
        git("config", "core.sharedRepository", "group", cwd=repo.bare)
        subprocess.run(["chgrp", "-R", str(IMAGE_UID), str(repo.bare)], check=True)
        subprocess.run(["chmod", "-R", "g+rwX", str(repo.bare)], check=True)
        subprocess.run(["find", str(repo.bare), "-type", "d", "-exec", "chmod", "g+s", "{}", "+"], check=True)
        if not STAGING.exists():
            STAGING.mkdir(mode=0o700)
            os.chown(STAGING, IMAGE_UID, IMAGE_UID)
            made_staging.append(STAGING)
        port = free_port()
        socket_gid = os.stat("/var/run/docker.sock").st_gid
        made.append(docker_cli(
            "run", "-d", "--init", "--label", f"{TEST_LABEL}={owner}",
            "--group-add", str(socket_gid), "-v", "/var/run/docker.sock:/var/run/docker.sock",
            "-v", f"{repo.bare}:/repo.git", "-e", "CYNCHROD_REPO=/repo.git", "-v", f"{STAGING}:{STAGING}",
            "-e", f"CYNCHROD_OWNER={owner}", "-e", "CYNCHROD_STOP_TIMEOUT=1",
            "--health-interval", "1s",  # the image's own check, every second rather than every 30
            "-p", f"127.0.0.1:{port}:8080", image))
        return made[-1], f"http://127.0.0.1:{port}"

    yield start
    for cid in made:
        # -v: the state volume (anonymous) goes with it; the owner fixture removes the apps afterwards.
        subprocess.run(["docker", "rm", "-f", "-v", cid], capture_output=True, timeout=60)
    shutil.rmtree(STAGING / "default" / "web", ignore_errors=True)
    for folder in made_staging:
        shutil.rmtree(folder, ignore_errors=True)


def test_the_image_deploys_and_serves(container: Callable[[], tuple[str, str]], repo: GitRepo, owner: str,
                                      docker_client: docker.DockerClient) -> None:
    app_port = free_port()
    repo.push({"apps/web.yaml": (
        f"name: web\nimage: {TEST_IMAGE}\nmemory: 64\nport: 8080\nhostPort: {app_port}\nsecrets: [greeting]\n"
        "command: [sh, -c, 'mkdir -p /www && cp /run/secrets/greeting /www/index.html "
        "&& exec httpd -f -p 8080 -h /www']\n")}, "web")
    cid, api = container()

    def logs() -> str:
        return subprocess.run(["docker", "logs", cid], capture_output=True, text=True).stdout[-5000:]

    def answers(url: str) -> bool:
        state = docker_cli("inspect", "-f", "{{.State.Status}}", cid)
        assert state == "running", logs()
        try:
            return requests.get(url, timeout=2).status_code == 200
        except (requests.ConnectionError, requests.Timeout):
            # Not answering yet. A probe can also time out: on a loaded runner, the published port
            # took a request that the starting app did not answer within 2 s (CI). The wait's
            # bound is the assertion.
            return False

    wait_for(lambda: answers(api + "/healthz"), 60, "the API's /healthz through the published port")
    assert docker_cli("exec", cid, "id", "-u") == str(IMAGE_UID)  # not root
    r = requests.get(api + "/apps", timeout=5)
    assert r.status_code == 401, r.text
    token = docker_cli("exec", cid, "cynchrod", "token", "create", "--org", "default", "--name", "image-test")
    auth = {"authorization": f"Bearer {token}"}
    r = requests.put(f"{api}/orgs/default/secrets/greeting", data=b"hello from a secret", headers=auth, timeout=5)
    assert r.status_code == 200, r.text

    # The secret is staged in the container and mounted into the app by the engine from the same path.
    wait_for(lambda: answers(f"http://127.0.0.1:{app_port}/"), 60, "the app the container deployed")
    assert requests.get(f"http://127.0.0.1:{app_port}/", timeout=5).text == "hello from a secret"
    assert [c["Labels"]["io.cynchrod.app"] for c in owned(docker_client, owner)] == ["web"]

    def listed() -> list[dict[str, object]]:
        r = requests.get(api + "/apps", headers=auth, timeout=5)
        assert r.status_code == 200, r.text
        return list(r.json()["apps"])

    # Serving is not yet "running": the deployment is judged after min_ready (health-gated deploys).
    wait_for(lambda: [(a["name"], a["status"]) for a in listed()] == [("web", "running")], 30, "web to be running")
    (app,) = listed()

    # An imperative call is a commit pushed into the mounted repository, then applied.
    r = requests.post(f"{api}/apps/{app['id']}/stop", headers=auth, timeout=10)
    assert r.status_code == 202, r.text
    wait_for(lambda: owned(docker_client, owner)[0]["State"] == "exited", 30, "the app stopped through the API")
    log = git("log", "-1", "--format=%s", cwd=repo.bare)
    assert "stop" in log, log
    repo.push({}, "a push from the host after the daemon's")  # the repository stays usable from the host

    wait_for(lambda: docker_cli("inspect", "-f", "{{.State.Health.Status}}", cid) == "healthy", 30,
             "the image's HEALTHCHECK reporting healthy")

    # STOPSIGNAL: the daemon shuts down cleanly (exit 0) well within docker stop's grace; apps stay.
    docker_cli("stop", "-t", "30", cid, timeout=60)
    state = json.loads(docker_cli("inspect", "-f", "{{json .State}}", cid))
    assert state["ExitCode"] == 0, logs()
    assert len(owned(docker_client, owner)) == 1
