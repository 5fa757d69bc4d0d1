"""Health-gated deploys on the lab's swarm: the same statuses as on one host (``shell.gates``,
``core.health``), from Swarm's task states (``SwarmRuntime.ended``, ``task_health``). One test, one
set of apps deployed together (the lab is slow to act on): a healthcheck that never passes, one
that never answers, a crash, a oneshot, and a web app rolled back to its previous version."""

from __future__ import annotations

import datetime
import urllib.request

import pytest

from cynchrod import store
from cynchrod.runtime import swarm
from cynchrod.shell import reconciler
from tests.helpers import wait_for
from tests.swarm.conftest import Lab, SwarmHarness

pytestmark = [pytest.mark.swarm, pytest.mark.xdist_group("swarm")]  # one lab per machine: one worker

PORT = 18093


def app(lab: Lab, name: str, command: str, extra: str = "") -> str:
    return f"name: {name}\nimage: {lab.image}\ncommand: {command}\ncpu: 0.1\nmemory: 64\n{extra}"


def served(lab: Lab, version: str, extra: str = "") -> str:
    serve = f"[sh, -c, 'mkdir -p /w && echo {version} > /w/index.html && exec httpd -f -p 8080 -h /w']"
    return app(lab, "web", serve, f"port: 8080\nhostPort: {PORT}\non_failure: rollback\n{extra}")


def last_deployment(sw: SwarmHarness, name: str) -> store.Deployment:
    return max(sw.db.deployments(sw.app(name).id, limit=50), key=lambda d: d.id)


def seconds(deployment: store.Deployment) -> float:
    start, end = (datetime.datetime.fromisoformat(t.replace("Z", "+00:00"))
                  for t in (deployment.started_at, deployment.finished_at or ""))
    return (end - start).total_seconds()


def fetch(sw: SwarmHarness) -> str:
    """What the web app's running task serves, on its node's address (host-mode port)."""
    name = sw.rt.service_name("default", "web", "main")
    tasks = [t for t in sw.tasks(name) if t["Status"]["State"] == "running"]
    if len(tasks) != 1:
        return ""
    address = sw.api.inspect_node(tasks[0]["NodeID"])["Status"]["Addr"]
    try:
        with urllib.request.urlopen(f"http://{address}:{PORT}/", timeout=5) as answer:
            return str(answer.read().decode().strip())
    except OSError:
        return ""


