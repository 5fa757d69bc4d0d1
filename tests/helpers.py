"""Helpers for tests that run cynchrod as a user does: CLI processes and daemons."""

from __future__ import annotations

import contextlib
import http.client
import itertools
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import docker

from cynchrod import runtime, store

TEST_IMAGE = "cynchrod-test/busybox:1"
TEST_IMAGE_2 = "cynchrod-test/busybox:2"
TEST_LABEL = "io.cynchrod.test"

GIT_ENV = {
    "GIT_AUTHOR_NAME": "tester", "GIT_AUTHOR_EMAIL": "tester@localhost",
    "GIT_COMMITTER_NAME": "tester", "GIT_COMMITTER_EMAIL": "tester@localhost",
}


def git(*args: str, cwd: pathlib.Path) -> str:
    env = {**os.environ, **GIT_ENV}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


class GitRepo:
    """A bare repository (what cynchrod follows) and a working clone to push from."""

    def __init__(self, root: pathlib.Path) -> None:
        self.bare = root / "origin.git"
        self.work = root / "work"
        git("init", "-q", "--bare", "-b", "main", str(self.bare), cwd=root)
        git("clone", "-q", str(self.bare), str(self.work), cwd=root)
        git("checkout", "-q", "-b", "main", cwd=self.work)

    @property
    def url(self) -> str:
        return str(self.bare)

    def push(self, files: dict[str, str | None], message: str = "change") -> str:
        """Write (or delete, for None) files, commit, push; return the new commit id."""
        for path, content in files.items():
            target = self.work / path
            if content is None:
                git("rm", "-q", "-r", path, cwd=self.work)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(content)
                git("add", path, cwd=self.work)
        git("commit", "-q", "--allow-empty", "-m", message, cwd=self.work)
        for attempt in range(10):
            try:
                git("push", "-q", "origin", "HEAD:main", cwd=self.work)
                break
            except subprocess.CalledProcessError:
                if attempt == 9:
                    raise
                # Someone (the daemon) pushed first: do what a person does, rebase and push again.
                git("pull", "-q", "--rebase", "origin", "main", cwd=self.work)
        return git("rev-parse", "HEAD", cwd=self.work).strip()


CLI = [sys.executable, "-m", "cynchrod"]


def manifest(name: str, command: str = "[sleep, '3600']", extra: str = "") -> str:
    return f"name: {name}\nimage: {TEST_IMAGE}\ncommand: {command}\nmemory: 64\n{extra}"


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env={**os.environ, **(env or {})})


def new_token(state: pathlib.Path, org: str, name: str | None = None, *, admin: bool = False) -> str:
    """A token, made as ``cynchrod token create`` makes it but in this process: a CLI process
    costs a second or more on a busy 2-core machine, and fixtures make several per test. The
    command itself is tested in test_cli and test_api."""
    db = store.Store(state / "cynchrod.db")
    try:
        return db.create_token(org=org, name=name or f"{org}-token", admin=admin)[1]
    finally:
        db.close()


