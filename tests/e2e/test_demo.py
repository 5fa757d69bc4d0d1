"""`scripts/demo` as a newcomer runs it: the env lines it prints work with the CLI, its clone hint
creates nothing inside the project, a push through that clone runs in about a second, and the
`hello` example logs its requests."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import urllib.request

import docker

from tests.helpers import Daemon, GitRepo, cli, free_port, git, owned, wait_for

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _apps(env: dict[str, str]) -> dict[str, dict[str, object]]:
    out = cli("apps", "-o", "json", env=env)
    return {str(a["name"]): a for a in json.loads(out.stdout)["apps"]} if out.returncode == 0 else {}


def test_the_demo_prints_working_env_lines_and_a_clone_hint_outside(owner: str, tmp_path: pathlib.Path,
                                                                     docker_client: docker.DockerClient) -> None:
    env = {**os.environ, "CYNCHROD_STATE": str(tmp_path / "state"), "CYNCHROD_LISTEN": f"127.0.0.1:{free_port()}",
           "CYNCHROD_OWNER": owner, "CYNCHROD_STOP_TIMEOUT": "1", "CYNCHROD_INTERVAL": "300"}
    log = tmp_path / "demo.log"
    cleanup: list[pathlib.Path] = []
    with open(log, "wb") as out:
        demo = subprocess.Popen([str(ROOT / "scripts" / "demo")], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "export CYNCHROD_API=" in log.read_text(), 120, "the demo's env lines")
        lines = log.read_text().splitlines()
        exports = [line for line in lines if line.startswith("export ")]
        shown = subprocess.run(["bash", "-c", "; ".join([*exports, "env"])], capture_output=True, text=True,
                               check=True).stdout
        client_env = dict(line.split("=", 1) for line in shown.splitlines()
                          if line.startswith(("CYNCHROD_API=", "CYNCHROD_TOKEN=")))
        assert client_env["CYNCHROD_API"] == f"http://{env['CYNCHROD_LISTEN']}"
        wait_for(lambda: set(_apps(client_env)) == {"clock", "hello"}, 60, "the demo apps through the CLI")

        hint = next(line for line in lines if "git clone" in line).split(": ", 1)[1].split(": ", 1)[1]
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
        took = wait_for(lambda: any(c["Labels"]["io.cynchrod.app"] == "extra" and c["State"] == "running"
                                    for c in owned(docker_client, owner)), 10, "the pushed app")
        assert took < 2, f"push-to-running took {took:.2f}s"
    finally:
        demo.send_signal(signal.SIGTERM)
        demo.wait(timeout=30)
        # The demo leaves its edge (a Caddy) running, like its apps: this test stops it.
        pidfile = tmp_path / "state" / "caddy.pid"
        if pidfile.exists() and pidfile.read_text().strip().isdigit():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
        for path in cleanup:
            shutil.rmtree(path, ignore_errors=True)


def test_hello_logs_its_requests(repo: GitRepo, owner: str, tmp_path: pathlib.Path) -> None:
    subprocess.run([str(ROOT / "scripts" / "build-example-image")], check=True, capture_output=True)
    hello = (ROOT / "examples" / "apps" / "hello.yaml").read_text()
    repo.push({"apps/hello.yaml": "\n".join(line for line in hello.splitlines()
                                             if not line.startswith("hostPort"))})  # any free host port
    state = tmp_path / "state"
    token = cli("token", "create", "--org", "default", "--state", str(state)).stdout.strip()
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
