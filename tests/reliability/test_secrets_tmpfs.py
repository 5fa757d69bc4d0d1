"""Item 10: secret plaintext lives in memory or on a tmpfs only, and a deleted secret's copies go at once."""

from __future__ import annotations

import pathlib
import shutil

import docker

from cynchrod.desired import secrets as vault
from tests.conftest import Harness
from tests.helpers import GitRepo, manifest

VALUE = b"plaintext-" + b"7f3a9c" * 4


def _files_holding(root: pathlib.Path, needle: bytes) -> list[pathlib.Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


def test_secrets_are_staged_on_a_tmpfs_and_unstaged_on_delete(
        harness: Harness, repo: GitRepo, docker_client: docker.DockerClient) -> None:
    harness.secrets.set("default", "token", VALUE)
    repo.push({"apps/web.yaml": manifest("web", extra="secrets: [token]\n")})
    assert harness.sync().ok
    container = harness.containers()["web"]
    source = next(m["Source"] for m in docker_client.api.inspect_container(container["Id"])["Mounts"]
                  if m["Destination"] == "/run/secrets/token")
    staged = pathlib.Path(source)
    assert staged.read_bytes() == VALUE
    assert vault.filesystem_type(staged) == "tmpfs"
    assert not staged.is_relative_to(harness.state.resolve())
    assert _files_holding(harness.state, VALUE) == []  # nothing under the state dir holds the plaintext
    assert not (harness.state / "secrets").exists()

    # A restart after a reboot: the tmpfs is empty; start-up stages every live app's secrets again.
    shutil.rmtree(harness.secrets.staging)
    again = vault.Secrets(harness.db, state_dir=harness.state)
    assert again.staging == harness.secrets.staging
    assert again.restage_all() == 1
    assert staged.read_bytes() == VALUE

    # Deleting the secret removes its staged copies at once, before any pass.
    assert harness.secrets.delete("default", "token")
    assert not staged.exists()
    result = harness.sync()
    assert harness.app("web").status == "failed" and "secret_missing" in (harness.app("web").last_error or "")
    assert not result.ok


def test_a_staging_folder_that_cannot_be_written_fails_the_app_not_the_daemon(
        harness: Harness, repo: GitRepo) -> None:
    """Seen with the image run without its staging mount: an OSError from the staging folder (here the
    app's folder is a file in the way) crashed start-up's restage_all, and the daemon restarted forever."""
    harness.secrets.set("default", "token", VALUE)
    repo.push({"apps/web.yaml": manifest("web", extra="secrets: [token]\n")})
    assert harness.sync().ok
    app_dir = harness.secrets.app_dir("default", "web")
    shutil.rmtree(app_dir)
    app_dir.write_bytes(b"in the way")
    try:
        again = vault.Secrets(harness.db, state_dir=harness.state)
        assert again.restage_all() == 0  # logged, not raised
        try:
            again.stage(harness.app("web").spec)  # type: ignore[arg-type]
        except vault.StagingUnavailable as exc:
            assert exc.code == "secret_staging_unavailable" and str(app_dir) in str(exc)
        else:
            raise AssertionError("stage() wrote past a file in the way")
    finally:
        app_dir.unlink()
