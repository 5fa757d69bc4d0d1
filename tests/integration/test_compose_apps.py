"""Compose files as apps against a real dockerd and a real git repository: a pushed
``apps/<name>/compose.yaml`` runs as a multi-service app; its ``.env`` reaches the containers,
its limits and plain keys apply, and a push changing one service recreates that service alone."""

from __future__ import annotations

import pathlib
import urllib.request
from typing import Any

import docker
import pytest

from cynchrod import runtime
from cynchrod.shell import control
from tests.conftest import Harness
from tests.helpers import TEST_IMAGE, git, wait_for

COMPOSE = f"""# a web and a worker, written as a Compose user would
services:
  web:
    image: {TEST_IMAGE}
    command:
      - sh
      - -c
      - mkdir -p /tmp/www && echo $$GREETING > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www
    environment:
      GREETING: ${{GREETING:-unset}}
      DB_URL: postgres://app:${{DB_PASSWORD:?set it in .env}}@db/app
    env_file: [web.env]
    ports: ["8080"]
    user: "1000:1000"
    working_dir: /bin
    read_only: true
    tmpfs: ["/tmp:mode=1777"]
    labels:
      team: web
    stop_signal: SIGTERM
    stop_grace_period: 3s
    deploy:
      resources:
        limits: {{cpus: "0.5", memory: 96M}}
        reservations: {{memory: 64M}}
    depends_on:
      worker:
        condition: service_started
  worker:
    image: {TEST_IMAGE}
    command: sleep 3600
    volumes: [cache:/cache, /scratch]
    mem_limit: 64m
    secrets: [db-password]
volumes:
  cache:
secrets:
  db-password:
    external: true
x-cynchrod:
  org: team
"""


def rows(harness: Harness) -> dict[str, dict[str, Any]]:
    return {r["Labels"][runtime.LABEL_SERVICE]: r
            for r in harness.rt.api.containers(all=True, filters=harness.rt.owner_filter)
            if r["Labels"][runtime.LABEL_APP] == "shop"}


