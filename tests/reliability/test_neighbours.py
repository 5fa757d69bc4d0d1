"""Neighbours and repeats: another daemon on the engine, a name being freed, a duplicate
file, two apps after one host port. Each once broke something (issue 13); each test
failed before its fix."""

from __future__ import annotations

import pathlib
import time

import docker

from cynchrod import runtime
from cynchrod.core.errors import PermanentError, TemporaryError
from cynchrod.runtime import local
from tests.conftest import Harness
from tests.helpers import TEST_IMAGE, Daemon, GitRepo, free_port, manifest, owned, wait_for


def test_two_daemons_with_one_owner_leave_each_other_alone(tmp_path: pathlib.Path, owner: str, images: object,
                                                          docker_client: docker.DockerClient) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one, two = GitRepo(tmp_path / "one"), GitRepo(tmp_path / "two")
    one.push({"apps/a.yaml": manifest("a")})
    two.push({"apps/b.yaml": manifest("b")})
    daemons = [Daemon(one, tmp_path / "one" / "state", owner, interval=1).start(),
               Daemon(two, tmp_path / "two" / "state", owner, interval=1).start()]
    try:
        def apps() -> dict[str, str]:
            return {c["Labels"][runtime.LABEL_APP]: c["Id"] for c in owned(docker_client, owner)
                    if c["State"] == "running"}

        wait_for(lambda: sorted(apps()) == ["a", "b"], 30, "both apps to run")
        first = apps()
        time.sleep(4)  # several passes of each daemon
        assert apps() == first  # neither pruned nor recreated the other's
        instances = {c["Labels"][runtime.LABEL_INSTANCE] for c in owned(docker_client, owner)}
        assert len(instances) == 2  # each state dir's identity is on what it made
        # Both declare the same app: the one that has it keeps it, the other says why.
        two.push({"apps/a.yaml": manifest("a")})
        wait_for(lambda: "owner_conflict" in daemons[1].output(), 20, "the second daemon to report the clash")
        assert apps()["a"] == first["a"]
        # A removal is logged, with its reason.
        one.push({"apps/a.yaml": None, "apps/.keep": ""})
        wait_for(lambda: "removed default/a: no longer declared" in daemons[0].output(), 20, "a to be pruned")
        assert "prune remove default/a: no longer declared" in daemons[0].output()
        assert "a" not in apps()
        assert apps()["b"] == first["b"]
    finally:
        for d in daemons:
            d.stop()


def test_a_name_held_by_our_container_on_its_way_out_is_temporary(harness: Harness,
                                                                 docker_client: docker.DockerClient) -> None:
    rt = harness.rt
    other = local.LocalRuntime(owner=rt.owner, instance="someone-else", stop_timeout=1)
    try:
        names = {"ours": rt.container_name("default", "x", "main"),
                 "theirs": rt.container_name("default", "y", "main"),
                 "foreign": rt.container_name("default", "z", "main")}
        labels = {"ours": {runtime.LABEL_OWNER: rt.owner, runtime.LABEL_INSTANCE: rt.instance,
                           runtime.LABEL_APP: "x"},
                  "theirs": {runtime.LABEL_OWNER: rt.owner, runtime.LABEL_INSTANCE: "someone-else",
                             runtime.LABEL_APP: "y"},
                  "foreign": {}}
        for kind, name in names.items():
            docker_client.api.create_container(TEST_IMAGE, command=["sleep", "60"], name=name, labels=labels[kind])
        ours = rt._name_conflict(names["ours"])
        assert isinstance(ours, TemporaryError) and ours.code == "name_in_use"
        theirs = rt._name_conflict(names["theirs"])
        assert isinstance(theirs, PermanentError) and theirs.code == "owner_conflict"
        foreign = rt._name_conflict(names["foreign"])
        assert isinstance(foreign, PermanentError) and foreign.code == "name_conflict"
        gone = rt._name_conflict(rt.container_name("default", "never", "main"))
        assert isinstance(gone, TemporaryError) and gone.code == "name_in_use"
        assert [u.app for u in other.list_units()] == ["y"]  # each instance sees its own units only
    finally:
        for name in ("x", "y", "z"):
            docker_client.api.remove_container(rt.container_name("default", name, "main"), force=True)
        other.close()


def test_a_newcomer_file_never_takes_over_a_deployed_app(repo, harness: Harness) -> None:
    repo.push({"apps/b.yaml": manifest("x")})
    assert harness.sync().ok
    before = harness.containers()["x"]["Id"]
    # A new file that sorts first declares the same org/name with another spec.
    repo.push({"apps/a.yaml": manifest("x", extra="env: {TAKEOVER: '1'}\n")})
    result = harness.sync()
    assert result.manifest_errors == [
        "apps/a.yaml:1: duplicate_app: app default/x is already declared in apps/b.yaml"]
    assert harness.containers()["x"]["Id"] == before
    assert harness.app("x").path == "apps/b.yaml"


def test_a_failure_that_repeats_backs_off_and_is_one_row(repo, harness: Harness) -> None:
    port = free_port()
    served = "[httpd, -f, -p, '8080']"  # a declared port is served (a deployment is ready once it accepts)
    repo.push({"apps/a.yaml": manifest("a", command=served, extra=f"port: 8080\nhostPort: {port}\n"),
               "apps/b.yaml": manifest("b", command=served, extra=f"port: 8080\nhostPort: {port}\n")})
    # The back-off's clock is frozen from the first pass on: a failure is timed at ``start`` however
    # long that pass and this test take (CI: a second went by before the test read the clock, and
    # the first retry came one step early).
    start = time.monotonic()
    now = start
    harness.rec._clock = lambda: now
    harness.sync()
    loser = next(a for a in harness.db.live_apps().values() if a.status == "failed")
    attempts = []
    for step in range(60):  # one minute of passes, a pass a second
        now = start + step
        result = harness.sync()
        outcome = next(a for a in result.apps if a.name == loser.name)
        if outcome.actions:
            attempts.append(step)
    # 1, 2, 4, 8, 16, 32 s apart: a handful of tries in a minute, not one a pass.
    assert attempts == [1, 3, 7, 15, 31], attempts
    rows = harness.db.deployments(loser.id, limit=100)
    failed = [d for d in rows if d.status == "failed"]
    assert len(failed) == 1 and failed[0].attempts == 1 + len(attempts), [(d.status, d.attempts) for d in rows]
