"""Shared fixtures: real git repositories driven with the git CLI, and (for the
integration and e2e tests) a real Docker engine with a FROM-scratch busybox image and
a per-test owner label whose containers are all removed in teardown.

Markers come from what a test uses (``pytest_collection_modifyitems``): ``docker`` for every
test that reaches the engine, ``swarm`` for tests/swarm, so ``pytest -m "not docker"`` runs
the pure tests alone. The suite runs on pytest-xdist workers (scripts/test): tests are
isolated by their owner label; those that share a module's daemon, and the swarm lab, run
on one worker each (``xdist_group``)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import http.client
import json
import os
import pathlib
import re
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

# A deployment is ``deploying`` until its units have been up for ``min_ready`` (2 s by default): the
# tests' units are judged after 0.3 s, for the harness, the daemons they start and the CLI alike.
os.environ.setdefault("CYNCHROD_MIN_READY", "0.3")

#: The end of a daemon's log shown under a failing test.
DAEMON_LOG_SHOWN = 20_000
#: Fixtures that reach the Docker engine: a test that uses one (directly or through another) is ``docker``.
DOCKER_FIXTURES = frozenset({"docker_client", "images", "owner", "harness", "daemons", "lab"})
#: Held while the test images are built: two workers build them at once otherwise.
IMAGES_LOCK = pathlib.Path(tempfile.gettempdir()) / "cynchrod-test-images.lock"


def pytest_configure(config: pytest.Config) -> None:
    """Refuse a pytest that silently ignores ``xdist_group``: pytest 9.2.0 under ``--dist loadgroup``
    spreads one group over several workers (pytest-xdist #1386), so two tests sharing a module's
    daemon would run at once. setup.cfg pins ``pytest<9.2``; this catches an install that did not."""
    if getattr(config.option, "dist", "no") == "loadgroup" and _version(pytest.__version__) >= (9, 2):
        raise pytest.UsageError(f"pytest {pytest.__version__} ignores xdist_group under --dist loadgroup "
                                "(pytest-xdist #1386): install through constraints.txt (pytest<9.2)")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


@pytest.hookimpl(tryfirst=True)  # before xdist's, which reads the groups into the node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Markers by what each test needs, and one xdist group per shared resource."""
    swarm = config.rootpath / "tests" / "swarm"
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if item.path.is_relative_to(swarm):
            # One lab per machine: its tests run on one worker, one after the other.
            item.add_marker(pytest.mark.swarm)
            item.add_marker(pytest.mark.xdist_group("swarm"))
        if names & DOCKER_FIXTURES or item.get_closest_marker("swarm"):
            item.add_marker(pytest.mark.docker)
        fixtureinfo = getattr(item, "_fixtureinfo", None)
        if fixtureinfo is not None and item.get_closest_marker("xdist_group") is None:
            # A module-scoped fixture (a shared daemon, a browser) is made once for the tests
            # of that module that use it when they run on the same worker.
            shared = any(defs[-1].scope == "module" for defs in fixtureinfo.name2fixturedefs.values() if defs)
            if shared:
                item.add_marker(pytest.mark.xdist_group(item.module.__name__ if item.module else item.nodeid))


@pytest.fixture(autouse=True)
def _daemons_of_this_test(request: pytest.FixtureRequest) -> None:
    """The daemons whose logs a failure shows: this test's, and its module's shared one."""
    module = request.module.__name__ if request.module else None
    Daemon.made[:] = [d for d in Daemon.made if d.shared_by is not None and d.shared_by == module]


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
    """Two local tags of a 2 MB busybox image: nothing is ever pulled. Each xdist worker
    has this fixture: the build is under a file lock (a second build is a cache hit, the same
    ids), and the images are removed once, by the controller, when every worker is done
    (``pytest_sessionfinish``), never while another worker may still start a container."""
    with open(IMAGES_LOCK, "w") as lock, tempfile.TemporaryDirectory() as ctx:
        fcntl.flock(lock, fcntl.LOCK_EX)
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
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        remove_test_images(docker_client)


def remove_test_images(client: docker.DockerClient) -> None:
    if os.environ.get("CYNCHROD_KEEP_TEST_IMAGES"):
        return  # several test sessions share this engine (parallel work trees)
    for image in client.images.list(filters={"label": TEST_LABEL}):
        client.images.remove(image.id, force=True)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Under xdist, the controller removes the test images once all its workers have finished
    (each worker's ``images`` leaves them: another worker may be using them)."""
    if not hasattr(session.config, "workerinput") and getattr(session.config.option, "numprocesses", None):
        try:
            client = docker.from_env(timeout=60)
            client.ping()
        except docker.errors.DockerException:
            return  # no engine: no test used one, or the failure was reported by the test that did
        try:
            remove_test_images(client)
        finally:
            client.close()


def remove_owned(client: docker.DockerClient, owner: str) -> None:
    """Every container, network, volume and image carrying this owner label."""
    mine = {"label": [f"{runtime.LABEL_OWNER}={owner}"]}
    # At once (a test of 50 apps spent 21 s removing them one by one); the engine takes them in parallel.
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda c: client.api.remove_container(c["Id"], force=True, v=True),
                      client.api.containers(all=True, filters=mine)))
    for n in client.api.networks(filters=mine):
        client.api.remove_network(n["Id"])
    for v in client.api.volumes(filters=mine).get("Volumes") or []:
        client.api.remove_volume(v["Name"], force=True)
    for i in client.api.images(filters=mine):
        client.api.remove_image(i["Id"], force=True)


