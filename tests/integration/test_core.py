"""Scenarios 1-6 of the core against a real dockerd and real git repositories."""

from __future__ import annotations

import shutil
from typing import Any

import docker
import pytest

from cynchrod import runtime, store
from tests.conftest import Harness
from tests.helpers import TEST_IMAGE, TEST_IMAGE_2, TEST_LABEL


def manifest(name: str, image: str = TEST_IMAGE, extra: str = "") -> str:
    return f"name: {name}\nimage: {image}\ncommand: [sleep, '3600']\nmemory: 64\n{extra}"


def test_push_creates_and_keeps(repo, harness: Harness) -> None:
    commit = repo.push({"apps/hello.yaml": manifest("hello")})
    result = harness.sync()
    assert result.ok, result
    assert result.commit == commit
    containers = harness.containers()
    assert list(containers) == ["hello"]
    row = containers["hello"]
    assert row["State"] == "running"
    assert row["Names"] == [f"/{harness.rt.owner}_default_hello"]
    app = harness.app("hello")
    assert (app.status, app.container_id, app.image, app.commit) == ("running", row["Id"], TEST_IMAGE, commit)
    [deployment] = harness.db.deployments(app.id)
    assert (deployment.status, deployment.trigger, deployment.commit) == ("running", "poll", commit)

    again = harness.sync()
    assert [a.actions for a in again.apps] == [[]]
    assert harness.containers()["hello"]["Id"] == row["Id"]
    assert len(harness.db.deployments(app.id)) == 1  # no change, no deployment


@pytest.mark.parametrize("change", [
    {"image": TEST_IMAGE_2},
    {"extra": "env: {GREETING: bonjour}\n"},
    {"extra": "port: 8080\n"},
    {"extra": "cpu: 0.25\n"},
    {"extra": "memory: 96\n"},
])
def test_change_recreates_only_that_app(repo, harness: Harness, change: dict[str, str]) -> None:
    repo.push({"apps/a.yaml": manifest("a"), "apps/b.yaml": manifest("b")})
    harness.sync()
    before = {name: row["Id"] for name, row in harness.containers().items()}
    image = change.get("image", TEST_IMAGE)
    extra = change.get("extra", "")
    if "memory" in extra:
        text = f"name: a\nimage: {image}\ncommand: [sleep, '3600']\n{extra}"
    elif "port" in extra:  # a declared port is served: a deployment is ready once it accepts (docs/health.md)
        text = f"name: a\nimage: {image}\ncommand: [httpd, -f, -p, '8080']\nmemory: 64\n{extra}"
    else:
        text = manifest("a", image, extra)
    repo.push({"apps/a.yaml": text})
    result = harness.sync()
    assert result.ok, result
    after = harness.containers()
    assert after["b"]["Id"] == before["b"], "the other app was touched"
    assert after["a"]["Id"] != before["a"]
    assert after["a"]["State"] == "running"
    assert next(a.actions for a in result.apps if a.name == "a")[0].startswith("recreate default/a: changed:")
    inspect = harness.rt.api.inspect_container(after["a"]["Id"])
    if "image" in change:
        assert inspect["Config"]["Image"] == TEST_IMAGE_2
    if "GREETING" in extra:
        assert "GREETING=bonjour" in inspect["Config"]["Env"]
    if "port" in extra:
        assert inspect["HostConfig"]["PortBindings"]["8080/tcp"][0]["HostIp"] == "127.0.0.1"
        assert harness.app("a").host_port is not None
    if "cpu" in extra:
        assert inspect["HostConfig"]["NanoCpus"] == 250_000_000
    if "memory" in extra:
        assert inspect["HostConfig"]["Memory"] == 96 * 1024 * 1024
        assert inspect["HostConfig"]["MemorySwap"] == 96 * 1024 * 1024


def test_command_change_recreates(repo, harness: Harness) -> None:
    repo.push({"apps/a.yaml": manifest("a")})
    harness.sync()
    repo.push({"apps/a.yaml": "name: a\nimage: " + TEST_IMAGE + "\ncommand: sleep 1234\nmemory: 64\n"})
    result = harness.sync()
    assert result.apps[0].actions == ["recreate default/a: changed: command"]
    row = harness.containers()["a"]
    assert harness.rt.api.inspect_container(row["Id"])["Config"]["Cmd"] == ["sleep", "1234"]


