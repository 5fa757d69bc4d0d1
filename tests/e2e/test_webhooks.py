"""Signed push deliveries in each provider's payload shape against a real daemon."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import docker
import pytest
import requests

from tests.conftest import shared_daemons
from tests.helpers import Daemon, GitRepo, manifest, owned, wait_for

SECRET = "a-webhook-secret-of-some-length"


def github_push(repo: GitRepo, after: str, ref: str = "refs/heads/main") -> dict[str, Any]:
    # https://docs.github.com/webhooks/webhook-events-and-payloads#push
    return {"ref": ref, "before": "0" * 40, "after": after, "created": False, "deleted": False, "forced": False,
            "repository": {"id": 1, "name": "apps", "full_name": "acme/apps", "clone_url": "https://evil.example/x.git",
                           "default_branch": "main"},
            "pusher": {"name": "tester", "email": "tester@localhost"},
            "head_commit": {"id": after, "message": "change", "timestamp": "2026-11-28T10:00:00Z"},
            "commits": [{"id": after, "message": "change", "added": [], "removed": [], "modified": []}]}


def gitlab_push(repo: GitRepo, after: str, ref: str = "refs/heads/main") -> dict[str, Any]:
    # https://docs.gitlab.com/ee/user/project/integrations/webhook_events.html#push-events
    return {"object_kind": "push", "event_name": "push", "before": "0" * 40, "after": after, "ref": ref,
            "checkout_sha": after, "user_name": "tester", "project_id": 15,
            "project": {"id": 15, "name": "apps", "git_http_url": "https://evil.example/x.git",
                        "default_branch": "main", "path_with_namespace": "acme/apps"},
            "commits": [{"id": after, "message": "change", "added": [], "modified": [], "removed": []}],
            "total_commits_count": 1, "repository": {"name": "apps", "url": "git@evil.example:x.git"}}


def gitea_push(repo: GitRepo, after: str, ref: str = "refs/heads/main") -> dict[str, Any]:
    # https://docs.gitea.com/usage/webhooks (push event payload)
    return {"ref": ref, "before": "0" * 40, "after": after, "compare_url": "",
            "commits": [{"id": after, "message": "change\n", "url": ""}], "total_commits": 1,
            "repository": {"id": 1, "name": "apps", "full_name": "acme/apps", "clone_url": "https://evil.example/x"},
            "pusher": {"login": "tester"}, "sender": {"login": "tester"}}


def sign(body: bytes) -> str:
    return hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()


def deliver(url: str, provider: str, payload: dict[str, Any], *, secret_ok: bool = True,
            event: str = "push") -> requests.Response:
    body = json.dumps(payload).encode()
    signature = sign(body) if secret_ok else sign(body + b"x")
    headers = {"Content-Type": "application/json"}
    if provider == "github":
        headers.update({"X-GitHub-Event": event, "X-GitHub-Delivery": "d1",
                        "X-Hub-Signature-256": f"sha256={signature}"})
    elif provider == "gitlab":
        headers.update({"X-Gitlab-Event": "Push Hook" if event == "push" else "System Hook",
                        "X-Gitlab-Token": SECRET if secret_ok else "wrong"})
    elif provider == "gitea":
        headers.update({"X-Gitea-Event": event, "X-Gitea-Signature": signature})
    else:
        headers.update({"X-Cynchrod-Event": event, "X-Cynchrod-Signature": f"sha256={signature}"})
    return requests.post(url + "/webhooks/git", data=body, headers=headers, timeout=10)


PAYLOADS = {"github": github_push, "gitlab": gitlab_push, "gitea": gitea_push, "generic": github_push}


def start_hooked(repo: GitRepo, make: Callable[..., Daemon]) -> Daemon:
    """A daemon with a webhook secret on an empty repository, past its first pass."""
    repo.push({"apps/.keep": ""})
    daemon = make(interval=300, env={"CYNCHROD_WEBHOOK_SECRET": SECRET}).start()
    wait_for(lambda: "pass poll" in daemon.output(), 30, "the first pass")
    wait_for(lambda: _up(daemon.api), 30, "the API")
    return daemon


@pytest.fixture
def hooked(repo: GitRepo, daemons: Callable[..., Daemon]) -> Daemon:
    """A daemon of the test's own: its deliveries deploy apps and count in its metrics."""
    return start_hooked(repo, daemons)


