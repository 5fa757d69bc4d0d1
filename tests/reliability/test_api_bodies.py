"""Bodies and parameters an attacker or an unlucky client sends to ``POST /apps`` and friends (real daemon).

Issue 13, items 3 and 9: an aliased YAML body is refused (not expanded), deep
JSON or YAML is a 400 (not a 500), a chunked body over 1 MiB is a 413 (not cut
and parsed), ``tail=²`` is a 400, non-finite numbers are refused in JSON and
YAML alike, and an edit of a file whose path Git cannot write is a 409.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator

import docker
import pygit2
import pytest
import requests

from tests.conftest import shared_daemons
from tests.helpers import TEST_IMAGE, Daemon, GitRepo, new_token, wait_for

LAUGHS = (
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
    "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
    "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\ng: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n"
    "name: laughs\nimage: x\nenv: {A: *g}\n"
)


class Client:
    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token

    def post(self, path: str, data: bytes | Iterator[bytes] | str, content_type: str) -> requests.Response:
        return requests.post(self.url + path, data=data, timeout=60,
                             headers={"Authorization": f"Bearer {self.token}", "Content-Type": content_type})

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, headers={"Authorization": f"Bearer {self.token}"}, timeout=60)


def serving(repo: GitRepo, make: Callable[..., Daemon], state: pathlib.Path) -> Client:
    """A daemon running one app, web, and a client with a token of its org."""
    token = new_token(state, "default", "t")
    repo.push({"apps/web.yaml": f"name: web\nimage: {TEST_IMAGE}\ncommand: [sleep, '3600']\nmemory: 64\n"})
    daemon = make(interval=300).start()
    c = Client(daemon.api, token.strip())

    def web_running() -> bool:
        try:
            apps = c.get("/apps").json()["apps"]
        except (requests.RequestException, ValueError):
            return False
        return any(a["name"] == "web" and a["status"] == "running" for a in apps)

    wait_for(web_running, 30, "web to run")
    return c


@pytest.fixture(scope="module")
def client(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           docker_client: docker.DockerClient, images: object) -> Iterator[Client]:
    """One daemon for the tests whose calls are all refused (they change nothing): starting one costs seconds."""
    with shared_daemons(request, tmp_path_factory, docker_client) as (repo, root, make):
        yield serving(repo, make, root / "state")


@pytest.fixture
def own_client(repo: GitRepo, daemons: Callable[..., Daemon], tmp_path: pathlib.Path) -> Client:
    """A daemon of the test's own, for a test that changes the repository or the app."""
    return serving(repo, daemons, tmp_path / "state")


