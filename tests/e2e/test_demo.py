"""`scripts/demo` as a newcomer runs it: the env lines it prints work with the CLI, its clone hint
creates nothing inside the project, a push through that clone runs in about a second, and the
`hello` example logs its requests."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import urllib.request

import docker

from tests.helpers import Daemon, GitRepo, cli, free_port, git, new_token, owned, wait_for

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _apps(env: dict[str, str]) -> dict[str, dict[str, object]]:
    out = cli("apps", "-o", "json", env=env)
    return {str(a["name"]): a for a in json.loads(out.stdout)["apps"]} if out.returncode == 0 else {}


#: What the demo prints that it should not: setuptools' package warnings, docker's legacy-builder notice, a crash.
NOISE = ("Traceback", "absent from the `packages`", "DEPRECATED: The legacy builder")
#: A shell as a newcomer's: the venv's bin is not on its PATH.
PLAIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _ctrl_c_default() -> None:
    # A test run as a background job of a non-interactive shell inherits SIGINT ignored;
    # a terminal's Ctrl-C is what this test sends, so the demo gets SIGINT's default back.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run_demo(env: dict[str, str], log: pathlib.Path, *args: str) -> subprocess.Popen[bytes]:
    """The demo in a process group of its own, as a terminal's foreground job."""
    with open(log, "wb") as out:
        return subprocess.Popen([str(ROOT / "scripts" / "demo"), *args], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_ctrl_c_default)


def _ctrl_c(demo: subprocess.Popen[bytes]) -> None:
    """What Ctrl-C in the demo's terminal does: SIGINT to its whole process group."""
    if demo.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(demo.pid, signal.SIGINT)
    try:
        demo.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(demo.pid, signal.SIGKILL)
        demo.wait()
        raise


def _printed(log: pathlib.Path) -> list[str]:
    """The demo's own lines: what it printed before the daemon's first log line."""
    wait_for(lambda: "export CYNCHROD_API=" in log.read_text() or "export PATH=" in log.read_text(), 120,
             "the demo's env lines")
    wait_for(lambda: re.search(r"^\d{4}-\d\d-\d\d ", log.read_text(), re.M), 30, "the daemon's first log line")
    lines = log.read_text().splitlines()
    return lines[:next(i for i, line in enumerate(lines) if re.match(r"\d{4}-\d\d-\d\d ", line))]


def _edge_port(lines: list[str]) -> int:
    [port] = {int(m.group(1)) for line in lines if (m := re.search(r"http://127\.0\.0\.1:(\d+)/ *$", line))
              and "hello.localhost" in line}
    return port


