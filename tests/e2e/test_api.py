"""The API against a real `cynchrod serve`, a real dockerd and a bare Git repo."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import docker
import jsonschema
import pytest
import requests
import simple_websocket
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from cynchrod.api.logs.hub import QUEUE_LINES
from cynchrod.cli.client import websocket
from tests.helpers import TEST_IMAGE, Daemon, GitRepo, breaks, cli, git, new_token, owned, wait_for

OPENAPI = json.loads((pathlib.Path(__file__).resolve().parents[2] / "cynchrod" / "api" / "openapi.json").read_text())
_REGISTRY = Registry().with_resource("urn:openapi", Resource.from_contents(OPENAPI, default_specification=DRAFT202012))

TICKER = "[sh, -c, 'i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.2; done']"
COMMENTED = f"""# The web app: keep these comments.
name: web   # its name
image: "{TEST_IMAGE}"
command:
  - sleep
  - '3600'
env:
  GREETING: 'hi'   # quoted on purpose
memory: 64
"""


def check_schema(path: str, method: str, response: requests.Response) -> None:
    """Validate a real response against the OpenAPI document."""
    operation = OPENAPI["paths"][path][method.lower()]
    spec = operation["responses"][str(response.status_code)]
    schema = spec["content"]["application/json"]["schema"]
    ref = schema["$ref"].replace("#", "urn:openapi#", 1) if "$ref" in schema else None
    validator = jsonschema.Draft202012Validator({"$ref": ref} if ref else schema, registry=_REGISTRY)
    validator.validate(response.json())


@dataclasses.dataclass
class Api:
    daemon: Daemon
    url: str
    token: str
    other_token: str
    admin_token: str
    repo: GitRepo
    state: pathlib.Path

    def call(self, method: str, path: str, *, token: str | None = None, check: str | None = None,
             **kw: Any) -> requests.Response:
        headers = kw.pop("headers", {})
        headers.setdefault("Authorization", f"Bearer {token or self.token}")
        response = requests.request(method, self.url + path, headers=headers, timeout=30, **kw)
        if check is not None:
            check_schema(check, method, response)
        return response

    def app_id(self, name: str) -> str:
        apps = self.call("GET", "/apps", token=self.admin_token).json()["apps"]
        return next(a["id"] for a in apps if a["name"] == name)

    def app(self, app_id: str) -> dict[str, Any]:
        return dict(self.call("GET", f"/apps/{app_id}", token=self.admin_token).json())

    def wait_status(self, app_id: str, status: str, timeout: float = 20) -> float:
        return wait_for(lambda: self.app(app_id)["app"]["status"] == status, timeout, f"{app_id} to be {status}")

    def fresh_log(self) -> list[str]:
        clone = self.state.parent / f"clone-{time.monotonic_ns()}"
        git("clone", "-q", str(self.repo.bare), str(clone), cwd=self.state.parent)
        return git("log", "--format=%an <%ae>|%s", cwd=clone).splitlines()

    def fresh_file(self, path: str) -> str | None:
        clone = self.state.parent / f"clone-{time.monotonic_ns()}"
        git("clone", "-q", str(self.repo.bare), str(clone), cwd=self.state.parent)
        target = clone / path
        return target.read_text() if target.exists() else None


@contextlib.contextmanager
def serving(repo: GitRepo, make: Callable[..., Daemon], root: pathlib.Path) -> Iterator[Api]:
    """A daemon with three apps (web, ticker, and other's theirs) and three tokens (alice of default,
    bob of other, root an admin), its state in ``root/state``."""
    state = root / "state"
    tokens = [new_token(state, org, name, admin=admin)
              for org, name, admin in (("default", "alice", False), ("other", "bob", False), ("ops", "root", True))]
    repo.push({"apps/web.yaml": COMMENTED,
               "apps/ticker.yaml": f"name: ticker\nimage: {TEST_IMAGE}\ncommand: {TICKER}\nmemory: 64\n",
               "apps/theirs.yaml": f"name: theirs\norg: other\nimage: {TEST_IMAGE}\ncommand: [sleep, '3600']\n"})
    config = root / "cynchrod.yaml"  # repo apps build from local repositories under root
    config.write_text(f"builds: {{localRepos: ['{root}']}}\n")
    daemon = make(interval=300)
    daemon.args += ["--config", str(config)]
    daemon.start()
    a = Api(daemon, daemon.api, *tokens, repo=repo, state=state)
    wait_for(lambda: _ok(a), 30, "the API")
    for name in ("web", "ticker", "theirs"):
        a.wait_status(a.app_id(name), "running", 30)
    yield a
    assert daemon.stop() == 0
    log = daemon.output()
    for secret in tokens:
        assert secret not in log  # no token in any log line


@pytest.fixture
def api(repo: GitRepo, daemons: Callable[..., Daemon], tmp_path: pathlib.Path) -> Iterator[Api]:
    """A daemon of the test's own: each test here changes an app, a token or the repository
    (the tests that only read share one daemon: test_api_reads)."""
    with serving(repo, daemons, tmp_path) as a:
        yield a


def _ok(a: Api) -> bool:
    try:
        return len(a.call("GET", "/apps", token=a.admin_token).json()["apps"]) == 3
    except (requests.RequestException, ValueError, KeyError):
        return False


def curl(a: Api, line: str) -> Any:
    """Run a line of the reference verbatim, with $API and $TOKEN set."""
    out = subprocess.run(["bash", "-c", line], env={**os.environ, "API": a.url, "TOKEN": a.token},
                         capture_output=True, text=True, check=True, timeout=60)
    return json.loads(out.stdout)


def test_reference_curl_lines(api: Api, docker_client: docker.DockerClient) -> None:
    listed = curl(api, 'curl -s $API/apps -H "authorization: Bearer $TOKEN"')
    assert sorted(a["name"] for a in listed["apps"]) == ["ticker", "web"]  # org default only
    for app in listed["apps"]:
        assert {"id", "name", "image", "domain", "port", "status", "container_id", "created_at"} <= set(app)
        assert (app["status"], app["health"]) == ("running", "healthy")
    web = next(a for a in listed["apps"] if a["name"] == "web")
    ticker = next(a for a in listed["apps"] if a["name"] == "ticker")

    details = curl(api, f'curl -s $API/apps/{web["id"]} -H "authorization: Bearer $TOKEN"')
    assert details["app"]["id"] == web["id"]
    assert details["deployments"][0]["status"] == "running"
    assert "webhook" in details

    wait_for(lambda: len(api.call("GET", f"/apps/{ticker['id']}/logs?tail=5").json()["lines"]) == 5, 10, "ticks")
    logs = curl(api, f'curl -s "$API/apps/{ticker["id"]}/logs?tail=500" -H "authorization: Bearer $TOKEN"')
    assert logs["tail"] == 500 and 1 <= len(logs["lines"]) <= 500
    assert all(line["service"] == "main" and line["line"].startswith("tick ") for line in logs["lines"])
    stamps = [line["timestamp"] for line in logs["lines"]]
    assert stamps == sorted(stamps)

    before = web["container_id"]
    restarted = curl(api, f'curl -s -X POST $API/apps/{web["id"]}/restart -H "authorization: Bearer $TOKEN"')
    assert restarted["action"] == "restart" and restarted["changed"] is True
    wait_for(lambda: api.app(web["id"])["app"]["container_id"] not in (None, before), 10, "a new container")
    api.wait_status(web["id"], "running")
    dep = next(d for d in api.app(web["id"])["deployments"] if d["id"] == restarted["deployment_id"])
    assert (dep["trigger"], dep["status"], dep["commit"]) == ("api", "running", restarted["commit"])

    stopped = curl(api, f'curl -s -X POST $API/apps/{web["id"]}/stop -H "authorization: Bearer $TOKEN"')
    assert stopped["action"] == "stop"
    api.wait_status(web["id"], "stopped")
    web_container = next(c for c in owned(docker_client, api.daemon.owner) if c["Labels"]["io.cynchrod.app"] == "web")
    assert web_container["State"] == "exited"

    deleted = curl(api, f'curl -s -X DELETE $API/apps/{web["id"]} -H "authorization: Bearer $TOKEN"')
    assert deleted["action"] == "delete"
    api.wait_status(web["id"], "removed")
    left = sorted(c["Labels"]["io.cynchrod.app"] for c in owned(docker_client, api.daemon.owner))
    assert left == ["theirs", "ticker"]
    assert api.app(web["id"])["app"]["status"] == "removed"  # soft-deleted, still queryable
    assert all(a["name"] != "web" for a in api.call("GET", "/apps").json()["apps"])


def test_each_imperative_call_is_one_commit(api: Api, docker_client: docker.DockerClient) -> None:
    web = api.app_id("web")
    expected = ["tester <tester@localhost>|change"]
    for action, status, method in [("stop", "stopped", "POST"), ("start", "running", "POST"),
                                   ("restart", "running", "POST"), ("", "removed", "DELETE")]:
        path = f"/apps/{web}/{action}" if action else f"/apps/{web}"
        response = api.call(method, path, check=f"/apps/{{appId}}/{action}" if action else "/apps/{appId}")
        assert response.status_code == 202, response.text
        body = response.json()
        assert body["commit"] and body["deployment_id"]
        expected.insert(0, f"cynchrod <cynchrod@localhost>|{action or 'delete'} default/web (by alice)")
        assert api.fresh_log() == expected
        api.wait_status(web, status)
        containers = {c["Labels"]["io.cynchrod.app"]: c["State"] for c in owned(docker_client, api.daemon.owner)}
        assert containers.get("web") == {"stopped": "exited", "running": "running", "removed": None}[status]
    # Starting a running app commits nothing: no empty commits.
    ticker = api.app_id("ticker")
    response = api.call("POST", f"/apps/{ticker}/start", check="/apps/{appId}/start")
    assert response.status_code == 200 and response.json()["changed"] is False
    assert len(api.fresh_log()) == len(expected)


def test_comments_survive_a_commit_back(api: Api) -> None:
    assert api.call("POST", f"/apps/{api.app_id('web')}/stop").status_code == 202
    assert api.fresh_file("apps/web.yaml") == COMMENTED + "state: stopped\n"


def test_commit_back_racing_an_external_push(api: Api) -> None:
    """Someone pushes while the daemon commits: both changes survive, nothing is forced."""
    web = api.app_id("web")
    errors: list[BaseException] = []

    def external() -> None:
        try:
            for i in range(8):
                api.repo.push({f"notes/{i}.txt": f"note {i}\n"}, f"external {i}")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=external)
    thread.start()
    for action in ("stop", "start", "stop", "start"):
        assert api.call("POST", f"/apps/{web}/{action}").status_code == 202
    thread.join()
    assert not errors
    log = api.fresh_log()
    assert sum(1 for line in log if line.endswith("default/web (by alice)")) == 4
    assert sum(1 for line in log if "|external " in line) == 8
    for i in range(8):
        assert api.fresh_file(f"notes/{i}.txt") == f"note {i}\n"


def test_auth_errors_and_revocation(api: Api) -> None:
    assert api.call("GET", "/apps", headers={"Authorization": ""}).status_code == 401
    assert api.call("GET", "/apps", token="cyn_nope").json()["error"] == "unauthorized"
    assert api.call("GET", "/apps", headers={"AUTHORIZATION": f"bearer {api.token}"}).status_code == 200
    ticker = api.app_id("ticker")
    ws = websocket(
        api.url.replace("http://", "ws://") + f"/apps/{ticker}/logs/stream?token={api.token}")
    assert json.loads(ws.receive(timeout=5))[0]["line"].startswith("tick ")
    listed = cli("token", "list", "--state", str(api.state)).stdout
    assert "alice" in listed and api.token not in listed
    assert cli("token", "revoke", "alice", "--state", str(api.state)).returncode == 0
    assert api.call("GET", "/apps").status_code == 401
    started = time.monotonic()
    with pytest.raises(simple_websocket.ConnectionClosed) as closed:
        while time.monotonic() - started < 10:
            ws.receive(timeout=1)
    assert closed.value.reason == 4401
    assert time.monotonic() - started < 5


def _stalled_websocket(url: str) -> socket.socket:
    """A WebSocket client that does the handshake and then reads nothing, with a small receive buffer."""
    parsed = urllib.parse.urlsplit(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((parsed.hostname, parsed.port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET {parsed.path}?{parsed.query} HTTP/1.1\r\nHost: {parsed.netloc}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def _read_messages(sock: socket.socket, seconds: float,
                   until: Callable[[list[list[dict[str, Any]]]], bool] = lambda _: False) -> list[list[dict[str, Any]]]:
    """The text messages (JSON arrays) a raw client reads in ``seconds``, or until ``until`` says
    they are enough (server frames: never masked)."""
    sock.settimeout(seconds)
    buf, messages, deadline = b"", [], time.monotonic() + seconds
    with contextlib.suppress(TimeoutError):
        while time.monotonic() < deadline and not until(messages):
            buf += sock.recv(1 << 20)
            while len(buf) >= 2:
                size, at = buf[1] & 0x7F, 2
                if size == 126:
                    size, at = int.from_bytes(buf[2:4], "big"), 4
                elif size == 127:
                    size, at = int.from_bytes(buf[2:10], "big"), 10
                if len(buf) < at + size:
                    break
                if buf[0] & 0x0F == 1:
                    messages.append(json.loads(buf[at:at + size]))
                buf = buf[at + size:]
    return messages


def test_a_client_that_stops_reading_loses_lines_alone(api: Api) -> None:
    """Messages are written to each client's socket by the hub while the client keeps up; a
    client that stops reading fills its socket, then its own queue, and loses its oldest lines
    (told so by a ``dropped`` notice) while a client beside it gets every line, in order."""
    flood = ("[sh, -c, 'i=0; while :; do echo \"line $i " + "x" * 200 + "\"; i=$((i+1));"
             " [ $((i % 50)) = 0 ] && sleep 0.01; done']")
    api.repo.push({"apps/flood.yaml": f"name: flood\nimage: {TEST_IMAGE}\ncommand: {flood}\nmemory: 64\n"})
    wait_for(lambda: any(a["name"] == "flood" for a in api.call("GET", "/apps").json()["apps"]), 30, "flood declared")
    flood_id = api.app_id("flood")
    api.wait_status(flood_id, "running", 30)
    url = api.url.replace("http://", "ws://") + f"/apps/{flood_id}/logs/stream?token={api.token}"
    stalled = _stalled_websocket(url)
    reader = websocket(url)
    # The stalled client holds at most what its server-side socket takes (loopback's send buffer
    # grows to tcp_wmem's maximum), its own 4 KiB and its queue; the lines past those are what it
    # must lose. Lines are over 200 bytes of JSON, so this many since it joined are more than it holds
    # (CI: a time bound of 8 s let a loaded runner's slower flood stay inside them, and no line was lost).
    send_buffer = int(pathlib.Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    past_what_it_holds = (send_buffer + (1 << 20)) // 200 + QUEUE_LINES
    numbers: list[int] = []
    told: list[str] = []  # what the reader is told it lost: nothing, as it keeps up
    deadline = time.monotonic() + 120
    while len(numbers) < past_what_it_holds:
        assert time.monotonic() < deadline, len(numbers)
        message = reader.receive(timeout=1)
        if message is not None:
            for line in json.loads(message):
                if line.get("dropped"):
                    told.append(f"after {numbers[-1] if numbers else None}: {line['line']}")
                else:
                    numbers.append(int(line["line"].split()[1]))
    reader.close()
    assert (told, breaks(numbers)) == ([], [])  # every line, once, in order
    # What its socket holds, then its queue, which begins with the notice of what it lost.
    later = [line for message in _read_messages(stalled, 30, until=lambda got: any(
        line.get("dropped") for message in got for line in message)) for line in message]
    stalled.close()
    notices = [line for line in later if line.get("dropped")]
    assert notices and all(n["service"] == "" and "lines dropped" in n["line"] for n in notices), later[:3]
    kept = [int(line["line"].split()[1]) for line in later if not line.get("dropped")]
    assert kept and not breaks(kept, gaps=False), breaks(kept, gaps=False)  # what it kept is in order, once


def test_a_stream_gives_each_line_once_across_a_log_rotation(api: Api, docker_client: docker.DockerClient) -> None:
    """16 MB of lines, so json-file rotates (at 10 MB) under the follower. The engine then sent
    up to thousands of lines a second time (and ends the follow at times: the stream opened
    again lost a line, asking for lines one microsecond past the last timestamp given, which
    lines read together share). Every line comes once, in order."""
    writer = ("[sh, -c, 'x=$(printf %1000s | tr \" \" x); while [ ! -e /go ]; do sleep 0.1; done; i=0;"
              " while [ $i -lt 16000 ]; do echo \"line $i $x\"; i=$((i+1)); done; sleep 3600']")
    api.repo.push({"apps/writer.yaml": f"name: writer\nimage: {TEST_IMAGE}\ncommand: {writer}\nmemory: 64\n"})
    wait_for(lambda: any(a["name"] == "writer" for a in api.call("GET", "/apps").json()["apps"]), 30, "declared")
    writer_id = api.app_id("writer")
    api.wait_status(writer_id, "running", 30)
    ws = websocket(api.url.replace("http://", "ws://") + f"/apps/{writer_id}/logs/stream?token={api.token}")
    container = next(c for c in owned(docker_client, api.daemon.owner) if c["Labels"]["io.cynchrod.app"] == "writer")
    time.sleep(1)  # the stream follows the container (it may open a moment after the socket): lines since then
    docker_client.api.exec_start(docker_client.api.exec_create(container["Id"], ["touch", "/go"]))
    numbers: list[int] = []
    deadline = time.monotonic() + 60
    while (not numbers or numbers[-1] < 15999) and time.monotonic() < deadline:
        message = ws.receive(timeout=1)
        if message is not None:
            lines = json.loads(message)
            assert not any(line.get("dropped") for line in lines)
            numbers += [int(line["line"].split()[1]) for line in lines]
    ws.close()
    assert (numbers[:1], numbers[-1:], breaks(numbers)) == ([0], [15999], [])


def test_create_from_json_and_yaml_and_quota(api: Api) -> None:
    created = api.call("POST", "/apps", json={"name": "made", "image": TEST_IMAGE, "command": ["sleep", "3600"],
                                               "memory": 64}, check="/apps")
    assert created.status_code == 202, created.text
    body = created.json()
    assert body["app"]["status"] in ("queued", "deploying", "running")
    api.wait_status(body["app"]["id"], "running")
    assert api.fresh_file("apps/default/made.yaml") is not None
    yaml_body = f"name: yamlmade\nimage: {TEST_IMAGE}\nstate: stopped\n"
    response = api.call("POST", "/apps", data=yaml_body, headers={"Content-Type": "application/yaml"})
    assert response.status_code == 202, response.text
    bad = api.call("POST", "/apps", json={"name": "bad", "image": TEST_IMAGE, "cpu": 99}, check="/apps")
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_manifest"
    assert bad.json()["errors"] == ["body:1: out_of_range: cpu: 99 is greater than the maximum of 8"]
    # The lines are the body's as sent, JSON or YAML, not the generated file's.
    pretty = json.dumps({"name": "bad", "image": TEST_IMAGE, "cpu": 99, "memory": 1}, indent=2)
    bad = api.call("POST", "/apps", data=pretty, headers={"Content-Type": "application/json"})
    assert bad.json()["errors"] == ["body:4: out_of_range: cpu: 99 is greater than the maximum of 8",
                                    "body:5: out_of_range: memory: 1 is less than the minimum of 64 (memory is in MB)"]
    bad = api.call("POST", "/apps", data=f"# mine\nname: bad\n\nimage: {TEST_IMAGE}\nbogus: 1\n",
                   headers={"Content-Type": "application/yaml"})
    assert bad.json()["errors"] == ["body:5: unknown_key: bogus is not a known key"]
    dup = api.call("POST", "/apps", json={"name": "made", "image": TEST_IMAGE}, check="/apps")
    assert (dup.status_code, dup.json()["error"]) == (409, "app_exists")
    other = api.call("POST", "/apps", json={"name": "x", "org": "other", "image": TEST_IMAGE}, check="/apps")
    assert (other.status_code, other.json()["error"]) == (403, "forbidden")
    # default org has web, ticker, made, yamlmade: six more stopped apps reach the cap of 10.
    for i in range(6):
        ok = api.call("POST", "/apps", json={"name": f"q{i}", "image": TEST_IMAGE, "state": "stopped"})
        assert ok.status_code == 202, ok.text
    over = api.call("POST", "/apps", json={"name": "q6", "image": TEST_IMAGE, "state": "stopped"}, check="/apps")
    assert (over.status_code, over.json()["error"]) == (403, "quota_exceeded")
    assert api.call("POST", "/apps", data="{not json", headers={"Content-Type": "application/json"}).json()[
        "error"] == "invalid_body"


def test_a_commit_that_cannot_be_pushed_fails_and_changes_nothing(api: Api,
                                                                 docker_client: docker.DockerClient) -> None:
    web = api.app_id("web")
    before = api.app(web)
    api.repo.bare.rename(api.repo.bare.with_suffix(".gone"))
    response = api.call("POST", f"/apps/{web}/stop")
    assert (response.status_code, response.json()["error"]) == (503, "source_unavailable")
    after = api.app(web)
    assert after["app"]["status"] == "running" and after["deployments"] == before["deployments"]
    states = {c["Labels"]["io.cynchrod.app"]: c["State"] for c in owned(docker_client, api.daemon.owner)}
    assert states["web"] == "running"


def test_secrets_api_sets_and_never_reveals(api: Api) -> None:
    value = "pa55-w0rd-never-shown"
    response = api.call("PUT", "/orgs/default/secrets/db-password", data=value.encode(),
                        check="/orgs/{org}/secrets/{name}")
    assert response.status_code == 200 and value not in response.text
    as_json = api.call("PUT", "/orgs/default/secrets/other", json={"value": value}, check="/orgs/{org}/secrets/{name}")
    assert as_json.status_code == 200
    listed = api.call("GET", "/orgs/default/secrets", check="/orgs/{org}/secrets")
    assert [s["name"] for s in listed.json()["secrets"]] == ["db-password", "other"]
    assert value not in listed.text
    assert api.call("GET", "/orgs/default/secrets", token=api.other_token).status_code == 404
    assert api.call("PUT", "/orgs/default/secrets/x", data=b"v", token=api.other_token).status_code == 404
    bad = api.call("PUT", "/orgs/default/secrets/..%2Fx", data=b"v")
    assert bad.status_code in (400, 404)
    # An app that uses it gets it as a file.
    created = api.call("POST", "/apps", json={"name": "usesecret", "image": TEST_IMAGE, "memory": 64,
                                               "command": ["sleep", "3600"], "secrets": ["db-password"]})
    assert created.status_code == 202, created.text
    api.wait_status(created.json()["app"]["id"], "running")
    details = api.app(created.json()["app"]["id"])
    assert value not in json.dumps(details)
    deleted = api.call("DELETE", "/orgs/default/secrets/other", check="/orgs/{org}/secrets/{name}")
    assert deleted.status_code == 200
    assert api.call("DELETE", "/orgs/default/secrets/other").status_code == 404
    assert value not in api.daemon.output()


def test_concurrent_creates_at_the_cap(api: Api) -> None:
    """20 creates at once with room for 8 (cap 10, web and ticker exist) leave exactly 10 apps."""
    results: list[int] = []
    lock = threading.Lock()

    def create(i: int) -> None:
        response = api.call("POST", "/apps", json={"name": f"c{i:02d}", "image": TEST_IMAGE, "state": "stopped"})
        with lock:
            results.append(response.status_code)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [202] * 8 + [403] * 12
    apps = api.call("GET", "/apps").json()["apps"]
    assert len(apps) == 10
    assert sum(1 for line in api.fresh_log() if line.split("|")[1].startswith("create ")) == 8


def test_rollback_restores_the_previous_successful_version(api: Api, docker_client: docker.DockerClient) -> None:
    web = api.app_id("web")
    api.repo.push({"apps/web.yaml": COMMENTED.replace(TEST_IMAGE, "cynchrod-test/busybox:2")}, "v2")
    api.call("POST", f"/apps/{web}/restart")  # wakes a pass; v2 (and the restart) deploy
    wait_for(lambda: api.app(web)["app"]["image"] == "cynchrod-test/busybox:2", 20, "v2")
    api.wait_status(web, "running")
    response = api.call("POST", f"/apps/{web}/rollback", check="/apps/{appId}/rollback")
    assert response.status_code == 202, response.text
    assert response.json()["action"].startswith("rollback to deployment ")
    wait_for(lambda: api.app(web)["app"]["image"] == TEST_IMAGE, 20, "v1 again")
    api.wait_status(web, "running")
    container = next(c for c in owned(docker_client, api.daemon.owner) if c["Labels"]["io.cynchrod.app"] == "web")
    assert docker_client.api.inspect_container(container["Id"])["Config"]["Image"] == TEST_IMAGE
    assert api.fresh_log()[0].startswith("cynchrod <cynchrod@localhost>|rollback to deployment ")
    assert api.fresh_file("apps/web.yaml") == COMMENTED  # byte for byte, comments and all
    unknown = api.call("POST", f"/apps/{web}/rollback", json={"deployment_id": 999999})
    assert (unknown.status_code, unknown.json()["error"]) == (404, "not_found")


def test_repo_app_webhook_rebuilds(api: Api, tmp_path: pathlib.Path, docker_client: docker.DockerClient) -> None:
    import hashlib
    import hmac
    import shutil

    from tests.integration.test_builds import DOCKERFILE

    (tmp_path / "src").mkdir()
    src = GitRepo(tmp_path / "src")
    shutil.copy("/bin/busybox", src.work / "busybox")
    git("add", "busybox", cwd=src.work)
    src.push({"Dockerfile": DOCKERFILE, "www/index.html": "v1\n"}, "v1")
    created = api.call("POST", "/apps", json={"name": "site", "build": {"repo": src.url}, "port": 8080,
                                               "memory": 64}, check="/apps")
    assert created.status_code == 202, created.text
    app_id, secret = created.json()["app"]["id"], created.json()["webhook"]["secret"]
    assert created.json()["webhook"]["url"].endswith(f"/webhooks/apps/{app_id}")
    api.wait_status(app_id, "running", 60)
    details = api.call("GET", f"/apps/{app_id}", check="/apps/{appId}")
    assert details.json()["webhook"] == {"url": created.json()["webhook"]["url"], "configured": True}
    assert secret not in details.text
    first = details.json()["deployments"][0]
    build_log = api.call("GET", f"/apps/{app_id}/deployments/{first['id']}/log",
                         check="/apps/{appId}/deployments/{deploymentId}/log")
    assert any(line.startswith("# built cynchrod/default-site:") for line in build_log.json()["lines"])

    after = src.push({"www/index.html": "v2\n"}, "v2")
    body = json.dumps({"ref": "refs/heads/main", "after": after}).encode()
    wrong = requests.post(f"{api.url}/webhooks/apps/{app_id}", data=body, timeout=10,
                          headers={"X-Hub-Signature-256": "sha256=" + "0" * 64})
    assert wrong.status_code == 401
    signature = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    started = time.monotonic()
    hooked = requests.post(f"{api.url}/webhooks/apps/{app_id}", data=body, timeout=10,
                           headers={"X-Hub-Signature-256": signature, "X-GitHub-Event": "push"})
    assert hooked.status_code == 202, hooked.text
    wait_for(lambda: api.app(app_id)["app"]["image"].endswith(after[:12]), 30, "the rebuilt image")
    api.wait_status(app_id, "running")
    assert time.monotonic() - started < 30
    assert api.app(app_id)["deployments"][0]["trigger"] == "build"
    port = api.app(app_id)["app"]["host_port"]
    assert requests.get(f"http://127.0.0.1:{port}/", timeout=5).text == "v2\n"
    assert secret not in api.daemon.output()
    # Someone else's app, and an app that is not a repo app, have no webhook.
    assert requests.post(f"{api.url}/webhooks/apps/{api.app_id('web')}", data=body, timeout=10).status_code == 404


def test_replies_show_the_state_the_call_leads_to(api: Api) -> None:
    web = api.app_id("web")
    stopped = api.call("POST", f"/apps/{web}/stop", check="/apps/{appId}/stop").json()
    assert stopped["app"]["status"] in ("queued", "deploying"), stopped  # not the "running" from before
    deployment = next(d for d in api.app(web)["deployments"] if d["id"] == stopped["deployment_id"])
    assert deployment["trigger"] == "api"
    api.wait_status(web, "stopped")
    # Restarting a stopped app would silently undo nothing: it is refused, pointing at start.
    refused = api.call("POST", f"/apps/{web}/restart", check="/apps/{appId}/restart")
    assert (refused.status_code, refused.json()["error"]) == (409, "app_stopped")
    assert f"/apps/{web}/start" in refused.json()["message"] and "cynchrod start default/web" in refused.json()[
        "message"]
    assert api.fresh_log()[0].endswith("|stop default/web (by alice)")  # nothing committed
    started = api.call("POST", f"/apps/{web}/start", check="/apps/{appId}/start").json()
    assert started["app"]["status"] in ("queued", "deploying") and started["deployment_id"]
    api.wait_status(web, "running")
    restarted = api.call("POST", f"/apps/{web}/restart", check="/apps/{appId}/restart")
    assert restarted.status_code == 202 and restarted.json()["app"]["status"] in ("queued", "deploying")


def test_rollback_skips_a_stopped_manifest(api: Api) -> None:
    """v2, stop, start, rollback: the default target is the last manifest that ran and differs (v1),
    never the stopped one (which is the newest that differs byte for byte)."""
    web = api.app_id("web")
    api.repo.push({"apps/web.yaml": COMMENTED.replace(TEST_IMAGE, "cynchrod-test/busybox:2")}, "v2")
    api.call("POST", f"/apps/{web}/restart")  # wakes a pass; v2 (and the restart) deploy
    # v2 deployed and running (not only its row updated): it is a manifest that ran.
    wait_for(lambda: (api.app(web)["app"]["image"], api.app(web)["deployments"][0]["status"]) == (
        "cynchrod-test/busybox:2", "running"), 20, "v2")
    for action, status in (("stop", "stopped"), ("start", "running")):
        assert api.call("POST", f"/apps/{web}/{action}").status_code == 202
        api.wait_status(web, status)
    response = api.call("POST", f"/apps/{web}/rollback", check="/apps/{appId}/rollback")
    assert response.status_code == 202, response.text
    assert api.fresh_file("apps/web.yaml") == COMMENTED  # the first version, which ran
    wait_for(lambda: next(d for d in api.app(web)["deployments"] if d["id"] == response.json()["deployment_id"])[
        "status"] == "running", 20, "the rollback to run")
    details = api.call("GET", f"/apps/{web}", check="/apps/{appId}").json()
    assert (details["app"]["status"], details["app"]["image"]) == ("running", TEST_IMAGE)
    assert details["deployments"][0]["trigger"] == "rollback"
    # Nothing else ran: going back again finds v2+restart, not the stopped manifest.
    again = api.call("POST", f"/apps/{web}/rollback")
    assert again.status_code == 202 and "state: stopped" not in (api.fresh_file("apps/web.yaml") or "")


def test_lookup_by_org_and_name(api: Api) -> None:
    web = api.app_id("web")
    found = api.call("GET", "/apps/by-name/default/web", check="/apps/by-name/{org}/{name}")
    assert found.status_code == 200 and found.json()["app"]["id"] == web
    assert found.json()["deployments"] == api.call("GET", f"/apps/{web}").json()["deployments"]
    for path in ("/apps/by-name/other/theirs", "/apps/by-name/default/nope"):
        missing = api.call("GET", path, check="/apps/by-name/{org}/{name}")
        assert (missing.status_code, missing.json()["error"]) == (404, "not_found")
    assert api.call("GET", "/apps/by-name/other/theirs", token=api.other_token).status_code == 200
    assert api.call("DELETE", f"/apps/{web}").status_code == 202
    api.wait_status(web, "removed")
    gone = api.call("GET", "/apps/by-name/default/web").json()
    assert (gone["app"]["id"], gone["app"]["status"]) == (web, "removed")


def test_deleting_the_last_app_is_applied(api: Api, docker_client: docker.DockerClient) -> None:
    ids = [api.app_id(name) for name in ("web", "ticker", "theirs")]
    for app_id in ids:
        assert api.call("DELETE", f"/apps/{app_id}", token=api.admin_token).status_code == 202
    assert api.fresh_file("apps/.keep") == ""  # apps/ stays, so the last removal is not "source_empty"
    for app_id in ids:
        api.wait_status(app_id, "removed")
    assert owned(docker_client, api.daemon.owner) == []


def test_the_live_stream_follows_the_app_through_a_restart(api: Api) -> None:
    """It used to end with ``1000 stream_ended`` when the container stopped; now it
    follows the app to its new container and ends only when the app is deleted."""
    ticker = api.app_id("ticker")
    ticket = api.call("POST", f"/apps/{ticker}/logs/ticket").json()["ticket"]
    ws = websocket(api.url.replace("http://", "ws://") + f"/apps/{ticker}/logs/stream?ticket={ticket}")
    try:
        json.loads(ws.receive(timeout=10))
        before = api.call("GET", f"/apps/{ticker}").json()["app"]["container_id"]
        assert api.call("POST", f"/apps/{ticker}/restart").status_code == 202
        wait_for(lambda: api.call("GET", f"/apps/{ticker}").json()["app"]["container_id"] != before, 30,
                 "the restart to make a new container")
        restarted = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            batch = json.loads(ws.receive(timeout=5))  # each message is a list of lines
            if any(line["timestamp"][:19] > restarted for line in batch):
                break  # a line from the new container, on the same stream
        else:
            raise AssertionError("no line from the restarted container")
    finally:
        ws.close()


def test_broken_files_that_declare_no_app_are_listed_to_whom_they_concern(api: Api) -> None:
    """A new file with a YAML error is a problem of the desired state: ``GET /apps`` lists it (scoped
    to the org the file declares), ``/healthz`` names it and stays 200, ``cynchrod apps`` shows a row.
    A refused new version of a running app is ``failed`` with ``serving: previous``."""
    web = api.app_id("web")
    api.repo.push({"apps/new.yaml": "name: [fresh\n",  # no org: key: the default org's
                   "apps/theirs-new.yaml": "org: other\nname: x\nimage: [i\n",
                   "apps/whose.yaml": "org: [nobody\n",  # which org cannot be read: admin tokens only
                   "apps/web.yaml": COMMENTED.replace("memory: 64", "memory: 64MB")})

    def problems(token: str) -> list[dict[str, Any]]:
        listed = api.call("GET", "/apps", token=token, check="/apps")
        assert listed.status_code == 200
        return list(listed.json()["problems"])

    wait_for(lambda: len(problems(api.admin_token)) == 3, 30, "three broken files listed")
    assert problems(api.admin_token) == [
        {"path": "apps/new.yaml", "line": 2, "code": "yaml_syntax", "org": "default",
         "message": "expected ',' or ']', but got '<stream end>'"},
        {"path": "apps/theirs-new.yaml", "line": 4, "code": "yaml_syntax", "org": "other",
         "message": "expected ',' or ']', but got '<stream end>'"},
        {"path": "apps/whose.yaml", "line": 2, "code": "yaml_syntax", "org": None,
         "message": "expected ',' or ']', but got '<stream end>'"},
    ]
    assert [p["path"] for p in problems(api.token)] == ["apps/new.yaml"]
    assert [p["path"] for p in problems(api.other_token)] == ["apps/theirs-new.yaml"]
    # The web app's file is its own error, not a problem: failed, and its last good spec serves.
    api.wait_status(web, "failed")
    app = api.call("GET", f"/apps/{web}", check="/apps/{appId}").json()["app"]
    assert app["serving"] == "previous"
    assert app["last_error"] == "apps/web.yaml:9: invalid_type: memory is in MB: write 64, not '64MB'"

    health = requests.get(api.url + "/healthz", timeout=5)
    check_schema("/healthz", "GET", health)
    assert health.status_code == 200 and health.json()["status"] == "ok"  # the daemon itself is healthy
    assert [(p["code"], p.get("path"), p.get("line")) for p in health.json()["problems"]] == [
        ("yaml_syntax", "apps/new.yaml", 2), ("yaml_syntax", "apps/theirs-new.yaml", 4),
        ("yaml_syntax", "apps/whose.yaml", 2)]
    assert all("stream end" not in p["message"] for p in health.json()["problems"])  # no file text unsigned-in

    env = {"CYNCHROD_API": api.url, "CYNCHROD_TOKEN": api.token}
    out = cli("apps", env=env)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[1]: line for line in out.stdout.splitlines()[1:]}
    assert rows["apps/new.yaml"].split()[0] == "-"
    assert "apps/new.yaml:2: yaml_syntax: expected ',' or ']'" in rows["apps/new.yaml"]
    assert "failed — previous version running" in rows["default/web"]
    assert "apps/theirs-new.yaml" not in out.stdout and "apps/whose.yaml" not in out.stdout
    status = cli("status", "default/web", env=env)
    assert "status:     failed — previous version running" in status.stdout.splitlines()

    api.repo.push({"apps/new.yaml": None, "apps/theirs-new.yaml": None, "apps/whose.yaml": None,
                   "apps/web.yaml": COMMENTED})
    wait_for(lambda: problems(api.admin_token) == [], 30, "the problems to clear")
    api.wait_status(web, "running")
    assert api.app(web)["app"]["serving"] is None
    assert requests.get(api.url + "/healthz", timeout=5).json()["problems"] == []


def test_a_crashed_deployment_keeps_its_last_lines_after_the_container_is_gone(
        api: Api, docker_client: docker.DockerClient) -> None:
    """Health-gated deploys (docs/health.md): a unit that exits before it is ready makes its deployment
    ``crashed`` with the exit code; its last lines are served from the deployment after the container goes."""
    api.repo.push({"apps/boom.yaml": f"name: boom\nimage: {TEST_IMAGE}\nmemory: 64\nmin_ready: 5\n"
                                     "command: [sh, -c, 'echo cannot reach the database; exit 4']\n"})
    wait_for(lambda: any(a["name"] == "boom" for a in api.call("GET", "/apps").json()["apps"]), 20, "boom's row")
    app_id = api.app_id("boom")

    def crashed() -> dict[str, Any] | None:
        return next((d for d in api.app(app_id)["deployments"] if d["status"] == "crashed"), None)

    wait_for(crashed, 30, "a crashed deployment")
    deployment = crashed()
    assert deployment is not None and deployment["error_code"] == "crashed"
    assert deployment["error"] == "service main exited with code 4"
    for container in owned(docker_client, api.daemon.owner):
        if container["Labels"].get("io.cynchrod.app") == "boom":
            docker_client.api.remove_container(container["Id"], force=True)
    answer = api.call("GET", f"/apps/{app_id}/deployments/{deployment['id']}/log",
                      check="/apps/{appId}/deployments/{deploymentId}/log")
    assert answer.status_code == 200 and "cannot reach the database" in answer.json()["unit_lines"]
    listed = next(a for a in api.call("GET", "/apps", check="/apps").json()["apps"] if a["name"] == "boom")
    assert listed["health"] in ("degraded", "progressing")  # failed, or healed again meanwhile
