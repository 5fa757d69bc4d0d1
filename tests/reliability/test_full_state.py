"""A state directory that cannot be written answers ``507 state_unwritable`` to API calls (issue 24, item 4).

Real daemon, real dockerd and git; the state dir is a small tmpfs, filled with a file
(out of space), or its mirrors made read-only by a read-only bind mount over ``state/repos``
(a live filesystem cannot be remounted read-only while SQLite holds its files open for
writing: ``mount`` says busy; the store's read-only case is ``tests/unit/test_state_writes.py``).
Each API call that would write (a commit of an imperative call, which writes objects into the
mirror under the state dir; a secret stored in the store) answers 507 ``state_unwritable``,
not 500 ``internal``; ``/healthz`` names the problem; nothing is half-written (the repository
stays whole and holds no commit of the refused call); once there is room, the same calls
work and nothing was lost.
"""

from __future__ import annotations

import pathlib
import subprocess
from collections.abc import Iterator

import pytest
import requests

from tests.helpers import TEST_IMAGE, Daemon, GitRepo, git, new_token, tmpfs, wait_for
from tests.reliability.test_health import health


@pytest.fixture
def state(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    with tmpfs(tmp_path / "state", "16m") as path:
        yield path


class Api:
    def __init__(self, daemon: Daemon, token: str) -> None:
        self.url, self.headers = daemon.api, {"Authorization": f"Bearer {token}"}

    def call(self, method: str, path: str, **kw: object) -> requests.Response:
        return requests.request(method, self.url + path, headers=self.headers, timeout=60, **kw)  # type: ignore[arg-type]

    def apps(self) -> dict[str, dict]:  # type: ignore[type-arg]
        return {a["name"]: a for a in self.call("GET", "/apps").json()["apps"]}


def _commits(repo: GitRepo) -> int:
    return int(git("rev-list", "--count", "main", cwd=repo.bare))


def _refused(api: Api, repo: GitRepo, web: str, *, store: bool) -> None:
    """Every writing call is 507 state_unwritable, and nothing of it reaches Git."""
    before = _commits(repo)
    calls = [("POST", f"/apps/{web}/restart", {}), ("POST", f"/apps/{web}/stop", {}),
             ("POST", "/apps", {"json": {"name": "other", "image": TEST_IMAGE, "memory": 64}})]
    if store:
        calls.append(("PUT", "/orgs/default/secrets/key", {"data": b"value"}))
    for method, path, kw in calls:
        r = api.call(method, path, **kw)
        assert (r.status_code, r.json()["error"]) == (507, "state_unwritable"), (path, r.status_code, r.text)
    assert _commits(repo) == before
    git("fsck", "--strict", cwd=repo.bare)


@pytest.mark.parametrize("how", ["full", "read-only"])
def test_api_calls_on_an_unwritable_state_dir_are_507_and_work_again(
        how: str, repo: GitRepo, daemons, state: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    repo.push({"apps/web.yaml": f"name: web\nimage: {TEST_IMAGE}\ncommand: [sleep, '3600']\nmemory: 64\n"})
    api = Api(daemons(interval=300).start(), new_token(state, "default", "t"))
    wait_for(lambda: api.apps().get("web", {}).get("status") == "running" if _up(api) else False, 30, "web to run")
    web = api.apps()["web"]["id"]
    repos = state / "repos"
    if how == "full":
        subprocess.run(["dd", "if=/dev/zero", f"of={state / 'fill'}", "bs=1M"], capture_output=True)
    else:
        subprocess.run(["mount", "--bind", str(repos), str(repos)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(repos)], check=True)
    try:
        _refused(api, repo, web, store=how == "full")
        status, problems = health(api.url)
        assert status == 503 and "state_unwritable" in problems, problems
    finally:
        if how == "full":
            (state / "fill").unlink()
        else:
            subprocess.run(["umount", str(repos)], check=True)
    before = _commits(repo)
    r = api.call("POST", f"/apps/{web}/restart")
    assert r.status_code == 202, r.text
    r = api.call("PUT", "/orgs/default/secrets/key", data=b"value")
    assert r.status_code in (200, 201), r.text
    assert _commits(repo) == before + 1
    git("fsck", "--strict", cwd=repo.bare)
    wait_for(lambda: health(api.url) == (200, []), 30, "healthy once there is room")
    assert [s["name"] for s in api.call("GET", "/orgs/default/secrets").json()["secrets"]] == ["key"]
    wait_for(lambda: api.apps()["web"]["status"] == "running", 30, "the restart to be applied")
    [done] = [d for d in api.call("GET", f"/apps/{web}").json()["deployments"]
              if d["commit"] == git("rev-parse", "main", cwd=repo.bare).strip()]
    assert done["status"] == "running", done


def _up(api: Api) -> bool:
    try:
        api.apps()
    except (requests.RequestException, ValueError, KeyError):
        return False
    return True
