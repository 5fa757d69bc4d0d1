"""Notifications and commit statuses against real parts: a real engine and git repository (the
harness's reconciler), the store's outbox, and real HTTP receivers on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import http.server
import json
import pathlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cynchrod import store
from cynchrod.core import notices
from cynchrod.desired import config
from cynchrod.shell import notify
from tests.conftest import Harness
from tests.helpers import GitRepo, free_port, manifest, wait_for

SECRET = "a-notify-secret-of-some-length"


class Receiver:
    """A threaded HTTP server on 127.0.0.1 that records each POST (path, headers, body)."""

    def __init__(self, port: int = 0, *, status: int = 200, delay: float = 0.0) -> None:
        self.got: list[tuple[str, dict[str, str], bytes]] = []
        self.status, self.delay = status, delay
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                time.sleep(outer.delay)
                outer.got.append((self.path, dict(self.headers.items()), body))
                self.send_response(outer.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


class Clock:
    """The notifier's clock, moved by the test: back-off runs out when the test says so."""

    def __init__(self) -> None:
        # Ahead of the wall clock, which stamps new messages: they are due at once.
        self.now = time.time() + 3600

    def __call__(self) -> float:
        return self.now


def settings(**kw: Any) -> config.Settings:
    kw.setdefault("delivery", config.Delivery(backoff_s=0.05, max_backoff_s=0.2, attempts=5, timeout_s=2))
    return config.Settings(**kw)


def notifier(db: store.Store, cfg: config.Settings) -> notify.Notifier:
    return notify.Notifier(db, notify.Targets(lambda: cfg), poll_s=0.05)


def settle(n: notify.Notifier, db: store.Store, *, timeout: float = 10) -> None:
    """Steps until no message is queued (sent or dead)."""
    def done() -> bool:
        n.drain()
        return db.notification_counts()["queued"] == 0
    wait_for(done, timeout, "the outbox to empty")


def test_a_failure_is_told_once_signed_and_its_recovery_once(harness: Harness, repo: GitRepo,
                                                              receiver: Receiver) -> None:
    target = config.NotifyTarget(kind="webhook", url=receiver.url + "/hook", secret=SECRET)
    cfg = settings(notify=(target,), public_url="https://cd.example.com")
    n = notifier(harness.db, cfg)
    repo.push({"apps/a.yaml": manifest("a", extra="secrets: [pw]\n")})
    for _ in range(3):  # the same failure, pass after pass
        harness.sync()
        settle(n, harness.db)
    assert len(receiver.got) == 1, receiver.got
    path, headers, body = receiver.got[0]
    assert path == "/hook"
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Cynchrod-Signature-256"], expected)
    event = json.loads(body)
    app = harness.app("a")
    assert (event["event"], event["org"], event["app"], event["status"], event["code"]) == (
        notices.SECRET_MISSING, "default", "a", "failed", "secret_missing")
    assert event["url"] == f"https://cd.example.com/ui/apps/{app.id}"
    assert headers["X-Cynchrod-Event"] == "secret_missing"

    harness.secrets.set("default", "pw", b"x")
    harness.sync()
    harness.sync()
    settle(n, harness.db)
    assert [json.loads(b)["event"] for _, _, b in receiver.got] == ["secret_missing", "recovered"]
    assert harness.app("a").status == "running"


def expected_forge(kind: str, sha: str) -> tuple[str, str, str, dict[str, str]]:
    """(path, auth header, auth value, state field -> each state) per forge's documented API."""
    if kind == "github":
        return (f"/repos/acme/apps/statuses/{sha}", "Authorization", "Bearer tok",
                {"pending": "pending", "success": "success"})
    if kind == "gitea":
        return (f"/api/v1/repos/acme/apps/statuses/{sha}", "Authorization", "token tok",
                {"pending": "pending", "success": "success"})
    if kind == "gitlab":
        return (f"/api/v4/projects/acme%2Fapps/statuses/{sha}", "Private-Token", "tok",
                {"pending": "running", "success": "success"})
    return (f"/2.0/repositories/acme/apps/commit/{sha}/statuses/build", "Authorization", "Bearer tok",
            {"pending": "INPROGRESS", "success": "SUCCESSFUL"})


