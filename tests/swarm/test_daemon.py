"""``cynchrod serve --runtime swarm`` on the lab: a node goes down, its tasks are placed
elsewhere, the daemon's view follows (node events, then its poll) and nothing is lost."""

from __future__ import annotations

import json
import pathlib
import subprocess

import pytest

from cynchrod import store
from tests.helpers import Daemon, GitRepo, wait_for
from tests.swarm.conftest import LAB, Lab

pytestmark = [pytest.mark.swarm, pytest.mark.xdist_group("swarm")]  # one lab per machine: one worker


def test_node_stopped_tasks_rescheduled_status_recovers(lab: Lab, swarm_owner: str, tmp_path: pathlib.Path) -> None:
    repo = GitRepo(tmp_path)
    repo.push({"apps/api.yaml": f"name: api\nimage: {lab.image}\ncommand: [sleep, '3600']\nreplicas: 3\n"
                                "cpu: 0.1\nmemory: 64\n"})
    state = tmp_path / "state"
    daemon = Daemon(repo, state, swarm_owner, env={"DOCKER_HOST": lab.docker_host, "CYNCHROD_RUNTIME": "swarm"})
    daemon.start()
    db = None
    try:
        wait_for(lambda: (state / "cynchrod.db").exists(), 20, "the store")
        db = store.Store(state / "cynchrod.db")

        def services() -> list[dict]:  # type: ignore[type-arg]
            app = db.live_apps().get(("default", "api"))
            return json.loads(app.services_json or "[]") if app is not None and app.services_json else []

        def running_on(nodes: set[str]) -> bool:
            units = services()[0]["units"] if services() else []
            return (len(units) == 3 and all(u["state"] == "running" for u in units)
                    and {u["node"] for u in units} <= nodes)

        wait_for(lambda: running_on(set(lab.nodes)), 30, "api to run, 3 replicas")
        # Where the three tasks go is the scheduler's choice (spread, weighed by what the previous test's
        # services still hold on a node while they go): stop a node that runs one of them.
        used = {u["node"] for u in services()[0]["units"]}
        assert used <= set(lab.nodes), used
        last = sorted(used)[-1]
        number = last[len(last.rstrip("0123456789")):]
        subprocess.run([str(LAB), "stop-node", number], check=True, timeout=60)
        try:
            # The node is seen Down after ~8 s; its task is placed on another node; the view follows.
            took = wait_for(lambda: running_on(set(lab.nodes) - {last}), 60, "the task to be rescheduled")
        finally:
            subprocess.run([str(LAB), "start-node", number], check=True, timeout=60)
        app = db.live_apps()[("default", "api")]
        assert app.status == "running" and app.last_error is None, (app, took)
        deployments = db.deployments(app.id)
        assert [d.status for d in deployments] == ["running"], deployments  # healed by the swarm, not redeployed
        manager = lab.client()
        wait_for(lambda: all(n["Status"]["State"] == "ready" for n in manager.api.nodes()), 30, "the node to rejoin")
        manager.close()
    finally:
        daemon.stop()
        if db is not None:
            db.close()
    assert "Traceback" not in daemon.output(), daemon.output()
