"""What a status change tells people and forges (``core/notices``), the notify config, and the
forges' request shapes: pure, no daemon."""

from __future__ import annotations

import pathlib

import pytest

from cynchrod.core import notices
from cynchrod.desired import config
from cynchrod.shell import notify


def change(new: str, *, old: str | None = "running", kind: str = notices.APP, code: str | None = None,
           error: str | None = None, serving: str | None = None, commit: str | None = "c1") -> notices.Change:
    return notices.Change(id=1, kind=kind, app_id="app_1", org="acme", app="web", old=old, new=new, code=code,
                          error=error, serving=serving, commit=commit, at="2026-12-05T00:00:00Z")


def told(changes: list[notices.Change]) -> list[str]:
    last: str | None = None
    out = []
    for c in changes:
        event, last = notices.app_event(c, last)
        if event is not None:
            out.append(event)
    return out


def test_one_message_per_state_change_not_per_pass() -> None:
    crash = change("failed", error="crash_loop: web died (exit 1)")
    assert told([crash, crash, change("failed", error="crash_loop: web died (exit 2)"),
                 change("deploying"), change("running"), change("running")]) == ["failed", "recovered"]


@pytest.mark.parametrize(("kw", "event"), [
    ({"code": "quota_exceeded"}, "quota"),
    ({"error": "secret_missing: secret(s) pw not set in org acme"}, "secret_missing"),
    ({"error": "build_failed: exit 1"}, "build_failed"),
    ({"error": "apps/web.yaml:3: invalid_manifest: bad"}, "failed"),
    ({"error": "start_failed: x", "serving": "previous"}, "rolled_back"),
])
def test_the_event_of_a_failure(kw: dict[str, str], event: str) -> None:
    assert told([change("failed", **kw)]) == [event]


def test_statuses_of_health_gated_deploys_flow_through() -> None:
    assert told([change("deploying"), change("crashed", error="crashed: exit 3"), change("unhealthy"),
                 change("rolled_back"), change("completed")]) == ["failed", "failed", "rolled_back", "recovered"]


def test_a_new_app_that_runs_says_nothing() -> None:
    assert told([change("queued", old=None), change("deploying"), change("running")]) == []


@pytest.mark.parametrize(("new", "code", "state"), [
    ("deploying", None, "pending"), ("running", None, "success"), ("completed", None, "success"),
    ("failed", "start_failed", "failure"), ("unhealthy", None, "failure"), ("folded", None, "failure"),
    ("failed", "superseded", None), ("failed", "interrupted", None), ("queued", None, None),
])
def test_commit_states(new: str, code: str | None, state: str | None) -> None:
    assert notices.forge_state(change(new, kind=notices.DEPLOYMENT, code=code)) == state
    assert notices.forge_state(change(new, kind=notices.DEPLOYMENT, code=code, commit=None)) is None


def test_routes() -> None:
    route = notices.Route(on=("failed",), orgs=("acme",), apps=("web", "other/db"))
    assert route.matches("failed", "acme", "web")
    assert not route.matches("recovered", "acme", "web")
    assert not route.matches("failed", "beta", "web")
    assert notices.Route(apps=("other/db",)).matches("failed", "other", "db")
    assert notices.Route().matches("quota", "x", "y")


def test_capped_exponential_backoff() -> None:
    assert [notices.backoff(n, base=5, cap=60) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]


