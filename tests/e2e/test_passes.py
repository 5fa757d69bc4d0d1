"""Webhooks tell the truth: a signed delivery answers with the pass it queued, ``GET /passes/<id>``
gives that pass's outcome per app, and ``cynchrod wait --commit`` exits 1 when an app failed."""

from __future__ import annotations

from collections.abc import Callable

import requests

from tests.e2e.test_webhooks import deliver, github_push, start_hooked
from tests.helpers import Daemon, GitRepo, cli, manifest, new_token, wait_for


def test_a_delivery_names_its_pass_and_wait_tells_the_outcome(repo: GitRepo, daemons: Callable[..., Daemon],
                                                             tmp_path) -> None:  # type: ignore[no-untyped-def]
    daemon = start_hooked(repo, daemons)
    state = tmp_path / "state"
    token, theirs = new_token(state, "default"), new_token(state, "other")
    auth = {"Authorization": f"Bearer {token}"}
    good = repo.push({"apps/web.yaml": manifest("web"), "apps/x.yaml": manifest("x", extra="org: other\n")})
    answer = deliver(daemon.api, "github", github_push(repo, good))
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert body["queued"] is True and body["pass_url"] == f"/passes/{body['pass']}"

    def done() -> dict | None:  # type: ignore[type-arg]
        found = requests.get(daemon.api + body["pass_url"], headers=auth, timeout=5).json()
        return found if found["status"] == "done" and found["settled"] else None

    # A pass ends before its deployments are judged (health-gated deploys): the outcome reads the
    # apps' rows until they settle, so "done and settled" is the final word a CI job waits for.
    wait_for(done, 60, "the pass to end and its apps to settle")
    outcome = done()
    assert outcome is not None
    assert (outcome["requested_commit"], outcome["commit"], outcome["failed"]) == (good, good, False)
    assert [(a["org"], a["app"], a["status"]) for a in outcome["apps"]] == [("default", "web", "running")]
    # Another org's token sees the pass, and only its own app in it.
    mine = requests.get(daemon.api + body["pass_url"], headers={"Authorization": f"Bearer {theirs}"}, timeout=5)
    assert [a["app"] for a in mine.json()["apps"]] == ["x"]
    listed = requests.get(daemon.api + f"/passes?commit={good[:10]}", headers=auth, timeout=5).json()
    assert [p["id"] for p in listed["passes"]] == [body["pass"]]

    env = {"CYNCHROD_API": daemon.api, "CYNCHROD_TOKEN": token}
    ok = cli("wait", "--commit", good, "--timeout", "30", env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "default/web" in ok.stdout and "running" in ok.stdout

    bad = repo.push({"apps/web.yaml": manifest("web", extra="secrets: [pw]\n")})
    assert deliver(daemon.api, "github", github_push(repo, bad)).status_code == 202
    failed = cli("wait", "--commit", bad[:12], "--timeout", "60", env=env)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "secret_missing" in failed.stdout

    never = cli("wait", "--commit", "0123456789abcdef", "--timeout", "1", env=env)
    assert never.returncode == 1 and "wait_timeout" in never.stderr
    bad_query = requests.get(daemon.api + "/passes?commit=xyz", headers=auth, timeout=5)
    assert (bad_query.status_code, bad_query.json()["error"]) == (400, "invalid_query")
    assert requests.get(daemon.api + "/passes/999999", headers=auth, timeout=5).status_code == 404


def test_wait_for_a_commit_no_webhook_announced(repo: GitRepo, daemons: Callable[..., Daemon],
                                                tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A push the watch applies (no pass was asked for): ``wait`` reads the apps at that commit."""
    repo.push({"apps/.keep": ""})
    daemon = daemons(interval=300).start()
    token = new_token(tmp_path / "state", "default")
    sha = repo.push({"apps/web.yaml": manifest("web")})
    waited = cli("wait", "--commit", sha, "--timeout", "60",
                 env={"CYNCHROD_API": daemon.api, "CYNCHROD_TOKEN": token})
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert "default/web" in waited.stdout
