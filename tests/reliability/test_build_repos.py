"""Item 11: build.repo may name a repository on this machine only where the config allows it (real daemon)."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import requests

from tests.helpers import Daemon, GitRepo, new_token, wait_for


def test_local_build_repos_need_the_operators_allow_list(repo: GitRepo, daemons: Callable[..., Daemon],
                                                          tmp_path: pathlib.Path) -> None:
    state = tmp_path / "state"
    token = new_token(state, "acme", "t")
    repo.push({"apps/.keep": ""})
    allowed = tmp_path / "srv-git"
    (allowed / "x.git").mkdir(parents=True)
    cfg = tmp_path / "cynchrod.yaml"
    cfg.write_text(f"orgs: {{other: {{builds: {{localRepos: ['{allowed}']}}}}}}\n")
    daemon = daemons(interval=1)  # a pass every second picks up the committer's push
    daemon.args += ["--config", str(cfg)]
    daemon.start()
    headers = {"Authorization": f"Bearer {token}"}

    def up() -> bool:
        try:
            return requests.get(daemon.api + "/apps", headers=headers, timeout=2).status_code == 200
        except requests.RequestException:
            return False

    wait_for(up, 30, "the API")
    mirror = next((state / "repos").glob("*.git"))  # the manifests mirror: every org's manifests
    for url in (str(mirror), f"file://{mirror}", f"{allowed}/../../state/repos/{mirror.name}", str(allowed / "x.git")):
        r = requests.post(daemon.api + "/apps", headers=headers, timeout=30,
                          json={"name": "thief", "org": "acme", "build": {"repo": url}, "port": 8080})
        assert r.status_code == 400 and "policy_violation" in r.text, (url, r.text)
    # From Git, a committer's manifest: the app fails with policy_violation and nothing is cloned.
    repo.push({"apps/thief.yaml": f"name: thief\norg: acme\nbuild: {{repo: 'file://{mirror}'}}\nport: 8080\n"})
    admin = new_token(state, "ops", "root", admin=True)

    def thief() -> dict | None:  # type: ignore[type-arg]
        apps = requests.get(daemon.api + "/apps", headers={"Authorization": f"Bearer {admin}"}, timeout=5).json()
        return next((a for a in apps["apps"] if a["name"] == "thief" and a["status"] == "failed"), None)

    wait_for(thief, 30, "thief to fail")
    assert (thief() or {})["last_error"].startswith("policy_violation: build.repo")
    assert not (state / "builds").exists() or not any((state / "builds").rglob("HEAD"))
    assert daemon.stop() == 0