def page(port: int, name: str = "") -> bytes:
    """What the service published on ``port`` serves at ``/name`` (empty while it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/{name}", timeout=5) as answer:
            body: bytes = answer.read()
            return body
    except OSError:
        return b""


def test_a_compose_app_runs_with_its_env_and_limits_and_one_change_recreates_one_service(
        repo, harness: Harness, docker_client: docker.DockerClient) -> None:
    harness.secrets.set("team", "db-password", b"s3cret\n")
    repo.push({"apps/shop/compose.yaml": COMPOSE, "apps/shop/.env": "GREETING=hello-from-dotenv\nDB_PASSWORD=pw\n",
               "apps/shop/web.env": "FROM_ENV_FILE=yes\n", "apps/native.yaml": f"name: native\nimage: {TEST_IMAGE}\n"
               "command: [sleep, '3600']\nmemory: 64\n"})
    result = harness.sync()
    assert result.ok, result
    found = rows(harness)
    assert set(found) == {"web", "worker"}
    web = harness.rt.api.inspect_container(found["web"]["Id"])
    env = dict(e.split("=", 1) for e in web["Config"]["Env"])
    assert (env["GREETING"], env["DB_URL"], env["FROM_ENV_FILE"]) == ("hello-from-dotenv", "postgres://app:pw@db/app",
                                                                       "yes")
    host = web["HostConfig"]
    assert (host["NanoCpus"], host["Memory"], host["MemoryReservation"]) == (500_000_000, 96 * 2**20, 64 * 2**20)
    assert (host["ReadonlyRootfs"], host["Tmpfs"]) == (True, {"/tmp": "mode=1777"})
    conf = web["Config"]
    assert (conf["User"], conf["WorkingDir"], conf["StopTimeout"]) == ("1000:1000", "/bin", 3)
    assert web["Config"]["Labels"]["team"] == "web"
    port = int(found["web"]["Ports"][0]["PublicPort"])
    wait_for(lambda: page(port) == b"hello-from-dotenv\n", 10, "the web service to serve the .env value")
    worker = harness.rt.api.inspect_container(found["worker"]["Id"])
    assert worker["HostConfig"]["Memory"] == 64 * 2**20
    mounts = {m["Destination"]: m for m in worker["Mounts"]}
    assert mounts["/cache"]["Type"] == "volume" and mounts["/scratch"]["Type"] == "volume"
    exec_id = docker_client.api.exec_create(found["worker"]["Id"], ["cat", "/run/secrets/db-password"])["Id"]
    assert docker_client.api.exec_start(exec_id) == b"s3cret\n"
    assert (harness.app("native").status, harness.app("shop", "team").status) == ("running", "running")

    # A push that changes the web service alone (through .env) recreates web, not worker.
    before = {name: row["Id"] for name, row in found.items()}
    repo.push({"apps/shop/.env": "GREETING=changed\nDB_PASSWORD=pw\n"})
    result = harness.sync()
    assert result.ok, result
    after = {name: row["Id"] for name, row in rows(harness).items()}
    assert after["worker"] == before["worker"]
    assert after["web"] != before["web"]
    # A pass with nothing new parses nothing.
    cache = next(iter(harness.rec.desired.caches.values()))
    parses = cache.parses
    assert harness.sync().ok
    assert cache.parses == parses


def test_a_broken_override_or_env_keeps_the_last_good_app_running(repo, harness: Harness) -> None:
    harness.secrets.set("team", "db-password", b"s3cret\n")
    files = {"apps/shop/compose.yaml": COMPOSE, "apps/shop/.env": "DB_PASSWORD=pw\n", "apps/shop/web.env": "A=1\n"}
    repo.push(files)
    assert harness.sync().ok
    before = {name: row["Id"] for name, row in rows(harness).items()}
    repo.push({"apps/shop/compose.override.yaml": "services:\n  web:\n    privileged: true\n"})
    result = harness.sync()
    assert {name: row["Id"] for name, row in rows(harness).items()} == before
    app = harness.app("shop", "team")
    assert "apps/shop/compose.override.yaml:3: policy_violation: services.web.privileged" in (app.last_error or "")
    repo.push({"apps/shop/compose.override.yaml": None, "apps/shop/.env": "NOTHING=here\n"})
    harness.sync()
    assert {name: row["Id"] for name, row in rows(harness).items()} == before
    app = harness.app("shop", "team")
    assert "apps/shop/compose.yaml:11: interpolation_failed" in (app.last_error or ""), result


SITE = f"""services:
  web:
    image: {TEST_IMAGE}
    command: [httpd, -f, -p, "8080", -h, /www]
    ports: ["8080"]
    volumes:
      - ./site:/www
      - ./motd.txt:/etc/motd.txt
  other:
    image: {TEST_IMAGE}
    command: [sleep, "3600"]
