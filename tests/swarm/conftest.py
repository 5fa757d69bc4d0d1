"""The swarm tests' lab: three dockerd nodes in network namespaces and a registry
(``scripts/swarm-lab``), brought up once per session and taken down at its end
(``CYNCHROD_KEEP_SWARM_LAB=1`` keeps it up). Each test gets its own owner label;
every service, network, secret and volume it made is removed in teardown."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import docker
import pytest

from cynchrod import runtime, store
from cynchrod.desired import config, source
from cynchrod.desired import secrets as vault
from cynchrod.runtime import swarm
from cynchrod.shell import builds, reconciler
from tests.helpers import GitRepo

ROOT = pathlib.Path(__file__).resolve().parents[2]
LAB = ROOT / "scripts" / "swarm-lab"


@dataclasses.dataclass(frozen=True)
class Lab:
    docker_host: str
    registry: str
    #: One client per node, by hostname.
    nodes: dict[str, str]

    def client(self, node: str | None = None) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.nodes[node] if node else self.docker_host, timeout=60)

    @property
    def image(self) -> str:
        return f"{self.registry}/cynchrod-test/busybox:1"


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    out = subprocess.run([str(LAB), "up", "3"], check=True, capture_output=True, text=True, timeout=300).stdout
    values = dict(line.split("=", 1) for line in out.strip().splitlines()[-2:])
    host = values["DOCKER_HOST"]
    run_dir = pathlib.Path(host.removeprefix("unix://")).parent.parent
    nodes = {p.name: f"unix://{p}/docker.sock" for p in sorted(run_dir.iterdir()) if (p / "docker.sock").exists()}
    made = Lab(host, values["REGISTRY"], nodes)
    # The test image, built on the manager and pushed: every node pulls it from the registry.
    with tempfile.TemporaryDirectory() as ctx:
        shutil.copy("/bin/busybox", pathlib.Path(ctx) / "busybox")
        (pathlib.Path(ctx) / "Dockerfile").write_text(
            "FROM scratch\nCOPY busybox /bin/busybox\n"
            'RUN ["/bin/busybox", "--install", "-s", "/bin"]\nCMD ["sleep", "3600"]\n')
        env = {**os.environ, "DOCKER_HOST": host}
        subprocess.run(["docker", "build", "-q", "-t", made.image, ctx], check=True, capture_output=True, env=env)
        subprocess.run(["docker", "push", made.image], check=True, capture_output=True, env=env)
    yield made
    if not os.environ.get("CYNCHROD_KEEP_SWARM_LAB"):
        subprocess.run([str(LAB), "down"], check=True, capture_output=True, timeout=300)


def remove_owned(lab: Lab, owner: str) -> None:
    mine = {"label": [f"{runtime.LABEL_OWNER}={owner}"]}
    client = lab.client()
    try:
        for s in client.api.services(filters=mine):
            client.api.remove_service(s["ID"])
        # Secrets, configs, networks and images are released once the tasks are gone.
        for _ in range(100):
            left = 0
            for s in client.api.secrets(filters=mine):
                try:
                    client.api.remove_secret(s["ID"])
                except docker.errors.APIError:
                    left += 1
            for c in client.api.configs(filters=mine):
                try:
                    client.api.remove_config(c["ID"])
                except docker.errors.APIError:
                    left += 1
            for n in client.api.networks(filters=mine):
                try:
                    client.api.remove_network(n["Id"])
                except docker.errors.APIError:
                    left += 1
            for i in client.api.images(filters=mine):
                try:
                    client.api.remove_image(i["Id"], force=True)
                except docker.errors.APIError:
                    left += 1
            if not left:
                break
            import time
            time.sleep(0.2)
    finally:
        client.close()
    for node in lab.nodes:
        c = lab.client(node)
        try:
            for v in c.api.volumes(filters=mine).get("Volumes") or []:
                for _ in range(50):
                    try:
                        c.api.remove_volume(v["Name"], force=True)
                        break
                    except docker.errors.APIError:
                        import time
                        time.sleep(0.2)
        finally:
            c.close()


@pytest.fixture
def swarm_owner(lab: Lab) -> Iterator[str]:
    name = "s" + secrets.token_hex(4)
    yield name
    remove_owned(lab, name)


class SwarmHarness:
    """A reconciler on the lab's manager, a real repo and a state dir in tmp."""

    def __init__(self, lab: Lab, repo_url: str, state: pathlib.Path, owner: str) -> None:
        self.lab = lab
        self.db = store.Store(state / "cynchrod.db")
        self.secrets = vault.Secrets(self.db, state_dir=state, files=False)
        self.registry = swarm.Registry(f"http://{lab.registry}")
        self.rt = swarm.SwarmRuntime(owner=owner, instance=self.db.instance_id(), stop_timeout=1,
                                     base_url=lab.docker_host, registry=self.registry,
                                     secret_value=self.secrets.value)
        self.src = source.Source(repo_url, state_dir=state)
        # Builds from local repositories under the test's folder (the config's builds.localRepos).
        self.builds = builds.Builds(state_dir=state, rt=self.rt,
                                    allow=lambda org, url: config.repo_allowed(url, (str(state.parent),)))
        self.rec = reconciler.Reconciler(src=self.src, rt=self.rt, db=self.db, secrets=self.secrets,
                                         builds=self.builds)
        self.api = self.rt.api

    def sync(self, trigger: str = "poll") -> reconciler.PassResult:
        return self.rec.sync(trigger)

    def app(self, name: str, org: str = "default") -> store.App:
        return self.db.live_apps()[(org, name)]

    def services(self) -> dict[str, dict]:  # type: ignore[type-arg]
        rows = self.api.services(filters={"label": runtime.owner_labels(self.rt.owner)})
        return {r["Spec"]["Name"]: r for r in rows}

    def tasks(self, service: str) -> list[dict]:  # type: ignore[type-arg]
        return [t for t in self.api.tasks(filters={"service": service}) if t["DesiredState"] == "running"]

    def close(self) -> None:
        self.rt.close()
        self.db.close()


@pytest.fixture
def sw(lab: Lab, swarm_owner: str, tmp_path: pathlib.Path) -> Iterator[SwarmHarness]:
    repo = GitRepo(tmp_path)
    h = SwarmHarness(lab, repo.url, tmp_path / "state", swarm_owner)
    h.repo = repo  # type: ignore[attr-defined]
    yield h
    h.close()
