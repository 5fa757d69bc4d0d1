"""The API's reading calls against one shared `cynchrod serve`, a real dockerd and a bare Git repo.

Starting a daemon and its three apps costs seconds; the tests here only read (and what they
open, they close), so the module shares one, made as test_api's ``api`` fixture makes its
own. A test that changes an app, a token or the repository belongs in test_api.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import docker
import jsonschema
import pytest
import requests
import simple_websocket

from cynchrod.cli.client import websocket
from tests.conftest import shared_daemons
from tests.e2e.test_api import _REGISTRY, OPENAPI, Api, check_schema, serving
from tests.helpers import breaks, wait_for


@pytest.fixture(scope="module")
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
        docker_client: docker.DockerClient, images: object) -> Iterator[Api]:
    with shared_daemons(request, tmp_path_factory, docker_client) as (repo, root, make), \
            serving(repo, make, root) as a:
        yield a


def test_org_isolation_on_every_endpoint(api: Api) -> None:
    theirs = api.app_id("theirs")
    calls = [("GET", f"/apps/{theirs}"), ("GET", f"/apps/{theirs}/logs"), ("POST", f"/apps/{theirs}/logs/ticket"),
             ("POST", f"/apps/{theirs}/restart"), ("POST", f"/apps/{theirs}/stop"),
             ("POST", f"/apps/{theirs}/start"), ("DELETE", f"/apps/{theirs}")]
    missing = api.call("GET", "/apps/app_000000000000")
    for method, path in calls:
        response = api.call(method, path)
        assert response.status_code == 404, (method, path)
        assert response.json() == {"error": "not_found", "message": response.json()["message"]}
        assert response.json()["error"] == missing.json()["error"]
    ws_url = api.url.replace("http://", "ws://") + f"/apps/{theirs}/logs/stream?token={api.token}"
    with pytest.raises(simple_websocket.ConnectionClosed) as closed:
        ws = websocket(ws_url)
        ws.receive(timeout=5)
    assert closed.value.reason == 4404
    # The owner's token does see it; an admin token sees every org.
    assert api.call("GET", f"/apps/{theirs}", token=api.other_token).status_code == 200
    assert sorted(a["name"] for a in api.call("GET", "/apps", token=api.admin_token).json()["apps"]) == [
        "theirs", "ticker", "web"]
    assert len(api.fresh_log()) == 1  # nothing was committed


def test_websocket_streams_lines_written_after_connecting(api: Api) -> None:
    ticker = api.app_id("ticker")
    ticket = api.call("POST", f"/apps/{ticker}/logs/ticket", check="/apps/{appId}/logs/ticket").json()["ticket"]
    base = api.url.replace("http://", "ws://") + f"/apps/{ticker}/logs/stream"
    connected = time.time()
    ws = websocket(f"{base}?ticket={ticket}")
    received: list[dict[str, Any]] = []
    while len(received) < 5:
        message = json.loads(ws.receive(timeout=5))  # a JSON array of lines
        assert isinstance(message, list) and message
        received += message
    ws.close()
    numbers = [int(m["line"].split()[1]) for m in received]
    assert numbers == list(range(numbers[0], numbers[0] + 5))  # in order, none lost
    validator = jsonschema.Draft202012Validator({"$ref": "urn:openapi#/components/schemas/LogLine"},
                                                registry=_REGISTRY)
    for message in received:
        validator.validate(message)
        assert message["timestamp"][:19] >= time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(connected - 1))
    # A ticket is single-use.
    with pytest.raises(simple_websocket.ConnectionClosed) as closed:
        again = websocket(f"{base}?ticket={ticket}")
        again.receive(timeout=5)
    assert closed.value.reason == 4401


def test_a_stream_is_the_same_to_clients_with_and_without_compression(api: Api) -> None:
    """Each message is framed once for all of a worker's clients, and compressed once (with a
    fresh context) for those that negotiated permessage-deflate: both kinds of client, side by
    side, read the same lines, whole and in order, across many messages (a message compressed
    against a context the client does not have would not decode)."""
    from wsproto.events import AcceptConnection, Request
    from wsproto.extensions import PerMessageDeflate
    from wsproto.frame_protocol import Opcode

    class Counting(PerMessageDeflate):
        """Counts the text frames that came compressed (RSV1 set) and those that did not. The
        client's reader thread decodes frames ahead of ``receive()``: it may count more."""

        compressed = plain = 0

        def frame_inbound_header(self, proto: Any, opcode: Any, rsv: Any, payload_length: int) -> Any:
            if rsv.rsv1:
                Counting.compressed += 1
            elif opcode is Opcode.TEXT:
                Counting.plain += 1
            return super().frame_inbound_header(proto, opcode, rsv, payload_length)

    class Deflating(simple_websocket.Client):  # type: ignore[misc]
        """simple-websocket's client (which offers no extension) offering permessage-deflate, as browsers do."""

        def handshake(self) -> None:
            self.sock.send(self.ws.send(Request(host=self.host, target=self.path, extensions=[Counting()])))
            events: list[Any] = []
            while not events:
                self.ws.receive_data(self.sock.recv(self.receive_bytes))
                events = list(self.ws.events())
            assert isinstance(events[0], AcceptConnection)
            self.connected = True

    ticker = api.app_id("ticker")
    url = api.url.replace("http://", "ws://") + f"/apps/{ticker}/logs/stream?token={api.token}"
    clients = {"plain": websocket(url), "deflate": Deflating.connect(url)}
    assert [type(e) for e in clients["deflate"].ws.connection._proto.extensions] == [Counting]
    assert clients["plain"].ws.connection._proto.extensions == []
    got: dict[str, list[str]] = {"plain": [], "deflate": []}
    messages = {"plain": 0, "deflate": 0}
    deadline = time.monotonic() + 30
    while min(len(lines) for lines in got.values()) < 12 and time.monotonic() < deadline:
        for kind, ws in clients.items():
            message = ws.receive(timeout=0.2)
            if message is not None:
                messages[kind] += 1
                got[kind] += [line["line"] for line in json.loads(message)]
    for ws in clients.values():
        ws.close()
    assert min(messages.values()) >= 3, messages
    # Every message came compressed to it (and the frames read ahead of receive() too).
    assert (Counting.plain, Counting.compressed >= messages["deflate"]) == (0, True), Counting.compressed
    for lines in got.values():
        numbers = [int(line.split()[1]) for line in lines]
        assert not breaks(numbers), breaks(numbers)
    common = set(got["plain"]) & set(got["deflate"])
    assert len(common) >= 8, got