def wait_for(check: Callable[[], object], timeout: float, what: str) -> float:
    """Poll ``check`` until truthy; returns the seconds it took (the bound is the assertion)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def numbers_until(follower: Any, last: int, *, within: float = 40) -> list[int]:
    """The N of each ``line N ...`` a log follower gives, until N is ``last``. The follower is
    closed after ``within`` seconds, so a stream that stops short ends the test, not CI; the
    caller closes it otherwise (and may check how that goes)."""
    timer = threading.Timer(within, follower.close)
    timer.start()
    numbers: list[int] = []
    try:
        for batch in follower.batches():
            numbers += [int(line.line.split()[1]) for line in batch if line.line.startswith("line ")]
            if numbers and numbers[-1] == last:
                break
    finally:
        timer.cancel()
    return numbers


def breaks(numbers: list[int], *, gaps: bool = True) -> list[str]:
    """Where ``numbers`` is not consecutive, as short readable reasons (empty when it is):
    a stream's line numbers, each line once and in order. A failing assertion then says
    what went wrong (``gap 35514 -> 35516``) rather than printing tens of thousands of numbers.
    ``gaps=False``: only steps back or in place (lines given twice or out of order)."""
    out = []
    for i in range(1, len(numbers)):
        if numbers[i] != numbers[i - 1] + 1 and (gaps or numbers[i] <= numbers[i - 1]):
            kind = "gap" if numbers[i] > numbers[i - 1] else "back"
            out.append(f"{kind} at {i}: {numbers[i - 1]} -> {numbers[i]}")
    return out[:20]


#: Ports a process hands out for servers it starts: a block of its own per xdist worker (and one for a
#: run without workers), below the kernel's ephemeral range (``net.ipv4.ip_local_port_range`` starts at
#: 32768). A port picked by binding port 0 and closing could be taken before the server bound it, by an
#: outgoing connection or by another worker's pick: under four workers two Caddy instances came up on
#: each other's admin and listener ports. A port still held (a server of an earlier test) is skipped.
PORT_BLOCK = 1500


def _port_block() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) + 1 if worker.startswith("gw") else 0
    start = 10000 + index * PORT_BLOCK
    assert start + PORT_BLOCK <= 32768, f"too many workers for the port blocks: {worker}"
    return range(start, start + PORT_BLOCK)


_ports = itertools.cycle(_port_block())
_ports_lock = threading.Lock()


def free_port() -> int:
    """A port no other test of this run is given, free now on 127.0.0.1."""
    with _ports_lock:
        for _ in range(PORT_BLOCK):
            port = next(_ports)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError(f"no free port left in {_port_block()}")


class Daemon:
    """``cynchrod serve`` as a process. Every daemon a test made is listed in ``made``, so that
    a failing test shows their logs (see ``pytest_runtest_makereport`` in conftest); a daemon
    a module's tests share (``shared_by`` that module) stays listed for each of them."""

    made: ClassVar[list[Daemon]] = []

    def __init__(self, repo: GitRepo | str, state: pathlib.Path, owner: str, *, interval: float = 300,
                 env: dict[str, str] | None = None) -> None:
        Daemon.made.append(self)
        self.log = state.parent / f"daemon-{time.monotonic_ns()}.log"
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}"
        self.owner = owner
        url = repo if isinstance(repo, str) else repo.url
        self.args = ["serve", "--repo", url, "--state", str(state), "--owner", owner,
                     "--interval", str(interval), "--stop-timeout", "1", "--listen", f"127.0.0.1:{self.port}"]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        #: The module whose tests share this daemon (see conftest's ``shared_daemons``), if any.
        self.shared_by: str | None = None

    def start(self) -> Daemon:
        with open(self.log, "ab") as out:
            # A session of its own: the crash hook SIGKILLs the daemon's whole process group.
            self.proc = subprocess.Popen([*CLI, *self.args], stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        return self

    def healthy(self) -> bool:
        """The API answers ``/healthz`` with 200 (False while it is not listening yet)."""
        try:
            with urllib.request.urlopen(self.api + "/healthz", timeout=2) as answer:
                return bool(answer.status == 200)
        except (OSError, http.client.HTTPException):  # urllib's HTTPError (a 503) is an OSError too
            return False

    def wait_healthy(self, timeout: float = 30) -> Daemon:
        wait_for(self.healthy, timeout, "the API")
        return self

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            # Fail, but leave no daemon behind to re-create containers under later tests.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise

    def output(self) -> str:
        return self.log.read_text()


def owned(client: docker.DockerClient, owner: str) -> list[dict]:  # type: ignore[type-arg]
    rows: list[dict] = client.api.containers(  # type: ignore[type-arg]
        all=True, filters={"label": [f"{runtime.LABEL_OWNER}={owner}"]})
    return rows



@contextlib.contextmanager
def tmpfs(path: pathlib.Path, size: str) -> Iterator[pathlib.Path]:
    """A fresh tmpfs of ``size`` (``16m``) mounted at ``path`` (made): a disk that fills up.
    Unmounted lazily at the end: a daemon stopped after this may still hold files there."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(["umount", "-l", str(path)], check=True)