def test_notify_and_forge_from_the_file(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_SECRET", "s3cret-of-some-length")
    monkeypatch.setenv("FORGE_TOKEN", "tok")
    path = tmp_path / "c.yaml"
    path.write_text("""
publicUrl: https://cd.example.com/
forge: {kind: gitlab, repository: acme/apps, token_env: FORGE_TOKEN}
notify:
  - webhook: https://hooks.example.com/cynchrod/T0K3N
    secret_env: HOOK_SECRET
    on: [failed, recovered, rolled_back]
  - apprise: "slack://T000/B000/XXXX"
    on: [failed]
    orgs: [acme]
delivery: {backoff: 1, attempts: 3}
""")
    s = config.Settings.build(config.load_file(path))
    hook, chat = s.notify
    assert (hook.kind, hook.secret, hook.route.on) == ("webhook", "s3cret-of-some-length",
                                                       ("failed", "recovered", "rolled_back"))
    assert (chat.kind, chat.route.orgs) == ("apprise", ("acme",))
    # What the API shows of a target carries no path or token.
    assert (hook.name, chat.name) == ("webhook https://hooks.example.com", "apprise slack://")
    assert "T0K3N" not in repr(s) and "XXXX" not in repr(s) and "tok'" not in repr(s)
    assert s.forge == config.Forge(kind="gitlab", api_url="https://gitlab.com/api/v4", repository="acme/apps",
                                   token="tok")
    assert (s.public_url, s.delivery.backoff_s, s.delivery.attempts) == ("https://cd.example.com", 1, 3)


@pytest.mark.parametrize(("text", "fragment"), [
    ("notify: [{webhook: https://x.example, on: [nope]}]", "notify"),
    ("notify: [{webhook: https://x.example, apprise: 'json://x'}]", "notify"),
    ("forge: {kind: svn, repository: a/b, token_env: T}", "forge"),
    ("forge: {kind: gitea, repository: a/b, token_env: FORGE_TOKEN}", "api_url is required"),
    ("forge: {kind: github, repository: a/b, token_env: NOT_SET_ANYWHERE}", "NOT_SET_ANYWHERE is not set"),
    ("notify: [{webhook: https://x.example, secret_env: NOT_SET_ANYWHERE}]", "NOT_SET_ANYWHERE is not set"),
])
def test_bad_notify_config_is_refused(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, text: str,
                                      fragment: str) -> None:
    monkeypatch.setenv("FORGE_TOKEN", "tok")
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    with pytest.raises(config.ConfigError, match=fragment):
        config.Settings.build(config.load_file(path))


def test_forge_request_shapes() -> None:
    status = {"sha": "abc", "state": "failure", "context": "cynchrod/acme/web", "description": "failed: x" * 40,
              "target_url": "https://cd/ui/apps/app_1"}
    url, headers, body = notify.forge_request(
        config.Forge(kind="github", api_url="https://api.github.com", repository="o/r", token="t"), status)
    assert url == "https://api.github.com/repos/o/r/statuses/abc"
    assert headers["Authorization"] == "Bearer t" and headers["Accept"] == "application/vnd.github+json"
    assert body == {"state": "failure", "context": "cynchrod/acme/web", "description": ("failed: x" * 40)[:140],
                    "target_url": "https://cd/ui/apps/app_1"}
    url, headers, body = notify.forge_request(
        config.Forge(kind="gitlab", api_url="https://gl/api/v4", repository="grp/sub/proj", token="t"), status)
    assert (url, headers["PRIVATE-TOKEN"], body["state"], body["name"]) == (
        "https://gl/api/v4/projects/grp%2Fsub%2Fproj/statuses/abc", "t", "failed", "cynchrod/acme/web")
    url, headers, body = notify.forge_request(
        config.Forge(kind="bitbucket", api_url="https://api.bitbucket.org/2.0", repository="ws/r", token="t"),
        {**status, "context": "cynchrod/an-org-with-a-long-name/an-app-with-a-long-name"})
    assert url == "https://api.bitbucket.org/2.0/repositories/ws/r/commit/abc/statuses/build"
    assert body["state"] == "FAILED" and len(body["key"]) <= 40


def test_the_signature_is_githubs_scheme() -> None:
    # The example of docs/notifications.md: HMAC-SHA256 of the raw body, hex, with a sha256= prefix.
    assert notify.signature("It's a Secret to Everybody", b"Hello, World!") == (
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17")