def test_swarm_deploys_are_gated_unhealthy_crashed_completed_and_rolled_back(sw: SwarmHarness, lab: Lab) -> None:
    sw.repo.push({  # type: ignore[attr-defined]
        "apps/sick.yaml": app(lab, "sick", "[sh, -c, 'echo warming up the sick app; exec sleep 3600']",
                              "health_timeout: 30\nhealthcheck: {test: [CMD, 'false'], interval: 0.5, retries: 1}\n"),
        "apps/slow.yaml": app(lab, "slow", "[sleep, '3600']",
                              "health_timeout: 3\nhealthcheck: {test: [CMD, 'false'], interval: 3600, "
                              "start_period: 3600}\n"),
        "apps/crash.yaml": app(lab, "crash", "[sh, -c, 'echo no database here; exit 3']"),
        "apps/migrate.yaml": app(lab, "migrate", "[sh, -c, 'echo migrated']", "oneshot: true\n"),
        "apps/web.yaml": served(lab, "v1"),
    })
    result = sw.sync()
    by_name = {a.name: a for a in result.apps}
    assert {n: a.status for n, a in by_name.items()} == {
        "crash": "failed", "migrate": "completed", "sick": "failed", "slow": "failed", "web": "running"}, result

    # A healthcheck that fails: Swarm kills the task (and starts another); the deployment is
    # unhealthy within its timeout, its log kept.
    sick = last_deployment(sw, "sick")
    assert (sick.status, sick.error_code) == ("unhealthy", "unhealthy"), sick
    assert sick.error is not None and sick.error.startswith("service main: its healthcheck reports unhealthy")
    assert seconds(sick) < 30
    assert sick.log is not None and "warming up the sick app" in sick.log
    assert sw.app("sick").last_error == f"unhealthy: {sick.error}"
    # One that never answers: not healthy within its health_timeout.
    slow = last_deployment(sw, "slow")
    assert (slow.status, slow.error) == ("unhealthy", "service main was not healthy within 3s"), slow
    assert 3 <= seconds(slow) < 15
    # A crash: crashed with its exit code and its last lines, though the swarm restarts the task.
    crash = last_deployment(sw, "crash")
    assert (crash.status, crash.error) == ("crashed", "service main exited with code 3"), crash
    assert crash.log is not None and "no database here" in crash.log
    # A oneshot that exits 0: completed, its task not restarted, nothing to do on the next pass.
    assert last_deployment(sw, "migrate").status == "completed"
    again = {a.name: a for a in sw.rec.run_pass().apps}
    assert (again["migrate"].status, again["migrate"].actions) == ("completed", [])
    migrate = sw.rt.service_name("default", "migrate", "main")
    assert [t["Status"]["State"] for t in sw.api.tasks(filters={"service": migrate})] == ["complete"]
    # The swarm's own update config says the same: keep lets an update go on, rollback rolls back.
    services = sw.services()
    assert services[sw.rt.service_name("default", "sick", "main")]["Spec"]["UpdateConfig"]["FailureAction"] \
        == "continue"
    assert services[sw.rt.service_name("default", "web", "main")]["Spec"]["UpdateConfig"]["FailureAction"] \
        == "rollback"

    # on_failure: rollback: v2 never turns healthy; v1 serves again, Git still declares v2.
    wait_for(lambda: fetch(sw) == "v1", 30, "v1 to serve")
    v1_spec = sw.app("web").healthy_spec
    assert v1_spec is not None
    sw.repo.push({"apps/web.yaml": served(lab, "v2", "healthcheck: {test: [CMD, 'false'], interval: 0.5, "  # type: ignore[attr-defined]
                                                     "retries: 1}\n")})
    sw.sync()
    web = sw.app("web")
    assert (web.status, web.serving) == ("failed", "previous"), web
    assert web.last_error is not None and web.last_error.startswith("unhealthy: service main: its healthcheck")
    assert web.last_error.endswith("rolled back to the previous version")
    # The swarm rolls the update back itself (failure_action: rollback) as it stops the failed task.
    # When the view held that when the verdict came, putting v1 back took no deployment of cynchrod's;
    # when the pass after the verdict read the service before the swarm's rollback began (seen in CI
    # with the lab beside the rest of the suite), cynchrod put v1 back itself, as on one host: a
    # ``rollback`` deployment of v1's spec. Either way v1 serves and the v2 deployment is unhealthy.
    rows = sw.db.deployments(web.id)
    if rows[0].trigger == "rollback":
        assert rows[0].status == "running" and rows[0].spec_hash == rows[2].spec_hash, rows[:3]
        rows = rows[1:]
    assert [d.status for d in rows][:2] == ["unhealthy", "running"], rows[:3]
    assert rows[0].spec_hash != rows[1].spec_hash
    wait_for(lambda: fetch(sw) == "v1", 30, "v1 to serve again")
    assert "v2" in (sw.repo.work / "apps" / "web.yaml").read_text()  # type: ignore[attr-defined]
    assert sw.app("web").healthy_spec == v1_spec

    # A restarted daemon (a new reconciler and driver on the same store) keeps the verdicts: the
    # failed spec is not deployed again, the kept ones stay failed.
    deployments = len(sw.db.deployments(web.id, limit=50))
    rt = swarm.SwarmRuntime(owner=sw.rt.owner, instance=sw.db.instance_id(), stop_timeout=1,
                            base_url=lab.docker_host, registry=sw.registry)
    try:
        rec = reconciler.Reconciler(src=sw.src, rt=rt, db=sw.db, secrets=sw.secrets)
        after = {a.name: a for a in rec.sync().apps}
        assert after["web"].actions == [] and (sw.app("web").status, sw.app("web").serving) == ("failed", "previous")
        assert len(sw.db.deployments(web.id, limit=50)) == deployments
        assert (after["sick"].status, after["migrate"].status) == ("failed", "completed")
        assert fetch(sw) == "v1"
        # A new commit is deployed and judged as any other.
        sw.repo.push({"apps/web.yaml": served(lab, "v3")})  # type: ignore[attr-defined]
        rec.sync()
        assert sw.app("web").status == "running"
        wait_for(lambda: fetch(sw) == "v3", 30, "v3 to serve")
    finally:
        rt.close()