"""


def test_a_bind_mounted_repository_file_is_served_read_only_and_a_change_recreates_its_service(
        repo, harness: Harness, docker_client: docker.DockerClient) -> None:
    repo.push({"apps/site/compose.yaml": SITE, "apps/site/site/index.html": "from the repo\n",
               "apps/site/motd.txt": "motd\n"})
    assert harness.sync().ok
    found = {r["Labels"][runtime.LABEL_SERVICE]: r for r in harness.rt.api.containers(
        all=True, filters=harness.rt.owner_filter) if r["Labels"][runtime.LABEL_APP] == "site"}
    port = int(found["web"]["Ports"][0]["PublicPort"])
    wait_for(lambda: page(port) == b"from the repo\n", 10, "the bind-mounted page")
    write = "{ echo x > /www/new; } 2>/dev/null; echo rc=$?"
    exec_id = docker_client.api.exec_create(found["web"]["Id"], ["sh", "-c", write])["Id"]
    assert docker_client.api.exec_start(exec_id) == b"rc=1\n"  # read-only
    exec_id = docker_client.api.exec_create(found["web"]["Id"], ["cat", "/etc/motd.txt"])["Id"]
    assert docker_client.api.exec_start(exec_id) == b"motd\n"
    repo.push({"apps/site/site/index.html": "changed in the repo\n"})
    assert harness.sync().ok
    after = {r["Labels"][runtime.LABEL_SERVICE]: r for r in harness.rt.api.containers(
        all=True, filters=harness.rt.owner_filter) if r["Labels"][runtime.LABEL_APP] == "site"}
    assert after["other"]["Id"] == found["other"]["Id"] and after["web"]["Id"] != found["web"]["Id"]
    port = int(after["web"]["Ports"][0]["PublicPort"])
    wait_for(lambda: page(port) == b"changed in the repo\n", 10, "the changed page")


def test_stop_start_and_restart_are_commits_to_the_x_cynchrod_block(repo, harness: Harness) -> None:
    text = f"# my stack\nservices:\n  web:\n    image: {TEST_IMAGE}   # pinned\n    command: [sleep, '3600']\n"
    repo.push({"apps/stack/compose.yaml": text})
    assert harness.sync().ok
    ctl = control.Control(src=[harness.src], db=harness.db, wake=lambda trigger: None)
    ctl.stop(harness.app("stack"), actor="test")
    git("pull", "-q", "--rebase", "origin", "main", cwd=repo.work)
    stopped = (repo.work / "apps/stack/compose.yaml").read_text()
    assert stopped.startswith(text) and stopped.endswith("x-cynchrod:\n  state: stopped\n"), stopped
    assert harness.sync().ok
    assert harness.app("stack").status == "stopped"
    ctl.start(harness.app("stack"), actor="test")
    ctl.restart(harness.app("stack"), actor="test")
    git("pull", "-q", "--rebase", "origin", "main", cwd=repo.work)
    block = (repo.work / "apps/stack/compose.yaml").read_text().split("x-cynchrod:\n")[1]
    assert block.startswith("  state: running\n  restartedAt: ")
    assert harness.sync().ok
    assert harness.app("stack").status == "running"


def test_a_named_network_and_its_aliases_reach_a_service(repo, harness: Harness,
                                                         docker_client: docker.DockerClient) -> None:
    repo.push({"apps/shop/compose.yaml": f"""services:
  web:
    image: {TEST_IMAGE}
    command: [sh, -c, "mkdir -p /tmp/w && echo by-alias > /tmp/w/index.html && exec httpd -f -p 8080 -h /tmp/w"]
    networks:
      backend:
        aliases: [web.internal]
  client:
    image: {TEST_IMAGE}
    command: sleep 3600
    networks: [backend]
networks:
  backend:
"""})
    harness.sync()
    client = docker_client.containers.get(rows(harness)["client"]["Id"])

    def fetched() -> bytes:
        code, out = client.exec_run(["wget", "-q", "-O", "-", "http://web.internal:8080/"])
        return bytes(out) if code == 0 else b""

    wait_for(lambda: fetched() == b"by-alias\n", timeout=10, what="web by its alias")
    code, _ = client.exec_run(["wget", "-q", "-O", "-", "http://web:8080/"])  # the service's name still works
    assert code == 0


def test_secrets_from_repository_files_and_dotenv_are_staged_on_the_tmpfs_only(
        repo, harness: Harness, docker_client: docker.DockerClient) -> None:
    compose = f"""services:
  app:
    image: {TEST_IMAGE}
    command: sleep 3600
    secrets: [api-key, db-password]
secrets:
  api-key:
    file: ./api-key.txt
  db-password:
    environment: DB_PASSWORD
