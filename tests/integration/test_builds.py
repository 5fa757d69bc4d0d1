"""Repo apps: images built from a local source repository (FROM scratch + busybox)."""

from __future__ import annotations

import pathlib
import shutil
import urllib.request

import docker

from cynchrod import runtime
from tests.conftest import Harness
from tests.helpers import GitRepo, git, wait_for

DOCKERFILE = """FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
COPY www /www
CMD ["httpd", "-f", "-p", "8080", "-h", "/www"]
"""




def serve(harness: Harness, app: str) -> str:
    port = harness.app(app).host_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
        return str(response.read().decode())


def test_build_deploy_fail_and_keep_running(repo, harness: Harness, tmp_path: pathlib.Path,
                                            docker_client: docker.DockerClient) -> None:
    (tmp_path / "src").mkdir()
    src = GitRepo(tmp_path / "src")
    shutil.copy("/bin/busybox", src.work / "busybox")
    git("add", "busybox", cwd=src.work)
    src.push({"Dockerfile": DOCKERFILE, "www/index.html": "v1\n"}, "v1")
    repo.push({"apps/web.yaml": f"name: web\nbuild: {{repo: {src.url}}}\nport: 8080\nmemory: 64\n"})
    result = harness.sync()
    assert result.ok, result
    app = harness.app("web")
    commit1 = git("rev-parse", "HEAD", cwd=src.work).strip()
    assert app.image == f"cynchrod/default-web:{commit1[:12]}"
    wait_for(lambda: serve(harness, "web") == "v1\n", 10, "v1 to serve")
    image = docker_client.api.inspect_image(app.image)
    assert image["Config"]["Labels"][runtime.LABEL_OWNER] == harness.rt.owner
    deployment = harness.db.last_deployment(app.id)
    assert deployment is not None
    build_log = harness.builds.log_path(deployment.id).read_text()
    assert f"# built {app.image}" in build_log and ": FROM scratch" in build_log

    # A new source commit is a new image and a new deployment.
    src.push({"www/index.html": "v2\n"}, "v2")
    result = harness.sync()
    assert result.ok, result
    wait_for(lambda: serve(harness, "web") == "v2\n", 10, "v2 to serve")
    running = harness.containers()["web"]["Id"]

    # A broken build fails the deployment with the log's tail; v2 keeps running.
    src.push({"Dockerfile": DOCKERFILE.replace("COPY www /www", 'RUN ["/bin/sh", "-c", "echo boom; exit 3"]')},
             "broken")
    result = harness.sync()
    outcome = result.apps[0]
    assert outcome.status == "failed"
    assert outcome.error is not None and outcome.error.startswith("build_failed: build failed: ")
    failed = harness.db.last_deployment(app.id)
    assert failed is not None and failed.error_code == "build_failed"
    assert failed.error is not None and "boom" in failed.error
    assert harness.containers()["web"]["Id"] == running
    assert serve(harness, "web") == "v2\n"
    # Not rebuilt every pass: it waits for a new commit.
    harness.sync()
    assert harness.db.last_deployment(app.id).id == failed.id  # type: ignore[union-attr]

    # Old images are pruned, keeping the last few; delete removes the rest.
    for n in range(3, 7):
        src.push({"Dockerfile": DOCKERFILE, "www/index.html": f"v{n}\n"}, f"v{n}")
        assert harness.sync().ok
    mine = {"label": [f"{runtime.LABEL_OWNER}={harness.rt.owner}", f"{runtime.LABEL_APP}=web"]}
    assert len(docker_client.api.images(filters=mine)) == 3
    assert serve(harness, "web") == "v6\n"
    repo.push({"apps/.keep": "", "apps/web.yaml": None})
    assert harness.sync().ok
    assert docker_client.api.images(filters=mine) == []