@contextlib.contextmanager
def new_owner(client: docker.DockerClient) -> Iterator[str]:
    """A fresh label namespace: every container made under it is found and removed by it."""
    name = "t" + secrets.token_hex(4)
    try:
        yield name
    finally:
        remove_owned(client, name)
        for c in client.api.containers(all=True, filters={"label": [f"{TEST_LABEL}={name}"]}):
            client.api.remove_container(c["Id"], force=True)


@pytest.fixture
def owner(docker_client: docker.DockerClient) -> Iterator[str]:
    """A fresh label namespace: every container the test makes is found and removed by it."""
    with new_owner(docker_client) as name:
        yield name


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


@contextlib.contextmanager
def daemon_maker(repo: GitRepo, root: pathlib.Path, owner: str) -> Iterator[Callable[..., Daemon]]:
    """``make(**kw)``: a daemon on ``repo`` with its state in ``root/state``; all stopped on exit."""
    made: list[Daemon] = []

    def make(**kw: object) -> Daemon:
        d = Daemon(repo, root / "state", owner, **kw)  # type: ignore[arg-type]
        made.append(d)
        return d

    try:
        yield make
    finally:
        # Every daemon is stopped (or killed) before the owner's containers are removed, even
        # when one of them fails to stop: a live one would re-create them after the clean-up.
        with contextlib.ExitStack() as stack:
            for d in made:
                if d.proc is not None and d.proc.poll() is None:
                    stack.callback(d.stop)


@pytest.fixture
def daemons(repo: GitRepo, owner: str, images: object, tmp_path: pathlib.Path) -> Iterator[Callable[..., Daemon]]:
    with daemon_maker(repo, tmp_path, owner) as make:
        yield make


@contextlib.contextmanager
def shared_daemons(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                   client: docker.DockerClient) -> Iterator[tuple[GitRepo, pathlib.Path, Callable[..., Daemon]]]:
    """For a module-scoped fixture: a repo, a folder and ``make`` as the ``daemons`` fixture's,
    under an owner of the module's. Its daemons' logs show under any of the module's failures."""
    root = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    repo = GitRepo(root)
    with new_owner(client) as name, daemon_maker(repo, root, name) as make:
        def make_shared(**kw: object) -> Daemon:
            d = make(**kw)
            d.shared_by = request.module.__name__
            return d

        yield repo, root, make_shared


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
        self.root = root
        (root / "caddy.json").write_text(json.dumps(self.base))
        self.start()

    def start(self) -> None:
        """Caddy from its config file (at first, or after ``stop``: what a supervisor restarting it does)."""
        env = {**os.environ, "HOME": str(self.root), "XDG_DATA_HOME": str(self.root / "xdg-data"),
               "XDG_CONFIG_HOME": str(self.root / "xdg-config")}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(["caddy", "run", "--config", str(self.root / "caddy.json")], stdout=out,
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

    def listeners(self, port: int | None = None) -> int:
        """How many sockets listen on the port now (``/proc/net/tcp``)."""
        local = f"0100007F:{port or self.port:04X}"
        with open("/proc/net/tcp") as table:
            return sum(1 for line in list(table)[1:] if line.split()[1] == local and line.split()[3] == "0A")

    def settle(self, port: int | None = None) -> None:
        """Until the last config change is handed over: Caddy 2.6 answers a change through its
        admin API once its old servers' shutdowns have *begun* (caddyhttp's ``App.Stop``), so for a
        moment the old config's listener still takes connections beside the new one. Once one
        listener is left (or none: Caddy is down), every new connection meets the new config."""
        wait_for(lambda: self.listeners(port) <= 1, 10, "Caddy to close its old config's listener")

    def fetch(self, host: str, *, port: int | None = None, timeout: float = 5,
              settled: bool = True) -> tuple[int, str]:
        """One request through the edge on a fresh connection: (status, body). ``settled``: the
        config last changed serves it (``settle``); a client that measures what users see
        during changes (test_edge's ``Client``) sends without waiting."""
        if settled:
            self.settle(port)
        conn = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=timeout)
        try:
            conn.request("GET", "/", headers={"Host": host})
            response = conn.getresponse()
            return response.status, response.read().decode()
        finally:
            conn.close()

    def stop(self) -> None:
        """``kill -9``."""
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def caddy(tmp_path: pathlib.Path) -> Iterator[Caddy]:
    root = tmp_path / "caddy"
    root.mkdir()
    c = Caddy(root)
    yield c
    c.stop()