def test_limits_are_real_docker_limits(repo, harness: Harness) -> None:
    repo.push({"apps/a.yaml": f"name: a\nimage: {TEST_IMAGE}\ncommand: [sleep, '3600']\n"})
    harness.sync()
    host = harness.rt.api.inspect_container(harness.containers()["a"]["Id"])["HostConfig"]
    assert (host["NanoCpus"], host["Memory"], host["MemorySwap"]) == (10**9, 512 * 2**20, 512 * 2**20)


def test_delete_removes_and_foreign_containers_are_untouched(repo, harness: Harness,
                                                             docker_client: docker.DockerClient) -> None:
    foreign = docker_client.api.create_container(TEST_IMAGE, command=["sleep", "3600"],
                                                 labels={TEST_LABEL: harness.rt.owner})
    docker_client.api.start(foreign["Id"])
    repo.push({"apps/a.yaml": manifest("a"), "apps/b.yaml": manifest("b")})
    harness.sync()
    a_id = harness.app("a").id
    repo.push({"apps/a.yaml": None}, "delete a")
    result = harness.sync()
    assert result.ok
    assert list(harness.containers()) == ["b"]
    assert harness.db.app(a_id).status == store.REMOVED  # type: ignore[union-attr]
    assert docker_client.api.inspect_container(foreign["Id"])["State"]["Running"] is True


def test_unlabelled_container_with_the_apps_name_is_left_alone_and_reported(
        repo, harness: Harness, docker_client: docker.DockerClient) -> None:
    squatter = docker_client.api.create_container(
        TEST_IMAGE, command=["sleep", "3600"], name=harness.rt.container_name("default", "a", "main"),
        labels={TEST_LABEL: harness.rt.owner})
    repo.push({"apps/a.yaml": manifest("a")})
    result = harness.sync()
    assert not result.ok
    [outcome] = result.apps
    assert outcome.status == "failed"
    assert outcome.error is not None and outcome.error.startswith("name_conflict: a container named")
    assert "left alone" in outcome.error
    assert docker_client.api.inspect_container(squatter["Id"])["Id"] == squatter["Id"]
    deployment = harness.db.last_deployment(harness.app("a").id)
    assert deployment is not None and deployment.error_code == "name_conflict"
    # Permanent: not retried every pass until the spec changes.
    again = harness.sync()
    assert again.apps[0].status == "failed"
    assert len(harness.db.deployments(harness.app("a").id)) == 1


def test_broken_manifest_fails_that_app_alone(repo, harness: Harness) -> None:
    repo.push({"apps/a.yaml": manifest("a"), "apps/b.yaml": manifest("b")})
    harness.sync()
    before = {name: row["Id"] for name, row in harness.containers().items()}
    repo.push({"apps/a.yaml": manifest("a", extra="cpu: 99\n")}, "break a")
    result = harness.sync()
    assert not result.ok
    assert result.manifest_errors == ["apps/a.yaml:5: out_of_range: cpu: 99 is greater than the maximum of 8"]
    a = harness.app("a")
    assert (a.status, a.serving) == ("failed", "previous")  # "failed — previous version running"
    assert a.last_error == result.manifest_errors[0]
    after = harness.containers()
    assert {n: r["Id"] for n, r in after.items()} == before  # last good version keeps running
    assert after["a"]["State"] == "running"
    assert harness.app("b").status == "running"
    failed = harness.db.last_deployment(a.id)
    assert failed is not None and (failed.status, failed.error_code) == ("failed", "out_of_range")
    # Still broken: no second failed deployment for the same error.
    harness.sync()
    assert len(harness.db.deployments(a.id)) == 2
    # Fixed: the app is running again without its container being touched.
    # Two mistakes in one file: the app and its deployment carry both, not just the first.
    repo.push({"apps/a.yaml": manifest("a", extra="cpu: 99\nmemory_mb: 1\n")}, "break a twice")
    result = harness.sync()
    a = harness.app("a")
    assert a.last_error is not None and a.last_error.splitlines() == result.manifest_errors
    assert len(result.manifest_errors) == 2 and "cpu: 99" in a.last_error and "memory_mb" in a.last_error
    failed = harness.db.last_deployment(a.id)
    assert failed is not None and failed.error == a.last_error
    repo.push({"apps/a.yaml": manifest("a")}, "fix a")
    result = harness.sync()
    assert result.ok
    assert harness.app("a").status == "running" and harness.app("a").last_error is None
    assert harness.app("a").serving is None
    assert harness.containers()["a"]["Id"] == before["a"]


