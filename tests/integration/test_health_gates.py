"""Health-gated deploys against a real dockerd: a deployment is ``deploying`` until its units are
ready, then ``running``; a crash, an unhealthy unit or a oneshot's exit decide it otherwise
(``shell.gates``, ``core.health``)."""

from __future__ import annotations

import datetime
import urllib.request

import docker

from cynchrod import store
from tests.conftest import Harness
from tests.helpers import TEST_IMAGE, free_port


def manifest(name: str, *, command: str = "[sleep, '3600']", extra: str = "") -> str:
    return f"name: {name}\nimage: {TEST_IMAGE}\ncommand: {command}\nmemory: 64\n{extra}"


def first_deployment(harness: Harness, name: str) -> store.Deployment:
    return min(harness.db.deployments(harness.app(name).id, limit=50), key=lambda d: d.id)


def test_a_deploy_is_deploying_until_up_for_min_ready_then_running(repo, harness: Harness) -> None:
    repo.push({"apps/a.yaml": manifest("a", extra="min_ready: 1\n")})
    first = harness.rec.run_pass("poll")
    assert [a.status for a in first.apps] == ["deploying"]
    assert harness.app("a").status == "deploying"
    assert first_deployment(harness, "a").status == "deploying"
    harness.sync("self-heal")  # waits for the gate
    app = harness.app("a")
    assert app.status == "running"
    done = first_deployment(harness, "a")
    assert done.status == "running" and done.finished_at is not None


def test_a_healthcheck_that_never_passes_is_unhealthy_within_its_timeout_with_its_log_kept(
        repo, harness: Harness, docker_client: docker.DockerClient) -> None:
    text = manifest("sick", command="[sh, -c, 'echo warming up the sick app; sleep 3600']",
                    extra="health_timeout: 2\n"
                          "healthcheck: {test: [CMD, 'false'], interval: 3600, start_period: 3600}\n")
    repo.push({"apps/sick.yaml": text})
    result = harness.sync()
    assert [a.status for a in result.apps] == ["failed"]
    app = harness.app("sick")
    assert app.status == "failed" and app.last_error is not None
    assert app.last_error.startswith("unhealthy: service main was not healthy within 2s")
    deployment = first_deployment(harness, "sick")
    assert (deployment.status, deployment.error_code) == ("unhealthy", "unhealthy")
    started = datetime.datetime.fromisoformat(deployment.started_at.replace("Z", "+00:00"))
    finished = datetime.datetime.fromisoformat((deployment.finished_at or "").replace("Z", "+00:00"))
    assert 1 <= (finished - started).total_seconds() <= 10
    # on_failure: keep (the default): the failed version is left for inspection, and stays failed.
    assert [c["State"] for c in harness.containers().values()] == ["running"]
    assert harness.sync().apps[0].status == "failed"
    # Its last lines outlive the container.
    docker_client.api.remove_container(harness.containers()["sick"]["Id"], force=True)
    kept = harness.db.deployment(deployment.id)
    assert kept is not None and kept.log is not None and "warming up the sick app" in kept.log


def test_a_reported_unhealthy_fails_at_once(repo, harness: Harness) -> None:
    repo.push({"apps/bad.yaml": manifest("bad", extra="healthcheck: {test: [CMD, 'false'], interval: 0.2, "
                                                      "retries: 1}\n")})
    harness.sync()
    app = harness.app("bad")
    assert app.status == "failed" and app.last_error == "unhealthy: service main: its healthcheck reports unhealthy"


def test_a_healthy_healthcheck_makes_it_running(repo, harness: Harness) -> None:
    repo.push({"apps/ok.yaml": manifest("ok", extra="healthcheck: {test: 'exit 0', interval: 0.2}\n")})
    harness.sync()
    assert harness.app("ok").status == "running"
    assert first_deployment(harness, "ok").status == "running"


def test_a_crash_is_crashed_with_its_exit_code_and_its_log(repo, harness: Harness) -> None:
    # Up for 5 s before it is ready: it exits well within them, however loaded the machine.
    repo.push({"apps/boom.yaml": manifest("boom", command="[sh, -c, 'echo about to fail; exit 3']",
                                          extra="min_ready: 5\n")})
    harness.sync()
    deployment = first_deployment(harness, "boom")
    assert (deployment.status, deployment.error_code) == ("crashed", "crashed")
    assert deployment.error == "service main exited with code 3"
    assert deployment.log is not None and "about to fail" in deployment.log
    assert harness.app("boom").status == "failed"