def test_bodies_are_bounded_and_checked(client: Client) -> None:
    # Aliases: refused before anything is expanded.
    r = client.post("/apps", LAUGHS, "application/yaml")
    assert r.status_code == 400 and r.json()["error"] == "invalid_body" and "alias" in r.json()["message"], r.text
    # Deep JSON and deep YAML: 400, not 500.
    r = client.post("/apps", '{"name": "deep", "image": "x", "env": ' + "[" * 100000 + "]" * 100000 + "}",
                    "application/json")
    assert r.status_code == 400 and r.json()["error"] == "invalid_body", r.text
    r = client.post("/apps", "name: deep\nimage: x\nenv: " + "[" * 100000 + "\n", "application/yaml")
    assert r.status_code == 400 and r.json()["error"] == "invalid_body", r.text
    # A chunked body over 1 MiB: 413, not cut at 1 MiB and parsed.
    head = f'{{"name": "chunky", "image": "{TEST_IMAGE}", "env": {{"A": "'.encode()

    def chunks() -> Iterator[bytes]:
        yield head
        for _ in range(9):
            yield b"x" * (128 * 1024)
        yield b'"}}'

    r = client.post("/apps", chunks(), "application/json")
    assert r.status_code == 413 and r.json()["error"] == "body_too_large", r.text
    # Non-finite and too-small numbers, JSON and YAML alike.
    for body, kind in ((f'{{"name": "n1", "image": "{TEST_IMAGE}", "cpu": NaN}}', "application/json"),
                       (f'{{"name": "n2", "image": "{TEST_IMAGE}", "cpu": Infinity}}', "application/json"),
                       (f'{{"name": "n3", "image": "{TEST_IMAGE}", "cpu": 1e400}}', "application/json"),
                       (f"name: n4\nimage: {TEST_IMAGE}\ncpu: .nan\n", "application/yaml"),
                       (f"name: n5\nimage: {TEST_IMAGE}\nhealthcheck: {{test: x, interval: .inf}}\n",
                        "application/yaml"),
                       (f'{{"name": "n6", "image": "{TEST_IMAGE}", "cpu": 0.0000000001}}', "application/json")):
        r = client.post("/apps", body, kind)
        assert r.status_code == 400 and r.json()["error"] in ("invalid_body", "invalid_manifest"), (body, r.text)
    r = client.post("/apps", f"name: n4\nimage: {TEST_IMAGE}\ncpu: .nan\n", "application/yaml")
    assert "out_of_range" in r.text
    assert all(a["name"] == "web" for a in client.get("/apps").json()["apps"])  # nothing was created
    # tail: ASCII digits only.
    web = client.get("/apps").json()["apps"][0]["id"]
    for tail in ("²", "١٢", "1²", "+5", " 5", "5 "):
        r = client.get(f"/apps/{web}/logs?tail={tail}")
        assert r.status_code == 400 and r.json()["error"] == "invalid_tail", (tail, r.text)
        r = client.get(f"/apps/{web}/deployments/1/log?tail={tail}")
        assert r.status_code == 400 and r.json()["error"] == "invalid_tail", (tail, r.text)
    assert client.get(f"/apps/{web}/logs?tail=5").status_code == 200


def test_an_edit_git_cannot_write_is_a_conflict(own_client: Client, repo: GitRepo) -> None:
    """A committer can push apps/.git/x.yaml as raw objects; no index can hold that path."""
    bare = pygit2.Repository(str(repo.bare))
    head = bare.references["refs/heads/main"].peel(pygit2.Commit)
    blob = bare.create_blob(f"name: odd\nimage: {TEST_IMAGE}\ncommand: [sleep, '3600']\nmemory: 64\n".encode())

    def raw_tree(entries: list[tuple[bytes, bytes, pygit2.Oid]]) -> pygit2.Oid:
        body = b"".join(mode + b" " + name + b"\0" + oid.raw for mode, name, oid in sorted(entries,
                                                                                            key=lambda e: e[1]))
        return bare.odb.write(pygit2.enums.ObjectType.TREE, body)

    dot_git = raw_tree([(b"100644", b"odd.yaml", blob)])
    apps = head.tree["apps"]
    new_apps = raw_tree([*((b"100644", e.name.encode(), e.id) for e in apps), (b"40000", b".git", dot_git)])
    root = raw_tree([(b"40000", b"apps", new_apps)])
    sig = pygit2.Signature("t", "t@localhost")
    bare.create_commit("refs/heads/main", sig, sig, "odd path", root, [head.id])
    r = requests.post(own_client.url + "/webhooks/git", timeout=10)  # no secret: 404; the pass comes from the API
    assert r.status_code == 404

    def odd_app() -> str | None:
        apps_now = own_client.get("/apps").json()["apps"]
        return next((a["id"] for a in apps_now if a["name"] == "odd" and a["status"] == "running"), None)

    web = own_client.get("/apps").json()["apps"][0]["id"]
    own_client.post(f"/apps/{web}/restart", b"", "application/json")  # wakes a pass that reads the new commit
    wait_for(odd_app, 30, "odd to run")
    r = own_client.post(f"/apps/{odd_app()}/stop", b"", "application/json")
    assert r.status_code == 409 and r.json()["error"] == "path_unwritable", r.text
    assert "apps/.git/odd.yaml" in r.json()["message"]


def test_deleting_the_last_app_is_applied(own_client: Client) -> None:
    """Found by schemathesis: deleting the only app removed apps/ too, which reads as source_empty
    (never pruned), so the app was never removed."""
    web = own_client.get("/apps").json()["apps"][0]["id"]
    r = requests.delete(f"{own_client.url}/apps/{web}", headers={"Authorization": f"Bearer {own_client.token}"},
                        timeout=30)
    assert r.status_code == 202, r.text

    def removed() -> bool:
        apps = own_client.get("/apps?include_removed=true").json()["apps"]
        return any(a["id"] == web and a["status"] == "removed" for a in apps)

    wait_for(removed, 30, "web to be removed")