@pytest.mark.parametrize("kind", ["github", "gitea", "gitlab", "bitbucket"])
def test_commit_statuses_in_each_forges_shape(kind: str, harness: Harness, repo: GitRepo,
                                              receiver: Receiver) -> None:
    base = {"github": "", "gitea": "/api/v1", "gitlab": "/api/v4", "bitbucket": "/2.0"}[kind]
    forge = config.Forge(kind=kind, api_url=receiver.url + base, repository="acme/apps", token="tok")
    cfg = settings(forge=forge, public_url="https://cd.example.com")
    n = notifier(harness.db, cfg)
    sha = repo.push({"apps/a.yaml": manifest("a")})
    harness.sync()
    settle(n, harness.db)
    harness.sync()  # nothing changes: nothing more is posted
    settle(n, harness.db)
    path, auth, value, words = expected_forge(kind, sha)
    app = harness.app("a")
    assert [p for p, _, _ in receiver.got] == [path, path]
    bodies = [json.loads(b) for _, _, b in receiver.got]
    for (_, headers, _), body, state in zip(receiver.got, bodies, ("pending", "success"), strict=True):
        assert {k.lower(): v for k, v in headers.items()}[auth.lower()] == value
        assert body["state"] == words[state]
        if kind == "bitbucket":
            assert (body["key"], body["name"], body["url"]) == (
                "cynchrod/default/a", "cynchrod/default/a", f"https://cd.example.com/ui/apps/{app.id}")
        else:
            assert body["context" if kind in ("github", "gitea") else "name"] == "cynchrod/default/a"
            assert body["target_url"] == f"https://cd.example.com/ui/apps/{app.id}"


def test_a_failed_deployment_is_a_failure_with_its_code(harness: Harness, repo: GitRepo,
                                                        receiver: Receiver) -> None:
    forge = config.Forge(kind="github", api_url=receiver.url, repository="acme/apps", token="tok")
    n = notifier(harness.db, settings(forge=forge))
    sha = repo.push({"apps/a.yaml": manifest("a", extra="secrets: [pw]\n")})
    harness.sync()
    harness.sync()
    settle(n, harness.db)
    bodies = [json.loads(b) for _, _, b in receiver.got]
    assert [(b["state"], b["description"]) for b in bodies] == [("failure", "failed: secret_missing")]
    assert receiver.got[0][0] == f"/repos/acme/apps/statuses/{sha}"


def test_apprise_json_to_a_local_receiver(harness: Harness, repo: GitRepo, receiver: Receiver) -> None:
    target = config.NotifyTarget(kind="apprise", url=f"json://127.0.0.1:{receiver.port}/chat",
                                 route=notices.Route(on=(notices.SECRET_MISSING,)))
    other = config.NotifyTarget(kind="webhook", url=receiver.url + "/only-recovered",
                                route=notices.Route(on=(notices.RECOVERED,)))
    n = notifier(harness.db, settings(notify=(target, other)))
    repo.push({"apps/a.yaml": manifest("a", extra="secrets: [pw]\n")})
    harness.sync()
    settle(n, harness.db)
    assert [p for p, _, _ in receiver.got] == ["/chat"]
    sent = json.loads(receiver.got[0][2])
    assert "default/a" in sent["title"] and "secret_missing" in sent["message"]


