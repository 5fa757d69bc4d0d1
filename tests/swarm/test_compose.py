"""A Compose app on the three-node lab, from a real git repository through a real daemon
(``cynchrod serve --runtime swarm``): one stack of Swarm services on the app's overlay network.

One test on purpose (the lab is slow): the start order honours ``service_healthy``, repository
files bind-mounted (a file, a folder) and ``configs`` arrive as Docker configs on whichever
node runs the task and are served, ``.env`` interpolation reaches the container, limits apply,
``deploy.replicas`` spreads, ``secrets`` (``file:`` and ``external: true``) are Docker secrets,
and a push changing one service recreates that service alone."""

from __future__ import annotations

import datetime
import pathlib
import urllib.request

import pytest

from cynchrod import runtime, store
from cynchrod.desired import secrets as vault
from tests.helpers import Daemon, GitRepo, wait_for
from tests.swarm.conftest import Lab
from tests.swarm.test_swarm import container

pytestmark = [pytest.mark.swarm, pytest.mark.xdist_group("swarm")]  # one lab per machine: one worker

PORT = 18133


def compose(image: str) -> str:
    return f"""# a web, its database and a worker, as a Compose user writes them
name: shop
services:
  db:
    image: {image}
    # Healthy only once the test says so (it touches /ready): web must wait for it.
    command: [sleep, "3600"]
    healthcheck:
      test: [CMD, test, -f, /ready]
      interval: 1s
      timeout: 1s
      retries: 600
  web:
    image: {image}
    command:
      - sh
      - -c
      - echo "$$GREETING" > /www/greeting.txt && exec httpd -f -p 8080 -h /www
    environment:
      GREETING: ${{GREETING:?set it in .env}}
    ports: ["{PORT}:8080"]
    volumes:
      - ./site/index.html:/www/index.html
      - ./assets:/www/assets
    configs:
      - source: motd
        target: /etc/motd
    secrets: [api-key, db-password]
    depends_on:
      db:
        condition: service_healthy
    deploy:
      resources:
        limits: {{cpus: "0.25", memory: 96M}}
        reservations: {{memory: 64M}}
  worker:
    image: {image}
    command: [sleep, "3600"]
    deploy:
      replicas: 3
configs:
  motd:
    file: ./motd.txt
secrets:
  api-key:
    file: ./api-key.txt
  db-password:
    external: true
"""


def stamp(text: str) -> datetime.datetime:
    """An engine timestamp (RFC 3339 with nanoseconds) as a datetime."""
    head, _, frac = text.rstrip("Z").partition(".")
    return datetime.datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}")


def fetch(address: str, path: str) -> bytes:
    try:
        with urllib.request.urlopen(f"http://{address}:{PORT}{path}", timeout=5) as answer:
            body: bytes = answer.read()
            return body
    except OSError:
        return b""


