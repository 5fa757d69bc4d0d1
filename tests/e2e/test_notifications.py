"""Notifications through the daemon as a user runs it: the config's ``notify:``, the outbox across a
restart while the receiver is down, ``GET /notifications`` scoped to a token's org, ``/metrics``."""

from __future__ import annotations

import hashlib
import hmac
import json
import pathlib
import re
from collections.abc import Callable

import requests

from cynchrod import store
from tests.helpers import Daemon, GitRepo, cli, free_port, manifest, new_token, wait_for
from tests.integration.test_notify import Receiver

SECRET = "a-notify-secret-of-some-length"


def dashboard(daemon: Daemon, token: str) -> str:
    """The apps page as a signed-in user of ``token`` sees it."""
    browser = requests.Session()
    form = browser.get(daemon.api + "/signin", timeout=5).text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form)
    assert csrf is not None
    signed = browser.post(daemon.api + "/signin", data={"token": token, "csrf_token": csrf.group(1)}, timeout=5)
    assert signed.status_code == 200, signed.text
    return signed.text


def test_the_outbox_survives_a_restart_and_each_org_sees_its_own(repo: GitRepo, daemons: Callable[..., Daemon],
                                                                  tmp_path: pathlib.Path) -> None:
    port = free_port()  # the receiver is down for the first daemon's life
    cfg = tmp_path / "cynchrod.yaml"
    cfg.write_text(f"""
publicUrl: http://cd.example.com
notify:
  - webhook: http://127.0.0.1:{port}/hook
    secret_env: NOTIFY_SECRET
delivery: {{backoff: 0.2, maxBackoff: 0.5, attempts: 100, timeout: 1}}
""")
    repo.push({"apps/a.yaml": manifest("a", extra="secrets: [pw]\n"),
               "apps/b.yaml": manifest("b", extra="org: acme\nsecrets: [pw]\n")})

    def start() -> Daemon:
        d = daemons(interval=300, env={"NOTIFY_SECRET": SECRET})
        d.args += ["--config", str(cfg)]
        return d.start()

    first = start()
    state = tmp_path / "state"
    wait_for(lambda: (state / "cynchrod.db").exists(), 30, "the state")
    admin, acme = new_token(state, "default", "admin", admin=True), new_token(state, "acme")

    def listed(token: str, **params: str) -> dict:  # type: ignore[type-arg]
        try:
            answer = requests.get(first.api + "/notifications", params=params,
                                  headers={"Authorization": f"Bearer {token}"}, timeout=5)
        except requests.RequestException:
            return {"notifications": []}
        assert answer.status_code == 200, answer.text
        return answer.json()  # type: ignore[no-any-return]

    wait_for(lambda: len([n for n in listed(admin)["notifications"] if n["attempts"] >= 2]) == 2, 60,
             "two messages retried")
    every = listed(admin)
    assert every["counts"]["queued"] == 2 and every["counts"]["failed"] >= 4
    [theirs] = listed(acme)["notifications"]
    assert (theirs["org"], theirs["app"], theirs["event"], theirs["status"]) == ("acme", "b", "secret_missing",
                                                                                "queued")
    assert theirs["target"] == f"webhook http://127.0.0.1:{port}" and "/hook" not in json.dumps(every)
    assert theirs["last_error"]
    bad = requests.get(first.api + "/notifications?status=gone", headers={"Authorization": f"Bearer {acme}"},
                       timeout=5)
    assert (bad.status_code, bad.json()["error"]) == (400, "invalid_query")
    metrics = requests.get(first.api + "/metrics", timeout=5).text
    assert 'cynchrod_notifications{state="queued"} 2.0' in metrics

    # A message given up on shows on the dashboard of its org, not on another org's.
    db = store.Store(state / "cynchrod.db")
    try:
        with db.transaction(apps_changed=False) as raw:
            raw.execute("INSERT INTO outbox (dedupe, target, target_name, kind, event, org, app, body, status,"
                        " attempts, next_at, last_error, created_at) VALUES ('gone', 't_x', 'webhook https://x',"
                        " 'webhook', 'failed', 'acme', 'b', '{}', 'dead', 12, 0, 'HTTP 503', 'x')")
    finally:
        db.close()
    assert "Notifications not delivered" in dashboard(first, acme)
    assert "Notifications not delivered" not in dashboard(first, new_token(state, "default"))
    first.stop()

    receiver = Receiver(port)
    try:
        second = start()
        wait_for(lambda: len(receiver.got) >= 2, 60, "the two messages after the restart")
        events = sorted((json.loads(body)["org"], json.loads(body)["event"]) for _, _, body in receiver.got)
        assert events == [("acme", "secret_missing"), ("default", "secret_missing")]
        for _, headers, body in receiver.got:
            assert headers["X-Cynchrod-Signature-256"] == "sha256=" + hmac.new(
                SECRET.encode(), body, hashlib.sha256).hexdigest()
        second.stop()
        assert len(receiver.got) == 2  # once each: the restart did not send them again
    finally:
        receiver.close()


def test_sync_tells_what_its_pass_changed(repo: GitRepo, owner: str, tmp_path: pathlib.Path) -> None:
    """A one-shot ``cynchrod sync`` delivers what its pass has to tell once; a target that is down
    keeps its message in the outbox for the daemon (or the next sync)."""
    receiver = Receiver()
    try:
        cfg = tmp_path / "cynchrod.yaml"
        cfg.write_text(f"notify:\n  - webhook: {receiver.url}/hook\n    on: [secret_missing]\n")
        repo.push({"apps/a.yaml": manifest("a", extra="secrets: [pw]\n")})
        synced = cli("sync", "--repo", repo.url, "--state", str(tmp_path / "state"), "--owner", owner,
                     "--config", str(cfg))
        assert synced.returncode == 1, synced.stdout + synced.stderr  # the app failed
        [(path, _, body)] = receiver.got
        assert path == "/hook" and json.loads(body)["event"] == "secret_missing"
    finally:
        receiver.close()