def test_a_receiver_down_then_back_and_a_restart_between(harness: Harness, repo: GitRepo,
                                                         tmp_path: pathlib.Path) -> None:
    port = free_port()  # nothing listens yet
    target = config.NotifyTarget(kind="webhook", url=f"http://127.0.0.1:{port}/hook")
    cfg = settings(notify=(target,), delivery=config.Delivery(backoff_s=0.05, max_backoff_s=0.1, attempts=1000,
                                                              timeout_s=1))
    clock = Clock()
    n = notify.Notifier(harness.db, notify.Targets(lambda: cfg), clock=clock)
    repo.push({"apps/a.yaml": manifest("a", extra="secrets: [pw]\n")})
    harness.sync()
    for _ in range(3):
        n.drain()
        clock.now += 1  # past the back-off (0.05, 0.1, 0.1 ... s): the next try is due
    [queued] = harness.db.notifications()
    assert queued.status == "queued" and queued.attempts >= 2 and queued.last_error

    # "Restart": a new store connection and a new notifier on the same state file.
    again = store.Store(harness.state / "cynchrod.db")
    try:
        back = Receiver(port)
        try:
            clock.now += 1
            settle(notify.Notifier(again, notify.Targets(lambda: cfg), clock=clock), again)
            assert len(back.got) == 1
            [sent] = again.notifications()
            assert sent.status == "sent" and sent.attempts > queued.attempts
        finally:
            back.close()
    finally:
        again.close()


def test_dead_after_its_attempts_and_counted(harness: Harness, repo: GitRepo) -> None:
    failing = Receiver(status=500)
    try:
        target = config.NotifyTarget(kind="webhook", url=failing.url + "/hook")
        n = notifier(harness.db, settings(notify=(target,), delivery=config.Delivery(
            backoff_s=0.01, max_backoff_s=0.02, attempts=3, timeout_s=1)))
        repo.push({"apps/a.yaml": manifest("a", extra="secrets: [pw]\n")})
        harness.sync()
        settle(n, harness.db)
        [dead] = harness.db.notifications(status="dead")
        assert (dead.attempts, dead.last_error) == (3, "HTTP 500")
        assert len(failing.got) == 3
        counts = harness.db.notification_counts()
        assert (counts["dead"], counts["failed"], counts["queued"]) == (1, 3, 0)
    finally:
        failing.close()


def test_a_slow_receiver_does_not_slow_a_pass(harness: Harness, repo: GitRepo) -> None:
    slow = Receiver(delay=3)
    stop = threading.Event()
    try:
        target = config.NotifyTarget(kind="webhook", url=slow.url + "/hook")
        n = notifier(harness.db, settings(notify=(target,), delivery=config.Delivery(timeout_s=10)))
        n.start(stop)
        repo.push({"apps/a.yaml": manifest("a", extra="secrets: [pw]\n"), "apps/b.yaml": manifest("b")})
        first = harness.sync()
        wait_for(lambda: harness.db.notifications() and not slow.got, 5, "a delivery under way")
        harness.secrets.set("default", "pw", b"x")
        started = time.perf_counter()
        second = harness.sync()
        took = time.perf_counter() - started
        # Well under the 10 s the hung delivery holds its connection: the pass did not wait for it
        # (not a tighter bound: a loaded CI machine stretches a pass that recreates a container).
        assert took < 7, f"a pass took {took:.2f}s while a delivery hung"
        assert first.duration_s < 7
        assert {a.name: a.status for a in second.apps}["a"] == "running"
        wait_for(lambda: len(slow.got) == 2, 15, "both deliveries")
    finally:
        stop.set()
        slow.close()


def test_an_old_state_dir_gets_the_outbox(tmp_path: pathlib.Path) -> None:
    """A state dir from before notifications: its tables are made, and its apps' changes recorded."""
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(store.SCHEMA.split("CREATE TABLE IF NOT EXISTS status_changes")[0])
    old.execute("INSERT INTO apps (id, org, name, status, created_at, updated_at) VALUES"
                " ('app_1', 'default', 'a', 'running', 'x', 'x')")
    old.commit()
    old.close()
    db = store.Store(path)
    try:
        assert db.notification_counts()["queued"] == 0
        db.update_app("app_1", status="failed", last_error="crash_loop: it keeps dying")
        cfg = settings(notify=(config.NotifyTarget(kind="webhook", url="http://127.0.0.1:9/x"),))
        assert db.take_changes(notify.Targets(lambda: cfg).turn) == 1
        [queued] = db.notifications()
        assert (queued.event, json.loads(queued.body)["code"]) == ("failed", "crash_loop")
    finally:
        db.close()


