"""An empty secret is refused, whatever way it is sent (issue 24, item 9).

``PUT /orgs/{org}/secrets/{name}`` with no body stored an empty secret (200): a secret that is
empty is almost always a mistake (a shell variable that was not set, a file that was not
there), and the app that mounts it would start with an empty password. Each form of an empty
value (no body, an empty raw body, ``{"value": ""}``) is ``400 invalid_secret``, nothing is
stored, and a real value is still set. Real daemon, real HTTP.
"""

from __future__ import annotations

import pathlib

import pytest
import requests

from tests.helpers import Daemon, GitRepo, manifest, new_token


@pytest.fixture
def api(repo: GitRepo, daemons, tmp_path: pathlib.Path) -> tuple[str, dict[str, str]]:  # type: ignore[no-untyped-def]
    token = new_token(tmp_path / "state", "default")
    repo.push({"apps/web.yaml": manifest("web")})
    daemon: Daemon = daemons(interval=300).start()

    daemon.wait_healthy()
    return daemon.api, {"Authorization": f"Bearer {token}"}


EMPTY = {
    "no body": {},
    "an empty raw body": {"data": b"", "headers": {"Content-Type": "application/octet-stream"}},
    "an empty JSON value": {"json": {"value": ""}},
}


def test_an_empty_secret_is_refused_and_nothing_is_stored(api: tuple[str, dict[str, str]]) -> None:
    url, headers = api
    for how, kw in EMPTY.items():
        r = requests.put(f"{url}/orgs/default/secrets/password", headers={**headers, **kw.pop("headers", {})},
                         timeout=10, **kw)
        assert r.status_code == 400, (how, r.status_code, r.text)
        assert r.json()["error"] == "invalid_secret" and "empty" in r.json()["message"], (how, r.text)
    listed = requests.get(f"{url}/orgs/default/secrets", headers=headers, timeout=10).json()
    assert listed["secrets"] == []
    r = requests.put(f"{url}/orgs/default/secrets/password", headers=headers, data=b"s3cret", timeout=10)
    assert r.status_code == 200, r.text
    r = requests.put(f"{url}/orgs/default/secrets/password", headers=headers, json={"value": ""}, timeout=10)
    assert r.status_code == 400  # and the value set before stays
    listed = requests.get(f"{url}/orgs/default/secrets", headers=headers, timeout=10).json()
    assert [s["name"] for s in listed["secrets"]] == ["password"]