@pytest.fixture(scope="module")
def shared_hooked(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                  docker_client: docker.DockerClient, images: object) -> Iterator[tuple[GitRepo, Daemon]]:
    """One daemon for the refused deliveries: a refusal changes nothing a later test reads."""
    with shared_daemons(request, tmp_path_factory, docker_client) as (repo, _, make):
        yield repo, start_hooked(repo, make)


def _up(url: str) -> bool:
    try:
        return requests.get(url + "/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


@pytest.mark.parametrize("provider", ["github", "gitlab", "gitea", "generic"])
def test_signed_push_deploys_within_seconds(provider: str, repo: GitRepo, hooked: Daemon,
                                            docker_client: docker.DockerClient) -> None:
    after = repo.push({"apps/hook.yaml": manifest("hook")})
    started = time.monotonic()
    response = deliver(hooked.api, provider, PAYLOADS[provider](repo, after))
    replied = time.monotonic() - started
    assert response.status_code == 202, response.text
    assert response.json()["queued"] is True
    assert replied < 0.5  # the reply never waits for the fetch (about 100 ms target)
    took = wait_for(lambda: [c["State"] for c in owned(docker_client, hooked.owner)] == ["running"], 10,
                    "the pushed app")
    assert time.monotonic() - started < 5, took
    # The pass logs its line when it ends, which is after the container runs.
    wait_for(lambda: "pass webhook" in hooked.output(), 10, "the webhook pass to finish")


@pytest.mark.parametrize("provider", ["github", "gitlab", "gitea", "generic"])
def test_wrong_or_missing_signatures(provider: str, shared_hooked: tuple[GitRepo, Daemon]) -> None:
    repo, hooked = shared_hooked
    bad = deliver(hooked.api, provider, PAYLOADS[provider](repo, "1" * 40), secret_ok=False)
    assert (bad.status_code, bad.json()["error"]) == (401, "unauthorized")
    unsigned = requests.post(hooked.api + "/webhooks/git", json={"ref": "refs/heads/main"}, timeout=10)
    assert (unsigned.status_code, unsigned.json()["error"]) == (401, "unauthorized")


def test_oversized_other_branch_and_ping(repo: GitRepo, hooked: Daemon) -> None:
    huge = {"ref": "refs/heads/main", "pad": "x" * (1024 * 1024 + 10)}
    response = deliver(hooked.api, "github", huge)
    assert (response.status_code, response.json()["error"]) == (413, "body_too_large")
    other = deliver(hooked.api, "github", github_push(repo, "2" * 40, ref="refs/heads/feature"))
    assert other.status_code == 202 and "ignored" in other.json()
    ping = deliver(hooked.api, "github", {"zen": "Keep it logically awesome.", "hook_id": 1}, event="ping")
    assert ping.status_code == 200 and ping.json()["event"] == "ping"
    metrics = requests.get(hooked.api + "/metrics", timeout=5).text
    assert 'cynchrod_webhook_deliveries_total{provider="github",result="ignored"} 1.0' in metrics
    assert 'cynchrod_passes_total{result="ok",trigger="webhook"}' not in metrics


def test_a_burst_coalesces(repo: GitRepo, hooked: Daemon) -> None:
    after = repo.push({"apps/.keep": "burst"})
    body = github_push(repo, after)
    errors: list[int] = []

    def send(n: int) -> None:
        for _ in range(n):
            code = deliver(hooked.api, "github", body).status_code
            if code != 202:
                errors.append(code)
            time.sleep(0.02)

    threads = [threading.Thread(target=send, args=(25,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors

    def webhook_passes() -> int:
        text = requests.get(hooked.api + "/metrics", timeout=5).text
        found = re.findall(r'cynchrod_passes_total\{result="\w+",trigger="webhook"\} ([\d.]+)', text)
        return sum(int(float(v)) for v in found)

    wait_for(lambda: webhook_passes() >= 2, 10, "the trailing pass")
    time.sleep(1.5)  # longer than the quiet period: any further pass would show now
    assert webhook_passes() == 2


def test_off_without_a_secret(repo: GitRepo, daemons: Callable[..., Daemon]) -> None:
    repo.push({"apps/.keep": ""})
    daemon = daemons(interval=300).start()
    wait_for(lambda: _up(daemon.api), 30, "the API")
    response = deliver(daemon.api, "github", {"ref": "refs/heads/main"})
    assert (response.status_code, response.json()["error"]) == (404, "not_found")