@pytest.mark.parametrize("breakage", ["unreachable", "empty", "no-branch"])
def test_bad_source_tears_nothing_down(repo, harness: Harness, breakage: str) -> None:
    repo.push({"apps/a.yaml": manifest("a"), "apps/b.yaml": manifest("b")})
    harness.sync()
    before = {name: row["Id"] for name, row in harness.containers().items()}
    if breakage == "unreachable":
        shutil.move(repo.bare, repo.bare.with_suffix(".moved"))
    elif breakage == "empty":
        repo.push({"apps": None}, "wipe")
    else:
        harness.src.branch = "gone"
    result = harness.sync()
    assert not result.ok
    assert result.source_error is not None
    code = {"unreachable": "source_unavailable", "empty": "source_empty", "no-branch": "branch_not_found"}[breakage]
    assert result.source_error.startswith(code + ": ")
    assert {name: row["Id"] for name, row in harness.containers().items()} == before
    assert harness.db.meta("last_pass")["source_error"] == result.source_error
    # Self-healing still works from the last good state while the source is bad.
    harness.rt.api.remove_container(before["a"], force=True)
    healed = harness.sync()
    assert harness.containers()["a"]["State"] == "running"
    assert healed.source_error is not None


def test_self_heal_after_kill_and_rm(repo, harness: Harness) -> None:
    repo.push({"apps/a.yaml": manifest("a")})
    harness.sync()
    first = harness.containers()["a"]["Id"]
    harness.rt.api.kill(first)
    result = harness.sync()
    assert result.apps[0].actions == ["start default/a: exited with code 137"]
    assert harness.containers()["a"]["Id"] == first
    assert harness.containers()["a"]["State"] == "running"
    harness.rt.api.remove_container(first, force=True)
    result = harness.sync()
    assert result.apps[0].actions == ["create default/a: missing"]
    deployments = harness.db.deployments(harness.app("a").id)
    assert [d.trigger for d in deployments] == ["self-heal", "self-heal", "poll"]


def test_a_self_heal_pass_puts_back_what_was_fetched_without_fetching(repo, harness: Harness) -> None:
    """A pass woken by a death repairs from the last fetch: a commit pushed since is the next
    poll's (or webhook's), and no round trip to the remote delays the repair."""
    first = repo.push({"apps/a.yaml": manifest("a")})
    assert harness.sync().commit == first
    second = repo.push({"apps/a.yaml": manifest("a", extra="env: {X: '1'}\n")})
    harness.rt.api.remove_container(harness.containers()["a"]["Id"], force=True)
    healed = harness.sync("self-heal")
    assert (healed.commit, healed.apps[0].actions) == (first, ["create default/a: missing"])
    env = harness.rt.api.inspect_container(harness.containers()["a"]["Id"])["Config"]["Env"]
    assert "X=1" not in env
    polled = harness.sync("poll")
    assert polled.commit == second and polled.apps[0].actions[0].startswith("recreate default/a")


def test_missing_local_image_is_never_pulled(repo, harness: Harness) -> None:
    repo.push({"apps/a.yaml": manifest("a", image="cynchrod-test/absent:1"),
               "apps/b.yaml": manifest("b", image="127.0.0.1:1/absent:1")})
    result = harness.sync()
    errors = {a.name: a.error for a in result.apps}
    assert errors["a"] is not None and errors["a"].startswith("image_not_found: ")
    assert errors["b"] is not None and errors["b"].startswith("image_pull_failed: ")
    assert harness.containers() == {}


