"""One file, one fault: a bad manifest or a damaged mirror never stops the passes (real dockerd and git)."""

from __future__ import annotations

import glob
import os

import docker

from tests.conftest import Harness
from tests.helpers import GitRepo, manifest


def test_a_manifest_that_raised_is_its_files_error_and_self_heal_goes_on(
        harness: Harness, repo: GitRepo, docker_client: docker.DockerClient) -> None:
    repo.push({"apps/web.yaml": manifest("web")})
    assert harness.sync().ok
    # The cases that used to raise out of the pass: a shell string with an unclosed quote,
    # a deeply nested value, a huge integer, a lone surrogate escape.
    repo.push({
        "apps/quote.yaml": manifest("quote", command="\"echo 'unclosed\""),
        "apps/deep.yaml": manifest("deep", extra="env: " + "[" * 20000 + "\n"),
        "apps/big.yaml": manifest("big", extra="port: " + "9" * 5000 + "\n"),
        "apps/surrogate.yaml": manifest("surrogate", extra='env: {A: "\\udcff"}\n'),
    })
    web = harness.containers()["web"]
    docker_client.api.remove_container(web["Id"], force=True)  # a healthy app dies
    result = harness.sync()
    assert sorted(e.split(":", 1)[0] for e in result.manifest_errors) == [
        "apps/big.yaml", "apps/deep.yaml", "apps/quote.yaml", "apps/surrogate.yaml"]
    assert "apps/quote.yaml:3: invalid_value: command: cannot be split" in "\n".join(result.manifest_errors)
    healed = harness.containers()["web"]
    assert healed["Id"] != web["Id"] and healed["State"] == "running"
    assert harness.app("web").status == "running"


def _replace(path: str, data: bytes) -> None:
    """Write a file anew (unlink first: a local clone hard-links the origin's objects)."""
    os.chmod(path, 0o644)
    os.remove(path)
    with open(path, "wb") as out:
        out.write(data)


def test_a_damaged_mirror_is_cloned_again(harness: Harness, repo: GitRepo) -> None:
    repo.push({"apps/web.yaml": manifest("web")})
    assert harness.sync().ok
    mirror = harness.src.mirror
    # Every object of the mirror garbled, and its tracking ref too.
    for path in glob.glob(str(mirror / "objects" / "**" / "*"), recursive=True):
        if os.path.isfile(path):
            _replace(path, b"\x00garbage" * 8)
    for path in glob.glob(str(mirror / "refs" / "remotes" / "origin" / "*")):
        _replace(path, b"zz\n")
    repo.push({"apps/web.yaml": manifest("web", extra="env: {V: '2'}\n")})
    result = harness.sync()
    assert result.ok and result.source_error is None, result
    assert harness.src.heals == 1
    assert harness.app("web").status == "running"
    env = harness.rt.api.inspect_container(harness.containers()["web"]["Id"])["Config"]["Env"]
    assert "V=2" in env
    assert harness.sync().ok  # and the next pass is a plain one
    assert harness.src.heals == 1


def test_a_damaged_mirror_of_an_unreachable_remote_keeps_the_apps(harness: Harness, repo: GitRepo) -> None:
    repo.push({"apps/web.yaml": manifest("web")})
    assert harness.sync().ok
    before = harness.containers()["web"]["Id"]
    os.rename(repo.bare, str(repo.bare) + ".away")
    (harness.src.mirror / "config").write_text("[[[[\n")
    harness.src._repo = harness.src._net_repo = None  # as a restarted daemon finds it
    result = harness.sync()
    assert result.source_error and "source_unavailable" in result.source_error
    assert harness.containers()["web"]["Id"] == before  # nothing torn down
    os.rename(str(repo.bare) + ".away", repo.bare)
    harness.src._healed_at = -1e9  # the heal interval has passed
    assert harness.sync().ok
    assert harness.src.heals == 1