def test_tail_bounds_and_validation(api: Api) -> None:
    ticker = api.app_id("ticker")
    for bad in ("0", "2001", "abc", "-5", "1.5"):
        response = api.call("GET", f"/apps/{ticker}/logs?tail={bad}", check="/apps/{appId}/logs")
        assert (response.status_code, response.json()["error"]) == (400, "invalid_tail")
    wait_for(lambda: len(api.call("GET", f"/apps/{ticker}/logs?tail=3").json()["lines"]) == 3, 10, "3 lines")
    default = api.call("GET", f"/apps/{ticker}/logs", check="/apps/{appId}/logs").json()
    assert default["tail"] == 200


def test_meta_endpoints(api: Api) -> None:
    health = requests.get(api.url + "/healthz", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    check_schema("/healthz", "GET", health)
    text = requests.get(api.url + "/metrics", timeout=5).text
    for name in ("cynchrod_passes_total", "cynchrod_pass_duration_seconds_bucket", "cynchrod_actions_total",
                 'cynchrod_apps{status="running"} 3.0', "cynchrod_api_requests_total"):
        assert name in text, name
    document = requests.get(api.url + "/openapi.json", timeout=5).json()
    assert document["openapi"] == "3.1.0" and document == OPENAPI
    listed = api.call("GET", "/apps", check="/apps")
    assert listed.status_code == 200
    details = api.call("GET", f"/apps/{api.app_id('web')}", check="/apps/{appId}")
    assert details.status_code == 200


def _relay_sockets(address: str) -> tuple[int, int]:
    """(listening, accepted) Unix sockets bound to ``address`` (abstract: ``@`` in /proc/net/unix)."""
    listening = accepted = 0
    for row in pathlib.Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = row.split()
        if len(fields) >= 8 and fields[7] == "@" + address[1:]:
            if int(fields[3], 16) & 0x10000:  # __SO_ACCEPTCON: a listener
                listening += 1
            else:
                accepted += 1
    return listening, accepted


def _workers_with_clients(daemon_pid: int, port: int) -> int:
    """How many of the daemon's processes hold an established TCP connection on ``port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in pathlib.Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":  # ESTABLISHED
                inodes.add(fields[9])
    holders, todo = 0, [daemon_pid]
    while todo:
        pid = todo.pop()
        for task in pathlib.Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo.extend(int(c) for c in (task / "children").read_text().split())
        with contextlib.suppress(OSError):
            links = [os.readlink(fd) for fd in pathlib.Path(f"/proc/{pid}/fd").iterdir()]
            holders += any(link[len("socket:["):-1] in inodes for link in links if link.startswith("socket:["))
    return holders


def test_clients_in_every_worker_share_one_engine_follower(api: Api) -> None:
    """Eight clients of one app, spread over the API workers, are fed by one engine follower:
    one worker leads (it holds the app's relay socket), the others read from it; every client
    gets every line in order, the others keep theirs when some leave, and nothing is left
    once they all have."""
    from cynchrod.api.logs import relay_address

    ticker = api.app_id("ticker")
    address = relay_address(api.state, ("default", "ticker"))
    url = api.url.replace("http://", "ws://") + f"/apps/{ticker}/logs/stream?token={api.token}"
    # The daemon is shared: the streams of the tests before this one end with their last client.
    wait_for(lambda: _relay_sockets(address) == (0, 0), 15, "the relays of earlier streams to close")
    clients = [websocket(url) for _ in range(8)]

    def numbers(ws: Any, count: int) -> list[int]:
        got: list[int] = []
        while len(got) < count:
            message = ws.receive(timeout=30)
            assert message is not None, "no line for 30 s"
            got += [int(m["line"].split()[1]) for m in json.loads(message)]
        return got

    try:
        for ws in clients:
            got = numbers(ws, 3)
            assert not breaks(got), breaks(got)  # in order, none lost
        assert api.daemon.proc is not None
        holders = _workers_with_clients(api.daemon.proc.pid, int(api.url.rsplit(":", 1)[1]))
        assert holders >= 1
        # One leader; each other worker with a client reads from it.
        assert _relay_sockets(address) == (1, holders - 1)
        for ws in clients[:4]:
            ws.close()
        for ws in clients[4:]:
            try:
                got = numbers(ws, 3)
            except simple_websocket.ConnectionClosed as exc:
                raise AssertionError(f"closed: {exc.reason} {exc.message}") from exc
            assert not breaks(got), breaks(got)
    finally:
        for ws in clients:
            if ws.connected:
                ws.close()
    wait_for(lambda: _relay_sockets(address) == (0, 0), 15, "the relay to close with its last client")