def test_a_oneshot_migration_gates_its_dependent(repo, harness: Harness,
                                                 docker_client: docker.DockerClient) -> None:
    text = (f"name: shop\nservices:\n"
            f"  migrate:\n    image: {TEST_IMAGE}\n    command: [sh, -c, 'sleep 1; echo migrated']\n"
            f"    oneshot: true\n    memory: 64\n"
            f"  web:\n    image: {TEST_IMAGE}\n    command: [sleep, '3600']\n    memory: 64\n"
            f"    depends_on: {{migrate: {{condition: service_completed_successfully}}}}\n")
    repo.push({"apps/shop.yaml": text})
    first = harness.rec.run_pass("poll")
    made = [c["Labels"]["io.cynchrod.service"] for c in docker_client.api.containers(
        all=True, filters=harness.rt.owner_filter)]
    assert made == ["migrate"]  # web waits for it to complete
    assert [a.status for a in first.apps] == ["deploying"]
    harness.sync("self-heal")
    rows = {c["Labels"]["io.cynchrod.service"]: c for c in docker_client.api.containers(
        all=True, filters=harness.rt.owner_filter)}
    migrate = docker_client.api.inspect_container(rows["migrate"]["Id"])["State"]
    web = docker_client.api.inspect_container(rows["web"]["Id"])["State"]
    assert (migrate["Status"], migrate["ExitCode"], web["Status"]) == ("exited", 0, "running")
    assert web["StartedAt"] > migrate["FinishedAt"]
    assert harness.app("shop").status == "running"
    [deployment] = harness.db.deployments(harness.app("shop").id)
    assert deployment.status == "running"
    # The completed oneshot is not restarted.
    again = harness.sync()
    assert [a.actions for a in again.apps] == [[]]


def test_a_failed_migration_never_starts_its_dependent(repo, harness: Harness) -> None:
    text = (f"name: shop\nservices:\n"
            f"  migrate:\n    image: {TEST_IMAGE}\n    command: [sh, -c, 'echo no database; exit 1']\n"
            f"    oneshot: true\n    memory: 64\n"
            f"  web:\n    image: {TEST_IMAGE}\n    command: [sleep, '3600']\n    memory: 64\n"
            f"    depends_on: {{migrate: {{condition: service_completed_successfully}}}}\n")
    repo.push({"apps/shop.yaml": text})
    harness.sync()
    services = sorted(c["Labels"]["io.cynchrod.service"] for c in harness.rt.api.containers(
        all=True, filters=harness.rt.owner_filter))
    assert services == ["migrate"]
    deployment = first_deployment(harness, "shop")
    assert (deployment.status, deployment.error) == ("crashed", "service migrate exited with code 1")
    assert deployment.log is not None and "no database" in deployment.log


def served(version: str, port: int, extra: str = "") -> str:
    return (f"name: web\nimage: {TEST_IMAGE}\nmemory: 64\nport: 8080\nhostPort: {port}\non_failure: rollback\n"
            f"command: [sh, -c, 'mkdir -p /w && echo {version} > /w/index.html && exec httpd -f -p 8080 -h /w']\n"
            f"{extra}")


def test_with_on_failure_rollback_the_previous_version_serves_again(repo, harness: Harness) -> None:
    port = free_port()
    repo.push({"apps/web.yaml": served("v1", port)})
    harness.sync()
    assert harness.app("web").status == "running"
    assert fetch(port) == "v1"
    v1_spec = harness.app("web").healthy_spec
    assert v1_spec is not None

    failing = "healthcheck: {test: [CMD, 'false'], interval: 0.2, retries: 1}\n"
    repo.push({"apps/web.yaml": served("v2", port, failing)})
    harness.sync()
    app = harness.app("web")
    assert (app.status, app.serving) == ("failed", "previous")
    assert app.last_error is not None and app.last_error.startswith("unhealthy: service main: its healthcheck")
    assert app.last_error.endswith("rolled back to the previous version")
    assert fetch(port) == "v1"  # put back on the engine
    deployments = harness.db.deployments(app.id)
    assert [d.status for d in deployments][:2] == ["running", "unhealthy"]
    assert deployments[0].trigger == "rollback"
    assert harness.app("web").healthy_spec == v1_spec  # the failed version never was healthy
    # Not in Git: the repository still declares v2, and the app stays failed until a new commit.
    assert "v2" in (repo.work / "apps" / "web.yaml").read_text()
    again = harness.sync()
    assert [a.actions for a in again.apps] == [[]] and harness.app("web").status == "failed"

    repo.push({"apps/web.yaml": served("v3", port)})
    harness.sync()
    assert (harness.app("web").status, fetch(port)) == ("running", "v3")