"""
    repo.push({"apps/shop/compose.yaml": compose, "apps/shop/api-key.txt": "key-Zq81\n",
               "apps/shop/.env": "DB_PASSWORD=pw-Xk2Q9\n"})
    harness.sync()
    app = docker_client.containers.get(rows(harness)["app"]["Id"])
    assert app.exec_run(["cat", "/run/secrets/api-key"]).output == b"key-Zq81\n"
    assert app.exec_run(["cat", "/run/secrets/db-password"]).output == b"pw-Xk2Q9"
    first = app.id
    # Plaintext only on the staging tmpfs: not in the store, the copies of repository files, labels.
    state = harness.secrets.state_dir
    for path in state.rglob("*"):
        if path.is_file() and "mirror" not in path.parts and "repos" not in path.parts:
            data = path.read_bytes()
            assert b"key-Zq81" not in data and b"pw-Xk2Q9" not in data, path
    assert "Zq81" not in str(app.attrs["Config"]["Labels"])
    # A changed value recreates the service; an unchanged pass touches nothing.
    harness.sync()
    assert rows(harness)["app"]["Id"] == first
    repo.push({"apps/shop/.env": "DB_PASSWORD=pw-new\n"})
    harness.sync()
    again = docker_client.containers.get(rows(harness)["app"]["Id"])
    assert again.id != first
    assert again.exec_run(["cat", "/run/secrets/db-password"]).output == b"pw-new"


def test_x_cynchrod_readiness_keys_gate_a_compose_app(repo, harness: Harness) -> None:
    repo.push({"apps/sick/compose.yaml": f"""services:
  web:
    image: {TEST_IMAGE}
    command: [sh, -c, 'echo warming up; sleep 3600']
    healthcheck: {{test: [CMD, 'false'], interval: 1h, start_period: 1h}}
x-cynchrod:
  health_timeout: 2
  on_failure: keep
"""})
    assert [a.status for a in harness.sync().apps] == ["failed"]
    app = harness.db.live_apps()[("default", "sick")]
    assert app.last_error is not None and app.last_error.startswith("unhealthy: service web was not healthy within 2s")
    [deployment] = harness.db.deployments(app.id)
    assert deployment.status == "unhealthy" and "warming up" in (deployment.log or "")


BUILT = """services:
  web:
    build:
      context: ./web
      target: site
      args: [GREETING]
    ports: ["8080"]
  worker:
    image: {image}
    command: sleep 3600
"""
DOCKERFILE = f"""FROM {TEST_IMAGE} AS base
ARG GREETING
COPY index.html /www/index.html
RUN echo "$GREETING" > /www/greeting.txt
FROM base AS site
CMD ["httpd", "-f", "-p", "8080", "-h", "/www"]
FROM base AS last
CMD ["sh", "-c", "echo not the target; sleep 3600"]
"""



def test_a_compose_build_is_built_served_rebuilt_on_a_change_and_a_broken_one_keeps_the_last_good(
        repo, harness: Harness, docker_client: docker.DockerClient) -> None:
    harness.watch()  # the view follows the engine's events, so a pass with nothing to do calls nothing
    repo.push({"apps/shop/compose.yaml": BUILT.format(image=TEST_IMAGE), "apps/shop/.env": "GREETING=hi\n",
               "apps/shop/web/Dockerfile": DOCKERFILE, "apps/shop/web/index.html": "v1\n"})
    result = harness.sync()
    assert result.ok, result
    found = rows(harness)
    image = found["web"]["Image"]
    assert image.startswith("cynchrod/default-shop-web:")
    port = int(found["web"]["Ports"][0]["PublicPort"])
    wait_for(lambda: page(port) == b"v1\n", 10, "the built image to serve v1")
    assert page(port, "greeting.txt") == b"hi\n"  # the build arg, from .env
    labels = docker_client.api.inspect_image(image)["Config"]["Labels"]
    assert labels[runtime.LABEL_OWNER] == harness.rt.owner and labels[runtime.LABEL_APP] == "shop"
    app = harness.app("shop")
    first = harness.db.last_deployment(app.id)
    assert first is not None and "# built " + image in harness.builds.log_path(first.id).read_text()

    # A commit that leaves the context alone (the other service, the compose file) rebuilds nothing.
    web_id = found["web"]["Id"]
    repo.push({"apps/shop/compose.yaml": BUILT.format(image=TEST_IMAGE).replace("sleep 3600", "sleep 3601")})
    assert harness.sync().ok
    assert rows(harness)["web"]["Id"] == web_id
    calls = harness.rt.calls
    cache = next(iter(harness.rec.desired.caches.values()))
    parses = cache.parses
    assert harness.sync().ok
    assert (cache.parses, harness.rt.calls - calls) == (parses, 0)  # a no-op pass: no parse, no engine call

    # A push changing the context builds a new image and redeploys web alone.
    worker_id = rows(harness)["worker"]["Id"]
    repo.push({"apps/shop/web/index.html": "v2\n"})
    assert harness.sync().ok
    now = rows(harness)
    assert now["web"]["Image"] != image and now["worker"]["Id"] == worker_id
    port = int(now["web"]["Ports"][0]["PublicPort"])
    wait_for(lambda: page(port) == b"v2\n", 10, "the rebuilt image to serve v2")

    # A broken Dockerfile fails the build: build_failed, and v2 keeps running; no rebuild each pass.
    running = now["web"]["Id"]
    repo.push({"apps/shop/web/Dockerfile": DOCKERFILE.replace("COPY index.html", "RUN exit 3\nCOPY index.html")})
    result = harness.sync()
    outcome = next(a for a in result.apps if a.name == "shop")
    assert outcome.status == "failed" and outcome.error is not None and outcome.error.startswith("build_failed")
    failed = harness.db.last_deployment(app.id)
    assert failed is not None and failed.error_code == "build_failed"
    assert rows(harness)["web"]["Id"] == running and page(port) == b"v2\n"
    harness.sync()
    assert harness.db.last_deployment(app.id).id == failed.id  # type: ignore[union-attr]


ROLLED = f"""# the site, as first written
services:
  web:
    image: {TEST_IMAGE}
    command: [httpd, -f, -p, "8080", -h, /srv]
    environment:
      GREETING: ${{GREETING}}
    ports: ["8080"]
    volumes:
      - ./site:/srv     # the pages, from the repository
