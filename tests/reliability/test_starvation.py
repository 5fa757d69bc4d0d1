"""The API cannot be starved (issue 13 item 7): slow-header clients and a hung Docker
take neither the workers nor ``/healthz``.

Real daemon (two API worker processes beside the reconciler), dockerd and git; the
hung engine is the Docker-socket proxy's ``hang()``.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import hmac
import json
import pathlib
import socket
import threading
import time

import docker
import requests

from tests.helpers import GitRepo, manifest, new_token, owned, wait_for
from tests.reliability.dockerproxy import DockerProxy

SECRET = "starvation-webhook-secret"


def _up(api: str) -> bool:
    try:
        return requests.get(api + "/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _timed(call: object) -> float:
    start = time.monotonic()
    call()  # type: ignore[operator]
    return time.monotonic() - start


def _webhook(api: str) -> requests.Response:
    body = json.dumps({"ref": "refs/heads/main"}).encode()
    signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return requests.post(api + "/webhooks/git", data=body, timeout=5, headers={
        "X-Cynchrod-Event": "push", "X-Cynchrod-Signature": f"sha256={signature}"})


def test_slow_header_clients_take_nothing(repo: GitRepo, daemons, tmp_path: pathlib.Path,
                                          docker_client: docker.DockerClient, owner: str) -> None:
    state = tmp_path / "state"
    token = new_token(state, "default", "t")
    repo.push({"apps/a.yaml": manifest("a")})
    daemon = daemons(interval=300, env={"CYNCHROD_WORKERS": "2", "CYNCHROD_WEBHOOK_SECRET": SECRET}).start()
    wait_for(lambda: _up(daemon.api), 30, "the API")
    wait_for(lambda: [c["State"] for c in owned(docker_client, owner)] == ["running"], 30, "a to run")

    # A few dozen connections that send a request line and then one header byte a second, forever.
    stop = threading.Event()
    slow: list[socket.socket] = []
    closed_by_server: list[float] = []

    def drip(conn: socket.socket, opened: float) -> None:
        try:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            while not stop.is_set():
                conn.sendall(b"X")
                if stop.wait(1.0):
                    return
        except OSError:
            closed_by_server.append(time.monotonic() - opened)

    threads = []
    for _ in range(48):
        conn = socket.create_connection(("127.0.0.1", daemon.port))
        slow.append(conn)
        thread = threading.Thread(target=drip, args=(conn, time.monotonic()), daemon=True)
        thread.start()
        threads.append(thread)
    try:
        time.sleep(1.0)  # every slow connection is open and holding whatever it can
        headers = {"Authorization": f"Bearer {token}"}
        for _ in range(5):
            assert _timed(lambda: requests.get(daemon.api + "/healthz", timeout=5).raise_for_status()) < 1.0
            assert _timed(lambda: requests.get(daemon.api + "/apps", headers=headers,
                                               timeout=5).raise_for_status()) < 1.0
            assert _timed(lambda: _webhook(daemon.api).raise_for_status()) < 1.0
        # The server hangs up on a client that never finishes its headers (HEADER_TIMEOUT_S, 5 s).
        wait_for(lambda: len(closed_by_server) == len(slow), 15, "the slow clients to be cut off")
        assert max(closed_by_server) < 10
    finally:
        stop.set()
        for conn in slow:
            conn.close()
        for thread in threads:
            thread.join(5)
    assert daemon.stop() == 0


def test_a_hung_docker_holds_no_worker(repo: GitRepo, daemons, tmp_path: pathlib.Path, owner: str,
                                       docker_client: docker.DockerClient) -> None:
    proxy = DockerProxy(tmp_path / "docker.sock")
    state = tmp_path / "state"
    token = new_token(state, "default", "t")
    headers = {"Authorization": f"Bearer {token}"}
    try:
        repo.push({"apps/a.yaml": manifest("a")})
        daemon = daemons(interval=300, env={"DOCKER_HOST": f"unix://{proxy.path}", "CYNCHROD_WORKERS": "2"}).start()
        wait_for(lambda: [c["State"] for c in owned(docker_client, owner)] == ["running"], 30, "a to run")
        wait_for(lambda: _up(daemon.api), 30, "the API")
        wait_for(lambda: requests.get(daemon.api + "/apps", headers=headers, timeout=2).json()["apps"], 15, "a row")
        app_id = requests.get(daemon.api + "/apps", headers=headers, timeout=5).json()["apps"][0]["id"]
        assert requests.get(f"{daemon.api}/apps/{app_id}/logs", headers=headers, timeout=5).status_code == 200
        proxy.hang()

        def tail() -> tuple[int, float]:
            start = time.monotonic()
            response = requests.get(f"{daemon.api}/apps/{app_id}/logs", headers=headers, timeout=30)
            return response.status_code, time.monotonic() - start

        ws_url = daemon.api.replace("http://", "ws://") + f"/apps/{app_id}/logs/stream?token={token}"
        from cynchrod.cli.client import websocket

        streams = [websocket(ws_url) for _ in range(8)]  # follow a hung engine: each waits, none blocks
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            calls = [pool.submit(tail) for _ in range(64)]  # more than any thread pool the API had
            time.sleep(0.5)
            for _ in range(5):
                assert _timed(lambda: requests.get(daemon.api + "/healthz", timeout=5)) < 1.0
                assert _timed(lambda: requests.get(daemon.api + "/apps", headers=headers,
                                                   timeout=5).raise_for_status()) < 1.0
            results = [c.result() for c in calls]
        # Every tail ends with an error within the engine-call deadline (5 s) plus queueing, none hangs.
        assert all(status in (502, 503) for status, _ in results), results
        assert max(took for _, took in results) < 15, results
        for ws in streams:
            ws.close()
        proxy.up()
        assert requests.get(f"{daemon.api}/apps/{app_id}/logs", headers=headers, timeout=10).status_code == 200
        assert daemon.stop() == 0
    finally:
        proxy.close()


def _tree(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in pathlib.Path(f"/proc/{current}/task").iterdir():
            children = (task / "children").read_text().split()
            todo.extend(int(c) for c in children)
    return found


def _usage(pid: int) -> tuple[int, int]:
    """Open fds and native threads of the daemon's processes (the reconciler, the API master, its workers)."""
    fds = threads = 0
    for p in _tree(pid):
        fds += len(list(pathlib.Path(f"/proc/{p}/fd").iterdir()))
        threads += len(list(pathlib.Path(f"/proc/{p}/task").iterdir()))
    return fds, threads