def test_an_idle_notifier_writes_nothing(tmp_path: pathlib.Path) -> None:
    db = store.Store(tmp_path / "cynchrod.db")
    watcher = sqlite3.connect(tmp_path / "cynchrod.db")
    try:
        n = notifier(db, settings(notify=(config.NotifyTarget(kind="webhook", url="http://127.0.0.1:9/x"),)))
        before = watcher.execute("PRAGMA data_version").fetchone()[0]
        for _ in range(5):
            n.drain()
        assert watcher.execute("PRAGMA data_version").fetchone()[0] == before
    finally:
        watcher.close()
        db.close()


def test_a_message_whose_target_left_the_config_is_dead(tmp_path: pathlib.Path) -> None:
    db = store.Store(tmp_path / "cynchrod.db")
    try:
        with db.transaction() as raw:
            raw.execute("INSERT INTO apps (id, org, name, status, created_at, updated_at) VALUES"
                        " ('app_1', 'default', 'a', 'running', 'x', 'x')")
        down = config.NotifyTarget(kind="webhook", url=f"http://127.0.0.1:{free_port()}/x")
        current = [settings(notify=(down,))]
        clock = Clock()
        n = notify.Notifier(db, notify.Targets(lambda: current[0]), poll_s=0.05, clock=clock)
        db.update_app("app_1", status="failed", last_error="start_failed: boom")
        n.drain()
        [queued] = db.notifications()
        assert (queued.status, queued.attempts) == ("queued", 1)
        current[0] = settings()  # a reloaded config without that target
        n.drain()
        assert db.notifications()[0].status == "queued"  # its back-off is not over
        clock.now += 1
        n.drain()
        [dead] = db.notifications()
        assert (dead.status, dead.last_error) == ("dead", "the target is no longer configured")
    finally:
        db.close()


def test_an_image_update_committed_is_told_once(tmp_path: pathlib.Path, receiver: Receiver) -> None:
    """The updates checker records its bump in ``image_updates``; the store turns that into an
    ``update_committed`` event (a trigger, as for status changes), told once per bump, with the
    versions in ``message``; a re-check that changes nothing else tells nothing again."""
    db = store.Store(tmp_path / "cynchrod.db")
    try:
        with db.transaction() as raw:
            raw.execute("INSERT INTO apps (id, org, name, status, created_at, updated_at) VALUES"
                        " ('app_1', 'shop', 'web', 'running', 'x', 'x')")
        target = config.NotifyTarget(kind="webhook", url=receiver.url + "/hook")
        n = notifier(db, settings(notify=(target,)))
        state = store.UpdateState(app_id="app_1", service="web", image="reg.example/shop/web:1.4.2",
                                  checked_at="t1", candidate="1.5.0", reason="newer")
        db.put_update_state(state)  # a check that found a candidate: no event yet
        bumped = dataclasses.replace(state, image="reg.example/shop/web:1.5.0", reason="committed",
                                     bumped_to="reg.example/shop/web:1.5.0", bumped_commit="c0ffee" * 6 + "beef",
                                     bumped_at="t2")
        db.put_update_state(bumped)
        db.put_update_state(dataclasses.replace(bumped, checked_at="t3", reason="up_to_date"))  # checked again
        settle(n, db)
        assert [json.loads(b)["event"] for _, _, b in receiver.got] == [notices.UPDATE_COMMITTED]
        event = json.loads(receiver.got[0][2])
        assert (event["org"], event["app"], event["status"], event["commit"], event["code"]) == (
            "shop", "web", "running", "c0ffee" * 6 + "beef", None)
        assert event["message"] == "web: reg.example/shop/web:1.4.2 → reg.example/shop/web:1.5.0"
    finally:
        db.close()