def _raw(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """``request`` sent as it is (no client library would send a line or headers this large)."""
    import socket
    import urllib.parse

    parsed = urllib.parse.urlsplit(url)
    data = b""
    for _ in range(5):  # the server answers and closes before reading it all: a reset may eat the answer
        with socket.create_connection((parsed.hostname, parsed.port), timeout=30) as conn:
            try:
                conn.sendall(request)
                conn.shutdown(socket.SHUT_WR)
                while chunk := conn.recv(65536):
                    data += chunk
            except ConnectionResetError:
                pass
        if b"\r\n\r\n" in data:
            break
        data = b""
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def test_the_front_server_answers_json_too(client: Client) -> None:
    """Issue 19: gunicorn's own refusals (before Flask sees the request) were HTML pages with
    statuses the document did not list; now JSON with a code, like every other error."""
    import json

    auth = f"Authorization: Bearer {client.token}\r\n".encode()
    cases = {
        "uri_too_long": b"GET /apps?x=" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n",
        "headers_too_large": b"GET /apps HTTP/1.1\r\nHost: x\r\n" + auth + b"X-Big: " + b"a" * 8200 + b"\r\n\r\n",
        "too_many_headers": b"GET /apps HTTP/1.1\r\nHost: x\r\n" + auth
                            + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n",
        "bad_request": b"GET /apps HTTP/1.1\r\nHost: x\r\n" + auth + b"Bad Header: 1\r\n\r\n",
    }
    expected = {"uri_too_long": (414, "uri_too_long"), "headers_too_large": (431, "headers_too_large"),
                "too_many_headers": (431, "headers_too_large"), "bad_request": (400, "bad_request")}
    for case, request in cases.items():
        status, headers, body = _raw(client.url, request)
        assert (status, headers.get("content-type")) == (expected[case][0], "application/json"), (case, body[:300])
        answer = json.loads(body)
        assert answer["error"] == expected[case][1] and answer["message"], (case, answer)
    # The document lists them on every operation.
    document = json.loads((pathlib.Path(__file__).resolve().parents[2] / "cynchrod" / "api" / "openapi.json")
                          .read_text())
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in ("get", "post", "put", "delete", "patch"):
                assert {"400", "414", "431"} <= set(operation["responses"]), (method, path)


def test_a_body_is_checked_before_the_app(client: Client) -> None:
    """Found by schemathesis: a body of one NUL byte was answered with the app's state (409)."""
    web = client.get("/apps").json()["apps"][0]["id"]
    for body in (b"\x00", b"[1]", b'{"deployment_id": "x"}', b"\x00\x00 \n"):
        r = client.post(f"/apps/{web}/rollback", body, "application/json")
        assert r.status_code == 400 and r.json()["error"] == "invalid_body", (body, r.text)
    r = client.post("/apps/app_nope/rollback", b"\x00", "application/json")
    assert r.status_code == 400 and r.json()["error"] == "invalid_body", r.text


def test_a_volume_over_the_root_is_refused_before_any_commit(client: Client) -> None:
    """Issue 24, item 6: ``volumes: ["data:/"]`` was accepted (202) and failed at run time with the
    engine's ``invalid mount config``; now it is a manifest error with its body line and reason."""
    body = f"name: rooted\nimage: {TEST_IMAGE}\nmemory: 64\nvolumes:\n  - data:/\n  - conf:/etc\n"
    r = client.post("/apps", body, "application/yaml")
    assert (r.status_code, r.json()["error"]) == (400, "invalid_manifest"), r.text
    assert r.json()["errors"] == [
        "body:5: invalid_mount: volumes[0]: '/': a volume cannot be mounted over the container's whole filesystem",
        "body:6: invalid_mount: volumes[1]: '/etc': a volume over a system directory would hide the image's own "
        "files (mount a folder below it)"]
    assert "rooted" not in [a["name"] for a in client.get("/apps").json()["apps"]]
