"""A watched working directory and a watched config file, against a real daemon."""

from __future__ import annotations

import hashlib
import hmac
import os
import pathlib
import subprocess
from collections.abc import Callable

import docker
import requests

from cynchrod import store
from tests.helpers import Daemon, GitRepo, git, manifest, owned, wait_for


def worktree(root: pathlib.Path) -> pathlib.Path:
    work = root / "manifests"
    (work / "apps").mkdir(parents=True)
    git("init", "-q", "-b", "main", str(work), cwd=root)
    (work / "apps" / ".keep").write_text("")
    git("add", ".", cwd=work)
    git("commit", "-q", "-m", "start", cwd=work)
    return work


def test_a_saved_file_is_applied(tmp_path: pathlib.Path, owner: str, images: object,
                                 docker_client: docker.DockerClient) -> None:
    work = worktree(tmp_path)
    daemon = Daemon(str(work), tmp_path / "state", owner, interval=300).start()
    try:
        wait_for(lambda: "pass poll" in daemon.output(), 30, "the first pass")
        (work / "apps" / "w.yaml").write_text(manifest("w"))  # saved, not committed
        # The save wakes the daemon (its interval is 300 s): running within 30 s is the save, not a poll.
        wait_for(lambda: [c["State"] for c in owned(docker_client, owner)] == ["running"], 30, "the saved app")
        (work / "apps" / "w.yaml").write_text(manifest("w", command="[sleep, '4000']"))
        wait_for(lambda: [docker_client.api.inspect_container(c["Id"])["Config"]["Cmd"]
                          for c in owned(docker_client, owner)] == [["sleep", "4000"]], 10, "the edit")
        db = store.Store(tmp_path / "state" / "cynchrod.db")
        app = db.live_apps()[("default", "w")]
        assert [d.trigger for d in db.deployments(app.id)] == ["watch", "watch"]
        assert app.commit is not None and app.commit.startswith("worktree:")
        db.close()
        status = subprocess.run(["git", "status", "--porcelain"], cwd=work, capture_output=True, text=True).stdout
        assert "apps/w.yaml" in status  # still the user's uncommitted file: nothing was committed for them
        assert "watchfiles" not in daemon.output()  # its "1 change detected" info lines are not for our log
    finally:
        assert daemon.stop() == 0


def save(path: pathlib.Path, text: str) -> None:
    """As an editor saves: a whole new file renamed over the old one (a truncate-then-write
    would show the watcher an empty file, which is a valid config of its own)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_config_file_is_reloaded_when_valid(repo: GitRepo, daemons: Callable[..., Daemon],
                                            tmp_path: pathlib.Path) -> None:
    repo.push({"apps/.keep": ""})
    config = tmp_path / "cynchrod.yaml"
    config.write_text("webhook: {secret: first-secret-0123456789}\n")
    daemon = daemons(interval=300)
    daemon.args += ["--config", str(config)]
    daemon.start()

    def accepted(secret: str) -> bool:
        body = b'{"ref": "refs/heads/main"}'
        sig = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        try:
            return requests.post(daemon.api + "/webhooks/git", data=body, timeout=5,
                                 headers={"X-Hub-Signature-256": sig}).status_code == 202
        except requests.RequestException:
            return False

    wait_for(lambda: accepted("first-secret-0123456789"), 30, "the API")
    save(config, "webhook: {secret: second-secret-0123456789}\n")
    # The API workers are replaced on a reload (gunicorn HUP): until the old ones have gone,
    # either may answer, so the reload is done when only the new secret is accepted.
    wait_for(lambda: accepted("second-secret-0123456789") and not accepted("first-secret-0123456789"), 15,
             "only the reloaded secret")
    save(config, "webhook: {secret: 3}\nbogus: true\n")
    wait_for(lambda: "config not reloaded, the old one stays" in daemon.output(), 10, "the refusal")
    # The refused file changed nothing: the workers (once the last reload's old ones have
    # finished their graceful exit, which a single request may still reach) take only the
    # second secret; had the bogus file been applied, this would never hold.
    wait_for(lambda: accepted("second-secret-0123456789") and not accepted("first-secret-0123456789"), 15,
             "the second secret alone, still")
    assert "config reloaded" in daemon.output() and daemon.output().count("config reloaded from") == 1
    assert daemon.stop() == 0