"""


def test_a_rollback_restores_the_whole_directory_as_a_commit(repo, harness: Harness) -> None:
    first = repo.push({"apps/site/compose.yaml": ROLLED, "apps/site/.env": "GREETING=one\n",
                       "apps/site/site/index.html": "v1\n", "apps/native.yaml": f"name: native\nimage: {TEST_IMAGE}\n"
                       "command: [sleep, '3600']\nmemory: 64\n"})
    assert harness.sync().ok
    ctl = control.Control(src=[harness.src], db=harness.db, wake=lambda trigger: None)
    with pytest.raises(control.Conflict) as refused:
        ctl.rollback(harness.app("site"), actor="test")
    assert refused.value.code == "no_previous_deployment"
    # v2: every kind of file of the directory changes: the compose file, .env, a bound page, a new env file.
    repo.push({"apps/site/compose.yaml": ROLLED.replace("    ports:", "    env_file: [extra.env]\n    ports:"),
               "apps/site/.env": "GREETING=two\n", "apps/site/extra.env": "EXTRA=1\n",
               "apps/site/site/index.html": "v2\n", "apps/site/site/new.html": "new\n",
               "apps/native.yaml": f"name: native\nimage: {TEST_IMAGE}\ncommand: [sleep, '3601']\nmemory: 64\n"})
    assert harness.sync().ok
    port = int(rows_of(harness, "site")["web"]["Ports"][0]["PublicPort"])
    wait_for(lambda: page(port) == b"v2\n", 10, "v2")

    accepted = ctl.rollback(harness.app("site"), actor="test")
    assert accepted.commit is not None and accepted.deployment_id is not None
    git("pull", "-q", "--rebase", "origin", "main", cwd=repo.work)
    assert git("diff", "--stat", first, "HEAD", "--", "apps/site", cwd=repo.work) == ""  # byte for byte
    assert "3601" in (repo.work / "apps/native.yaml").read_text()  # nothing outside the directory
    assert not (repo.work / "apps/site/extra.env").exists() and not (repo.work / "apps/site/site/new.html").exists()
    assert git("log", "-1", "--format=%an|%s", cwd=repo.work).startswith("cynchrod|rollback to deployment ")
    assert harness.sync().ok
    port = int(rows_of(harness, "site")["web"]["Ports"][0]["PublicPort"])
    wait_for(lambda: page(port) == b"v1\n", 10, "v1 again")
    env = harness.rt.api.inspect_container(rows_of(harness, "site")["web"]["Id"])["Config"]["Env"]
    assert "GREETING=one" in env and not any(e.startswith("EXTRA=") for e in env)
    deployment = harness.db.last_deployment(harness.app("site").id)
    assert deployment is not None and deployment.trigger == "rollback"
    # Going back again goes to v2 (the newest good version that differs from the branch).
    ctl.rollback(harness.app("site"), actor="test")
    git("pull", "-q", "--rebase", "origin", "main", cwd=repo.work)
    assert (repo.work / "apps/site/extra.env").read_text() == "EXTRA=1\n"


def rows_of(harness: Harness, app: str) -> dict[str, dict[str, Any]]:
    return {r["Labels"][runtime.LABEL_SERVICE]: r
            for r in harness.rt.api.containers(all=True, filters=harness.rt.owner_filter)
            if r["Labels"][runtime.LABEL_APP] == app}


WRITABLE = f"""services:
  web:
    image: {TEST_IMAGE}
    command: [sh, -c, "echo started >> /data/log && exec httpd -f -p 8080 -h /srv"]
    environment: {{VERSION: "${{VERSION}}"}}
    ports: ["8080"]
    volumes:
      - ./data:/data:rw
      - ./site:/srv
