"""Fault injection in the runtime: a unit removed or killed at each step of an apply.

``CYNCHROD_FAULT=<remove|kill>@<step>`` makes the Docker driver hurt the unit just
before that engine call, as a person running ``docker rm -f`` or the OOM killer
might. Whatever the step, the pass goes on, the other app is untouched, the app
is never left ``deploying`` or ``queued``, and the next pass (after its back-off)
converges.
"""

from __future__ import annotations

import socket
import time

import pytest

from tests.conftest import Harness
from tests.helpers import manifest

#: A declared port is served: a deployment is ready once it accepts (docs/health.md).
SERVED = "[httpd, -f, -p, '8080']"

CASES = [
    ("remove@remove", "recreate"), ("remove@start", "recreate"), ("kill@start", "recreate"),
    ("remove@port", "recreate"), ("remove@start", "start"), ("remove@port", "start"),
    ("remove@stop", "stop"), ("kill@stop", "stop"),
]


@pytest.mark.parametrize(("fault", "change"), CASES, ids=[f"{f}-{c}" for f, c in CASES])
def test_a_fault_at_each_apply_step_is_the_apps_own_retried_error(repo, harness: Harness, monkeypatch,
                                                                  fault: str, change: str) -> None:
    repo.push({"apps/a.yaml": manifest("a", command=SERVED, extra="port: 8080\n"), "apps/b.yaml": manifest("b")})
    assert harness.sync().ok
    b_before = harness.containers()["b"]["Id"]
    if change == "recreate":
        repo.push({"apps/a.yaml": manifest("a", command=SERVED, extra="port: 8080\nenv: {V: '2'}\n")})
    elif change == "start":
        harness.rt.api.kill(harness.containers()["a"]["Id"])
    else:
        repo.push({"apps/a.yaml": manifest("a", command=SERVED, extra="port: 8080\nstate: stopped\n")})
    monkeypatch.setenv("CYNCHROD_FAULT", fault)
    result = harness.sync()  # never raises: the fault is app a's own error
    outcome = {a.name: a for a in result.apps}
    assert outcome["b"].status == "running" and outcome["b"].actions == []
    app = harness.app("a")
    assert app.status in ("running", "stopped", "failed"), app
    assert all(d.status not in ("deploying", "queued") for d in harness.db.deployments(app.id))
    if app.status == "failed":
        assert app.last_error is not None and app.last_error.split(":")[0] in ("unit_gone", "runtime_error"), app

    monkeypatch.delenv("CYNCHROD_FAULT")
    later = time.monotonic() + 600
    harness.rec._clock = lambda: later  # past any back-off
    harness.sync()
    want = "exited" if change == "stop" else "running"
    containers = [c for c in harness.rt.api.containers(all=True, filters=harness.rt.owner_filter)
                  if c["Labels"]["io.cynchrod.app"] == "a"]
    if change == "stop" and not containers:
        return  # removed by the fault while stopping: a stopped app with no unit is in sync
    assert [c["State"] for c in containers] == [want], containers
    assert harness.app("a").status == ("stopped" if change == "stop" else "running")
    assert harness.containers()["b"]["Id"] == b_before


def test_a_host_port_held_outside_cynchrod_is_port_in_use_every_time_and_leaves_nothing(
        repo, harness: Harness) -> None:
    """A process outside Docker holds the app's hostPort: each try says ``port_in_use`` with the
    port (not ``name_in_use`` from the half-made container of the try before), leaves no container
    behind, and once the port is free the app runs."""
    holder = socket.socket()
    holder.bind((harness.rt.publish_address, 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        repo.push({"apps/a.yaml": manifest("a", command=SERVED, extra=f"port: 8080\nhostPort: {port}\n")})
        later = time.monotonic()
        for _ in range(3):
            harness.sync()
            app = harness.app("a")
            assert app.status == "failed" and (app.last_error or "").startswith("port_in_use"), app.last_error
            assert str(port) in (app.last_error or "")
            assert harness.rt.api.containers(all=True, filters=harness.rt.owner_filter) == []
            later += 600
            harness.rec._clock = lambda t=later: t  # past the back-off
    finally:
        holder.close()
    later += 600
    harness.sync()
    assert harness.app("a").status == "running"