def _through_the_edge(port: int) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/", headers={"Host": "hello.localhost"})
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def test_the_demo_prints_working_env_lines_and_a_clone_hint_outside(owner: str, tmp_path: pathlib.Path,
                                                                     docker_client: docker.DockerClient) -> None:
    env = {**os.environ, "CYNCHROD_STATE": str(tmp_path / "state"), "CYNCHROD_LISTEN": f"127.0.0.1:{free_port()}",
           "CYNCHROD_OWNER": owner, "CYNCHROD_STOP_TIMEOUT": "1", "CYNCHROD_INTERVAL": "300"}
    log = tmp_path / "demo.log"
    cleanup: list[pathlib.Path] = []
    demo = _run_demo(env, log)
    try:
        lines = _printed(log)
        exports = [line for line in lines if line.startswith("export ")]
        shown = subprocess.run(["bash", "-c", "; ".join([*exports, "env"])], capture_output=True, text=True,
                               check=True).stdout
        client_env = dict(line.split("=", 1) for line in shown.splitlines()
                          if line.startswith(("CYNCHROD_API=", "CYNCHROD_TOKEN=")))
        assert client_env["CYNCHROD_API"] == f"http://{env['CYNCHROD_LISTEN']}"
        wait_for(lambda: set(_apps(client_env)) == {"clock", "guestbook", "hello"}, 60, "the demo apps through the CLI")
        # Pasted into a fresh shell, the export lines are enough for the CLI.
        pasted = subprocess.run(["bash", "-c", "; ".join([*exports, "cynchrod apps"])], capture_output=True,
                                text=True, env={"PATH": PLAIN_PATH, "HOME": str(tmp_path)})
        assert pasted.returncode == 0 and "hello" in pasted.stdout, pasted.stderr
        # Quiet: the demo's lines are its own, and they end with what to do next.
        assert all(line.startswith(("demo:", "export ", "built ", "setup: ")) for line in lines), lines
        assert any("dashboard" in line and client_env["CYNCHROD_API"] + "/" in line for line in lines[-8:]), lines
        assert any(client_env["CYNCHROD_TOKEN"] in line for line in lines[-8:]), lines  # to paste into the sign-in
        assert any("git clone" in line for line in lines[-8:]), lines

        hint = next(line for line in lines if "git clone" in line).split(":", 1)[1].strip()
        before = git("status", "--porcelain", "--ignored", cwd=ROOT)
        clone = subprocess.run(["bash", "-c", f"{hint} && pwd"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.strip()
        assert git("status", "--porcelain", "--ignored", cwd=ROOT) == before  # nothing new in the project
        assert not clone.startswith(str(ROOT))
        work = pathlib.Path(clone)
        cleanup.append(work.parent)
        (work / "apps" / "extra.yaml").write_text((work / "apps" / "clock.yaml").read_text().replace(
            "name: clock", "name: extra"))
        git("add", "apps/extra.yaml", cwd=work)
        git("commit", "-q", "-m", "extra", cwd=work)
        git("push", "-q", "origin", "HEAD", cwd=work)
        # The push itself wakes the daemon: its interval is 300 s, so the app running within 30 s is
        # the push, not a poll (no time is asserted: the machine's load sets it; 2.95 s seen in CI).
        wait_for(lambda: any(c["Labels"]["io.cynchrod.app"] == "extra" and c["State"] == "running"
                             for c in owned(docker_client, owner)), 30, "the pushed app")

        # Ctrl-C stops the daemon; the edge (like the apps) keeps serving, on the port printed.
        edge_port = _edge_port(lines)
        # Any answer is Caddy's (hello's 200, or its 503 while hello's host port 18080 is another's).
        wait_for(lambda: _through_the_edge(edge_port) in (200, 503), 30, "hello's route on the edge")
        _ctrl_c(demo)
        assert _through_the_edge(edge_port) in (200, 503)
        # The next run finds that edge and prints the same lines.
        again = _run_demo(env, tmp_path / "again.log")
        try:
            assert _edge_port(_printed(tmp_path / "again.log")) == edge_port
        finally:
            _ctrl_c(again)
        for out in (log, tmp_path / "again.log"):
            assert not [noise for noise in NOISE if noise in out.read_text()], out.read_text()
    finally:
        _ctrl_c(demo)
        # The demo leaves its edge running: `scripts/demo stop-edge` stops it.
        pidfile = tmp_path / "state" / "caddy.pid"
        caddy = _pid(pidfile)
        stopped = subprocess.run([str(ROOT / "scripts" / "demo"), "stop-edge"], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=60)
        for pid in {caddy, _pid(pidfile)} - {None}:  # whatever happened, no Caddy is left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)  # type: ignore[arg-type]
        for path in cleanup:
            shutil.rmtree(path, ignore_errors=True)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert caddy is not None
    wait_for(lambda: not _running(caddy), 10, "the demo's Caddy to end")


def _pid(pidfile: pathlib.Path) -> int | None:
    text = pidfile.read_text().strip() if pidfile.exists() else ""
    return int(text) if text.isdigit() else None


def _running(pid: int) -> bool:
    """A live process (a zombie that no one reaped yet is not)."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_hello_logs_its_requests(repo: GitRepo, owner: str, tmp_path: pathlib.Path) -> None:
    subprocess.run([str(ROOT / "scripts" / "build-example-image")], check=True, capture_output=True)
    hello = (ROOT / "examples" / "apps" / "hello.yaml").read_text()
    repo.push({"apps/hello.yaml": "\n".join(line for line in hello.splitlines()
                                             if not line.startswith("hostPort"))})  # any free host port
    state = tmp_path / "state"
    token = new_token(state, "default")
    daemon = Daemon(repo, state, owner, interval=300).start()
    try:
        env = {"CYNCHROD_API": daemon.api, "CYNCHROD_TOKEN": token}
        wait_for(lambda: _apps(env).get("hello", {}).get("status") == "running", 60, "hello to run")
        port = _apps(env)["hello"]["host_port"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            assert response.status == 200
        wait_for(lambda: "url:/" in cli("logs", "default/hello", env=env).stdout, 10, "the request in the logs")
        logged = cli("logs", "default/hello", env=env).stdout.splitlines()
        assert any(line.endswith("response:200") for line in logged), logged
    finally:
        assert daemon.stop() == 0
