"""Shared fixtures: real git repositories driven with the git CLI, and (for the
integration and e2e tests) a real Docker engine with a FROM-scratch busybox image and
a per-test owner label whose containers are all removed in teardown."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import pathlib
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import docker
import pytest

from cynchrod import runtime, store
from cynchrod.desired import config, source
from cynchrod.desired import secrets as vault
from cynchrod.edge import deploy
from cynchrod.runtime import local
from cynchrod.shell import builds, reconciler
from tests.helpers import TEST_IMAGE, TEST_IMAGE_2, TEST_LABEL, Daemon, GitRepo, free_port, wait_for

#: The end of a daemon's log shown under a failing test.
DAEMON_LOG_SHOWN = 20_000


@pytest.fixture(autouse=True)
def _daemons_of_this_test() -> None:
    Daemon.made.clear()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    """A test that fails shows the log of every daemon it started (the daemon is where the why is)."""
    report: pytest.TestReport = yield
    if report.failed:
        for daemon in Daemon.made:
            if daemon.log.exists():
                text = daemon.log.read_text(errors="replace")
                report.sections.append((f"cynchrod serve log {daemon.log} ({report.when})",
                                        text[-DAEMON_LOG_SHOWN:]))
    return report


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
        self.rt = local.LocalRuntime(owner=owner, stop_timeout=1, secrets_dir=self.secrets.staging)
        #: The runtime behind an edge, when a test puts one in front (``test_edge.edged``).
        self.deployer: deploy.Deployer | None = None
        self.src = source.Source(repo_url, state_dir=state)
        self.max_apps: dict[str, int] = {}
        self._events: threading.Thread | None = None
        # Builds from local repositories under the test's folder (the config's builds.localRepos).
        self.builds = builds.Builds(state_dir=state, rt=self.rt,
                                    allow=lambda org, url: config.repo_allowed(url, (str(state.parent),)))
        self.rec = reconciler.Reconciler(src=self.src, rt=self.rt, db=self.db, secrets=self.secrets,
                                         max_apps=lambda org: self.max_apps.get(org, 10), builds=self.builds)

    def watch(self) -> None:
        """Feed the reconciler's view from the engine's events (as the daemon does)."""
        self._stop = threading.Event()
        self._events = threading.Thread(target=self.rec.view.run, args=(self._stop,), daemon=True)
        self._events.start()
        deadline = time.monotonic() + 10
        while not self.rec.view._live:
            assert time.monotonic() < deadline, "the view never went live"
            time.sleep(0.01)

    def sync(self, trigger: str = "poll") -> reconciler.PassResult:
        return self.rec.sync(trigger)

    def containers(self) -> dict[str, dict]:  # type: ignore[type-arg]
        rows = self.rt.api.containers(all=True, filters=self.rt.owner_filter)
        return {row["Labels"][runtime.LABEL_APP]: row for row in rows}

    def app(self, name: str, org: str = "default") -> store.App:
        return self.db.live_apps()[(org, name)]

    def close(self) -> None:
        if self._events is not None:
            self._stop.set()
            self.rec.view.stop()
            self._events.join(5)
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
    # Every daemon is stopped (or killed) before the owner's containers are removed, even
    # when one of them fails to stop: a live one would re-create them after the clean-up.
    with contextlib.ExitStack() as stack:
        for d in made:
            if d.proc is not None and d.proc.poll() is None:
                stack.callback(d.stop)


class Caddy:
    """A real Caddy (Debian's), its admin API and listeners on free local ports."""

    def __init__(self, root: pathlib.Path, *, apps: dict[str, object] | None = None) -> None:
        self.admin_port, self.port, self.tls_port, self.other_port = (free_port() for _ in range(4))
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        self.log = root / "caddy.log"
        #: Someone else's part of Caddy's config, which cynchrod must leave alone.
        self.base: dict[str, object] = {
            "admin": {"listen": f"127.0.0.1:{self.admin_port}", "config": {"persist": False}},
            "storage": {"module": "file_system", "root": str(root / "data")},
            "apps": {
                "pki": {"certificate_authorities": {"local": {"install_trust": False}}},
                "http": {"servers": {"other": {
                    "listen": [f"127.0.0.1:{self.other_port}"], "automatic_https": {"disable": True},
                    "routes": [{"handle": [{"handler": "static_response", "body": "not cynchrod's"}]}]}}},
            },
        }
        if apps is not None:
            self.base["apps"] = apps
        config = root / "caddy.json"
        config.write_text(json.dumps(self.base))
        env = {**os.environ, "HOME": str(root), "XDG_DATA_HOME": str(root / "xdg-data"),
               "XDG_CONFIG_HOME": str(root / "xdg-config")}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(["caddy", "run", "--config", str(config)], stdout=out,
                                         stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
        wait_for(self._up, 15, "caddy's admin API")

    def _up(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()
        try:
            return self.get("/config/") is not None
        except OSError:
            return False

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.admin}{path}", timeout=5) as response:
            return json.loads(response.read() or b"null")

    def call(self, method: str, path: str, body: object) -> None:
        request = urllib.request.Request(f"{self.admin}{path}", method=method, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=5).close()

    def fetch(self, host: str, *, port: int | None = None, timeout: float = 5) -> tuple[int, str]:
        """One request through the edge on a fresh connection: (status, body)."""
        conn = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=timeout)
        try:
            conn.request("GET", "/", headers={"Host": host})
            response = conn.getresponse()
            return response.status, response.read().decode()
        finally:
            conn.close()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def caddy(tmp_path: pathlib.Path) -> Iterator[Caddy]:
    root = tmp_path / "caddy"
    root.mkdir()
    c = Caddy(root)
    yield c
    c.stop()