def test_without_a_healthy_version_a_rollback_keeps_the_failed_one(repo, harness: Harness) -> None:
    port = free_port()
    failing = "healthcheck: {test: [CMD, 'false'], interval: 0.2, retries: 1}\n"
    repo.push({"apps/web.yaml": served("v1", port, failing)})
    harness.sync()
    app = harness.app("web")
    assert (app.status, app.serving) == ("failed", None)
    assert [c["State"] for c in harness.containers().values()] == ["running"]


def fetch(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as answer:
        return str(answer.read().decode().strip())


# -- a daemon restart: what the gates judged is kept in the store -----------------------------------


def restarted(repo, harness: Harness, owner: str) -> Harness:  # type: ignore[no-untyped-def]
    """The same state dir and engine under a new reconciler, as a restarted daemon starts it:
    the deployments left ``deploying`` are interrupted first (``daemon.wiring``)."""
    harness.close()
    again = Harness(repo.url, harness.state, owner)
    again.db.interrupt_unfinished()
    return again


def test_after_a_restart_a_rolled_back_app_stays_failed_with_the_previous_version_running(
        repo, harness: Harness, owner: str) -> None:
    port = free_port()
    repo.push({"apps/web.yaml": served("v1", port)})
    harness.sync()
    failing = "healthcheck: {test: [CMD, 'false'], interval: 0.2, retries: 1}\n"
    repo.push({"apps/web.yaml": served("v2", port, failing)})
    harness.sync()
    assert (harness.app("web").status, fetch(port)) == ("failed", "v1")
    deployments = len(harness.db.deployments(harness.app("web").id, limit=50))

    again = restarted(repo, harness, owner)
    try:
        result = again.sync()
        # The failed spec is not deployed again: v1 keeps serving, and the app stays failed.
        assert [a.actions for a in result.apps] == [[]]
        app = again.app("web")
        assert (app.status, app.serving) == ("failed", "previous")
        assert app.last_error is not None and app.last_error.endswith("rolled back to the previous version")
        assert fetch(port) == "v1"
        assert len(again.db.deployments(app.id, limit=50)) == deployments
        # A new commit is deployed and judged as any other.
        repo.push({"apps/web.yaml": served("v3", port)})
        again.sync()
        assert (again.app("web").status, fetch(port)) == ("running", "v3")
    finally:
        again.close()


def test_after_a_restart_an_app_kept_unhealthy_shows_its_judged_status(repo, harness: Harness, owner: str) -> None:
    repo.push({"apps/bad.yaml": manifest("bad", extra="healthcheck: {test: [CMD, 'false'], interval: 0.2, "
                                                      "retries: 1}\n")})
    harness.sync()
    error = harness.app("bad").last_error
    assert harness.app("bad").status == "failed"

    again = restarted(repo, harness, owner)
    try:
        assert [a.status for a in again.sync().apps] == ["failed"]
        app = again.app("bad")
        assert (app.status, app.last_error) == ("failed", error)
    finally:
        again.close()


def test_after_a_restart_a_deployment_being_judged_is_judged_again(repo, harness: Harness, owner: str) -> None:
    repo.push({"apps/slow.yaml": manifest("slow", extra="health_timeout: 3\n"
                                                        "healthcheck: {test: [CMD, 'false'], interval: 3600, "
                                                        "start_period: 3600}\n")})
    assert [a.status for a in harness.rec.run_pass("poll").apps] == ["deploying"]
    deployment = first_deployment(harness, "slow")

    again = restarted(repo, harness, owner)
    try:
        assert again.db.deployment(deployment.id).status == "deploying"  # type: ignore[union-attr]
        again.sync()
        app = again.app("slow")
        assert app.status == "failed" and (app.last_error or "").startswith("unhealthy: service main was not")
        judged = again.db.deployment(deployment.id)
        assert judged is not None and judged.status == "unhealthy"
    finally:
        again.close()
