"""Shared fixtures: real git repositories driven with the git CLI, and (for the
integration and e2e tests) a real Docker engine with a FROM-scratch busybox image and
a per-test owner label whose containers are all removed in teardown."""

from __future__ import annotations

import os
import pathlib
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator

import docker
import pytest

from cynchrod import builds, config, reconciler, runtime, source, store
from cynchrod import secrets as vault
from tests.helpers import TEST_IMAGE, TEST_IMAGE_2, TEST_LABEL, Daemon, GitRepo


@pytest.fixture
def repo(tmp_path: pathlib.Path) -> GitRepo:
    return GitRepo(tmp_path)



@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    client = docker.from_env(timeout=60)
    client.ping()  # no engine is a failure, never a skip
    yield client
    client.close()


@pytest.fixture(scope="session")
def images(docker_client: docker.DockerClient) -> Iterator[tuple[str, str]]:
    """Two local tags of a 2 MB busybox image: nothing is ever pulled."""
    with tempfile.TemporaryDirectory() as ctx:
        shutil.copy("/bin/busybox", pathlib.Path(ctx) / "busybox")
        (pathlib.Path(ctx) / "Dockerfile").write_text(
            "FROM scratch\nCOPY busybox /bin/busybox\n"
            'RUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
            'CMD ["sh", "-c", "sleep 3600"]\n')
        for tag in (TEST_IMAGE, TEST_IMAGE_2):
            # Two tags, two distinct image ids (the label differs).
            subprocess.run(["docker", "build", "-q", "--label", f"{TEST_LABEL}={tag}", "-t", tag, ctx],
                           check=True, capture_output=True)
    yield TEST_IMAGE, TEST_IMAGE_2
    if os.environ.get("CYNCHROD_KEEP_TEST_IMAGES"):
        return  # several test sessions share this engine (parallel work trees)
    for image in docker_client.images.list(filters={"label": TEST_LABEL}):
        docker_client.images.remove(image.id, force=True)


def remove_owned(client: docker.DockerClient, owner: str) -> None:
    """Every container, network, volume and image carrying this owner label."""
    mine = {"label": [f"{runtime.LABEL_OWNER}={owner}"]}
    for c in client.api.containers(all=True, filters=mine):
        client.api.remove_container(c["Id"], force=True, v=True)
    for n in client.api.networks(filters=mine):
        client.api.remove_network(n["Id"])
    for v in client.api.volumes(filters=mine).get("Volumes") or []:
        client.api.remove_volume(v["Name"], force=True)
    for i in client.api.images(filters=mine):
        client.api.remove_image(i["Id"], force=True)


@pytest.fixture
def owner(docker_client: docker.DockerClient) -> Iterator[str]:
    """A fresh label namespace: every container the test makes is found and removed by it."""
    name = "t" + secrets.token_hex(4)
    yield name
    remove_owned(docker_client, name)
    for c in docker_client.api.containers(all=True, filters={"label": [f"{TEST_LABEL}={name}"]}):
        docker_client.api.remove_container(c["Id"], force=True)


class Harness:
    """A reconciler wired to a real repo, a real engine and a state dir in tmp."""

    def __init__(self, repo_url: str, state: pathlib.Path, owner: str) -> None:
        self.state = state
        self.db = store.Store(state / "cynchrod.db")
        self.secrets = vault.Secrets(self.db, state_dir=state)
        self.rt = runtime.DockerRuntime(owner=owner, stop_timeout=1, secrets_dir=self.secrets.staging)
        self.src = source.Source(repo_url, state_dir=state)
        self.max_apps: dict[str, int] = {}
        # Builds from local repositories under the test's folder (the config's builds.localRepos).
        self.builds = builds.Builds(state_dir=state, rt=self.rt,
                                    allow=lambda org, url: config.repo_allowed(url, (str(state.parent),)))
        self.rec = reconciler.Reconciler(src=self.src, rt=self.rt, db=self.db, secrets=self.secrets,
                                         max_apps=lambda org: self.max_apps.get(org, 10), builds=self.builds)

    def sync(self, trigger: str = "poll") -> reconciler.PassResult:
        return self.rec.run_pass(trigger)

    def containers(self) -> dict[str, dict]:  # type: ignore[type-arg]
        rows = self.rt.api.containers(all=True, filters=self.rt.owner_filter)
        return {row["Labels"][runtime.LABEL_APP]: row for row in rows}

    def app(self, name: str, org: str = "default") -> store.App:
        return self.db.live_apps()[(org, name)]

    def close(self) -> None:
        self.rt.close()
        self.db.close()
        shutil.rmtree(self.secrets.staging, ignore_errors=True)  # on /dev/shm or /run: not under tmp_path


@pytest.fixture
def harness(repo, owner: str, images, tmp_path: pathlib.Path) -> Iterator[Harness]:  # type: ignore[no-untyped-def]
    h = Harness(repo.url, tmp_path / "state", owner)
    yield h
    h.close()


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