"""


def test_a_writable_bind_keeps_what_the_app_wrote_and_unused_copies_are_pruned(repo, harness: Harness) -> None:
    repo.push({"apps/site/compose.yaml": WRITABLE, "apps/site/.env": "VERSION=1\n",
               "apps/site/data/seed.txt": "seed\n", "apps/site/site/index.html": "v1\n"})
    assert harness.sync().ok
    files = harness.state / "files"
    data = files / "rw/default/site/data"

    def mounts() -> dict[str, dict[str, Any]]:
        web = rows_of(harness, "site")["web"]
        return {m["Destination"]: m for m in harness.rt.api.inspect_container(web["Id"])["Mounts"]}

    first = mounts()
    assert (first["/data"]["Source"], first["/data"]["RW"], first["/srv"]["RW"]) == (str(data), True, False)
    wait_for(lambda: (data / "log").exists() and (data / "log").read_text() == "started\n", 10, "the app's write")
    copies = {p.name for p in files.iterdir() if p.name != "rw"}
    assert {pathlib.Path(first["/srv"]["Source"]).name} == copies

    # v2: new pages and a new seed in the repository: web is recreated (its read-only copy changed);
    # the writable copy keeps what the app wrote, and is not reseeded.
    repo.push({"apps/site/site/index.html": "v2\n", "apps/site/data/seed.txt": "seed v2\n"})
    assert harness.sync().ok
    second = mounts()
    assert second["/srv"]["Source"] != first["/srv"]["Source"] and second["/data"]["Source"] == str(data)
    wait_for(lambda: (data / "log").read_text() == "started\nstarted\n", 10, "the second start's write")
    assert (data / "seed.txt").read_text() == "seed\n"
    port = int(rows_of(harness, "site")["web"]["Ports"][0]["PublicPort"])
    wait_for(lambda: page(port) == b"v2\n", 10, "v2")
    # v1's copy is the last healthy version's when v2's pass records (a rollback would put it back)...
    assert pathlib.Path(first["/srv"]["Source"]).exists()
    # ... and unused once v3 is read: pruned then, v2's (the last healthy) and v3's kept.
    repo.push({"apps/site/.env": "VERSION=3\n", "apps/site/site/index.html": "v3\n"})
    assert harness.sync().ok
    third = mounts()
    assert not pathlib.Path(first["/srv"]["Source"]).exists()
    assert pathlib.Path(second["/srv"]["Source"]).exists() and pathlib.Path(third["/srv"]["Source"]).exists()
    wait_for(lambda: (data / "log").read_text() == "started\nstarted\nstarted\n", 10, "the third start's write")
    # A pass with nothing new prunes nothing (nor lists the folder).
    before = sorted(p.name for p in files.iterdir())
    assert harness.sync().ok
    assert sorted(p.name for p in files.iterdir()) == before and not harness.rec.desired.read_new