def test_a_thousand_log_streams_leave_nothing_behind(repo: GitRepo, daemons, tmp_path: pathlib.Path,
                                                     docker_client: docker.DockerClient, owner: str) -> None:
    from cynchrod.cli.client import websocket

    state = tmp_path / "state"
    token = new_token(state, "default", "t")
    headers = {"Authorization": f"Bearer {token}"}
    repo.push({"apps/a.yaml": manifest("a", command="[sh, -c, 'while true; do echo tick; sleep 0.05; done']")})
    daemon = daemons(interval=300, env={"CYNCHROD_WORKERS": "2"}).start()
    wait_for(lambda: _up(daemon.api), 30, "the API")
    wait_for(lambda: requests.get(daemon.api + "/apps", headers=headers, timeout=2).json()["apps"], 30, "a row")
    app_id = requests.get(daemon.api + "/apps", headers=headers, timeout=5).json()["apps"][0]["id"]
    wait_for(lambda: requests.get(f"{daemon.api}/apps/{app_id}", headers=headers,
                                  timeout=5).json()["app"]["status"] == "running", 30, "a to run")
    url = daemon.api.replace("http://", "ws://") + f"/apps/{app_id}/logs/stream?token={token}"

    def one(read: bool) -> None:
        ws = websocket(url)
        try:
            if read:
                assert json.loads(ws.receive(timeout=10))[0]["line"] == "tick"
        finally:
            ws.close()

    assert daemon.proc is not None
    for _ in range(2):  # warm: each worker's pools and hubs made once
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(one, [True] * 16))
    base_fds, base_threads = _usage(daemon.proc.pid)
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        list(pool.map(one, [i % 10 == 0 for i in range(1000)]))
    settled = {}

    def back() -> bool:
        settled["now"] = _usage(daemon.proc.pid)  # type: ignore[union-attr]
        fds, threads = settled["now"]
        return fds <= base_fds and threads <= base_threads

    wait_for(back, 20, f"fds and threads back to {base_fds}, {base_threads} (now {settled.get('now')})")
    assert daemon.stop() == 0