def test_noop_passes_make_no_engine_call_and_a_resync_one_list(repo, harness: Harness) -> None:
    harness.max_apps["default"] = 50
    repo.push({f"apps/app{i:02d}.yaml": manifest(f"app{i:02d}") for i in range(50)})
    assert harness.sync().ok
    harness.watch()  # the view now follows the engine's events, as in the daemon
    requests: list[str] = []
    harness.rt.api.hooks["response"].append(
        lambda response, *a, **k: requests.append(f"{response.request.method} {response.request.path_url}"))
    parses = harness.rec.caches[harness.src.url].parses
    result = harness.sync()
    assert result.ok and all(a.actions == [] for a in result.apps) and len(result.apps) == 50
    assert requests == []
    assert harness.rec.caches[harness.src.url].parses == parses  # nothing re-parsed
    ids = {n: r["Id"] for n, r in harness.containers().items()}
    requests.clear()
    for _ in range(200):
        assert all(a.actions == [] for a in harness.sync().apps)
    assert requests == []  # no false drift, no recreate, no engine call
    harness.rec.view.resync_s = 0  # a resync is due: one list call, still nothing to do
    assert all(a.actions == [] for a in harness.sync().apps)
    assert len(requests) == 1 and "/containers/json?" in requests[0], requests
    assert {n: r["Id"] for n, r in harness.containers().items()} == ids


def test_a_death_is_seen_by_the_pass_it_wakes(repo, harness: Harness) -> None:
    """The event updates the view itself: the pass it wakes never sees a stale ``running``."""
    repo.push({"apps/a.yaml": manifest("a")})
    assert harness.sync().ok
    harness.watch()
    for _ in range(2):  # a third death in a row would be backed off (crash loop)
        harness.rec.wakeup.wait(0)  # drop what start-up queued
        harness.rt.api.kill(harness.containers()["a"]["Id"])
        assert harness.rec.wakeup.wait(10) == {"self-heal"}
        [outcome] = harness.sync("self-heal").apps
        assert [a.split(":")[0] for a in outcome.actions] == ["start default/a"], outcome
        assert harness.containers()["a"]["State"] == "running"


def test_labels_record_ownership(repo, harness: Harness) -> None:
    repo.push({"apps/a.yaml": manifest("a", extra="env: {X: '1'}\n")})
    harness.sync()
    labels = harness.containers()["a"]["Labels"]
    assert labels[runtime.LABEL_OWNER] == harness.rt.owner
    assert (labels[runtime.LABEL_ORG], labels[runtime.LABEL_APP], labels[runtime.LABEL_SERVICE]) == (
        "default", "a", "main")
    assert len(labels[runtime.LABEL_HASH]) == 16
    assert labels[runtime.LABEL_PATH] == "apps/a.yaml"


def test_missing_image_on_update_keeps_the_running_version(repo, harness: Harness) -> None:
    repo.push({"apps/a.yaml": manifest("a")})
    harness.sync()
    before = harness.containers()["a"]["Id"]
    repo.push({"apps/a.yaml": manifest("a", image="cynchrod-test/absent:2")})
    result = harness.sync()
    assert result.apps[0].status == "failed"
    assert result.apps[0].error is not None and result.apps[0].error.startswith("image_not_found: ")
    row = harness.containers()["a"]
    assert (row["Id"], row["State"]) == (before, "running")
    assert (harness.app("a").status, harness.app("a").serving) == ("failed", "previous")


def test_every_deployment_is_queued_until_a_worker_takes_it(repo, harness: Harness, monkeypatch) -> None:
    repo.push({"apps/a.yaml": manifest("a")})
    seen: list[tuple[list[str], str]] = []
    take = harness.db.start_deployment

    def spy(app_id: str, **kw: Any) -> int:
        seen.append(([d.status for d in harness.db.deployments(app_id)], harness.db.app(app_id).status))  # type: ignore[union-attr]
        return take(app_id, **kw)

    monkeypatch.setattr(harness.db, "start_deployment", spy)
    assert harness.sync().ok
    assert seen == [(["queued"], "queued")]  # what the API showed before the worker took it
    [done] = harness.db.deployments(harness.app("a").id)
    assert (done.status, done.trigger) == ("running", "poll")