def test_a_compose_app_runs_as_a_stack_in_order_with_its_files_env_limits_secrets_and_one_service_updated(
        lab: Lab, swarm_owner: str, tmp_path: pathlib.Path) -> None:
    repo = GitRepo(tmp_path)
    repo.push({"apps/shop/compose.yaml": compose(lab.image), "apps/shop/.env": "GREETING=hello-from-dotenv\n",
               "apps/shop/site/index.html": "<h1>from the repo</h1>\n", "apps/shop/assets/a.css": "a{}\n",
               "apps/shop/assets/img/b.txt": "bee\n", "apps/shop/motd.txt": "welcome\n",
               "apps/shop/api-key.txt": "key-from-a-file\n"})
    state = tmp_path / "state"
    state.mkdir()
    db = store.Store(state / "cynchrod.db")
    vault.Secrets(db, state_dir=state).set("default", "db-password", b"from-the-store")
    daemon = Daemon(repo, state, swarm_owner, interval=2,
                    env={"DOCKER_HOST": lab.docker_host, "CYNCHROD_RUNTIME": "swarm"})
    daemon.start()
    manager = lab.client()
    api = manager.api
    names = {s: f"{swarm_owner}_default_shop_{s}" for s in ("db", "web", "worker")}

    def services() -> dict[str, dict]:  # type: ignore[type-arg]
        return {s["Spec"]["Name"]: s for s in api.services(filters={"label": runtime.owner_labels(swarm_owner)})}

    def tasks(service: str, state: str = "running") -> list[dict]:  # type: ignore[type-arg]
        if names[service] not in services():
            return []
        return [t for t in api.tasks(filters={"service": names[service]})
                if t["DesiredState"] == "running" and t["Status"]["State"] == state]

    try:
        # The database runs but is not healthy yet: its dependent is not created.
        wait_for(lambda: tasks("db", "starting"), 60, "the db task to start (not healthy yet)")
        assert names["web"] not in services()
        db_node, db_container = container(lab, tasks("db", "starting")[0])
        assert db_container.exec_run(["touch", "/ready"]).exit_code == 0
        wait_for(lambda: tasks("db"), 30, "the db task to be healthy (running)")
        healthy_at = stamp(tasks("db")[0]["Status"]["Timestamp"])
        wait_for(lambda: tasks("web"), 60, "the web service to run")
        web = services()[names["web"]]
        assert stamp(web["CreatedAt"]) >= healthy_at, (web["CreatedAt"], healthy_at)
        wait_for(lambda: len(tasks("worker")) == 3, 60, "the worker's 3 replicas")

        # The files of the repository are served by a task on whichever node runs it.
        task = tasks("web")[0]
        address = api.inspect_node(task["NodeID"])["Status"]["Addr"]
        wait_for(lambda: fetch(address, "/greeting.txt") == b"hello-from-dotenv\n", 30, "the .env value served")
        assert fetch(address, "/index.html") == b"<h1>from the repo</h1>\n"
        assert fetch(address, "/assets/a.css") == b"a{}\n"
        assert fetch(address, "/assets/img/b.txt") == b"bee\n"
        _, c = container(lab, task)
        assert c.exec_run(["cat", "/etc/motd"]).output == b"welcome\n"
        assert c.exec_run(["cat", "/run/secrets/api-key"]).output == b"key-from-a-file\n"
        assert c.exec_run(["cat", "/run/secrets/db-password"]).output == b"from-the-store"
        assert c.exec_run(["sh", "-c", "echo x > /www/index.html"]).exit_code != 0  # read-only
        host = c.attrs["HostConfig"]
        assert (host["NanoCpus"], host["Memory"]) == (250_000_000, 96 << 20)
        # A reservation is the scheduler's (it places only what fits), not the container's.
        assert web["Spec"]["TaskTemplate"]["Resources"]["Reservations"]["MemoryBytes"] == 64 << 20
        spec = web["Spec"]["TaskTemplate"]["ContainerSpec"]
        configs = {r["File"]["Name"] for r in spec["Configs"]}
        assert configs == {"/www/index.html", "/www/assets/a.css", "/www/assets/img/b.txt", "/etc/motd"}
        owned = {"label": runtime.owner_labels(swarm_owner)}
        assert {(x["Spec"]["Labels"][runtime.LABEL_APP]) for x in api.configs(filters=owned)} == {"shop"}
        assert all(b"from-the-store" not in x["Spec"]["Name"].encode() for x in api.secrets(filters=owned))
        assert len(spec["Secrets"]) == 2
        network = api.inspect_network(f"{swarm_owner}_default_shop")
        assert network["Driver"] == "overlay"
        assert {api.inspect_node(t["NodeID"])["Description"]["Hostname"] for t in tasks("worker")} == set(lab.nodes)

        # A push changing the web service alone (its .env value, a bound file) updates web alone.
        before = {s: (services()[names[s]]["Version"]["Index"], sorted(t["ID"] for t in tasks(s)))
                  for s in ("db", "worker")}
        old_web = task["ID"]
        repo.push({"apps/shop/.env": "GREETING=changed\n", "apps/shop/site/index.html": "<h1>new</h1>\n"})

        def served_new() -> bool:
            now = tasks("web")
            if not now or now[0]["ID"] == old_web:
                return False
            where = api.inspect_node(now[0]["NodeID"])["Status"]["Addr"]
            return fetch(where, "/greeting.txt") == b"changed\n" and fetch(where, "/index.html") == b"<h1>new</h1>\n"

        wait_for(served_new, 60, "the new web task to serve the new values")
        after = {s: (services()[names[s]]["Version"]["Index"], sorted(t["ID"] for t in tasks(s)))
                 for s in ("db", "worker")}
        assert after == before
        # The old version's config is removed once no task uses it.
        wait_for(lambda: len(api.configs(filters=owned)) == 4, 30, "the replaced config to be removed")
        assert db_node  # (the db ran somewhere in the lab)
    finally:
        daemon.stop()
        manager.close()
        db.close()
    assert "Traceback" not in daemon.output(), daemon.output()
