"""A real daemon with an edge, SIGKILLed at each step of a zero-downtime swap."""

from __future__ import annotations

import signal

import docker
import pytest

from tests.conftest import Caddy
from tests.helpers import GitRepo, owned, wait_for
from tests.integration.test_edge import Client, web
from tests.reliability.test_health import health, metric

#: Each step of the swap; the version the edge serves right after a kill there.
POINTS = {"swap-after-create": "v1", "swap-after-start": "v1", "swap-ready": "v1",
          "swap-after-switch": "v2", "swap-after-remove-old": "v2"}


def answer(caddy: Caddy, host: str) -> tuple[int, str] | None:
    try:
        return caddy.fetch(host)
    except OSError:
        return None


@pytest.mark.parametrize("point", list(POINTS))
def test_sigkill_mid_swap_leaves_one_serving_version_and_a_correct_route(
        repo: GitRepo, daemons, owner: str, caddy: Caddy, docker_client: docker.DockerClient, point: str) -> None:
    env = {"CYNCHROD_EDGE": caddy.admin, "CYNCHROD_EDGE_LISTEN": f"127.0.0.1:{caddy.port}",
           "CYNCHROD_EDGE_DRAIN": "2"}
    repo.push({"apps/cr.yaml": web("cr", "v1", domain="cr.localhost")})
    first = daemons(env=env).start()
    wait_for(lambda: answer(caddy, "cr.localhost") == (200, "v1\n"), 30, "v1 through the edge")
    assert first.stop() == 0
    repo.push({"apps/cr.yaml": web("cr", "v2", domain="cr.localhost")})

    crashing = daemons(env={**env, "CYNCHROD_CRASHPOINT": point}).start()
    assert crashing.proc is not None
    assert crashing.proc.wait(timeout=30) == -signal.SIGKILL, crashing.output()
    # Killed mid-swap: the route still leads to one version that answers.
    assert answer(caddy, "cr.localhost") == (200, f"{POINTS[point]}\n")

    with Client(caddy, "cr.localhost") as client:
        healthy = daemons(env=env).start()

        def settled() -> bool:
            rows = owned(docker_client, owner)
            return len(rows) == 1 and rows[0]["State"] == "running" and answer(caddy, "cr.localhost") == (
                200, "v2\n")

        wait_for(lambda: "pass poll" in healthy.output(), 30, "the restarted daemon's first pass")
        wait_for(settled, 30, "one container serving v2")
    assert client.failed == [], client.failed[:5]
    [row] = owned(docker_client, owner)
    port = [p["PublicPort"] for p in row["Ports"] if p.get("PublicPort")]
    route = caddy.get(f"/id/{owner}-edge-cr.localhost")
    assert [u["dial"] for u in route["handle"][0]["upstreams"]] == [f"127.0.0.1:{port[0]}"]
    assert healthy.stop() == 0


def test_a_killed_edge_shows_on_healthz_and_gets_its_routes_back(
        repo: GitRepo, daemons, owner: str, caddy: Caddy) -> None:
    """Caddy killed: /healthz names ``edge_unavailable`` (503) and /metrics has the edge down, with
    no pass needed to notice; Caddy restarted (from its own config, without our routes): the
    routes are back within one liveness probe, and /healthz is healthy again."""
    env = {"CYNCHROD_EDGE": caddy.admin, "CYNCHROD_EDGE_LISTEN": f"127.0.0.1:{caddy.port}"}
    repo.push({"apps/ke.yaml": web("ke", "v1", domain="ke.localhost")})
    daemon = daemons(interval=300, env=env).start()
    wait_for(lambda: answer(caddy, "ke.localhost") == (200, "v1\n"), 30, "v1 through the edge")
    wait_for(lambda: health(daemon.api) == (200, []), 15, "healthy")

    caddy.stop()
    wait_for(lambda: "edge_unavailable" in health(daemon.api)[1], 40, "edge_unavailable on /healthz")
    assert health(daemon.api)[0] == 503
    assert metric(daemon.api, "cynchrod_edge_up") == 0

    caddy.start()
    wait_for(lambda: answer(caddy, "ke.localhost") == (200, "v1\n"), 20, "the routes back in the new Caddy")
    wait_for(lambda: health(daemon.api) == (200, []), 20, "healthy again")
    assert metric(daemon.api, "cynchrod_edge_up") == 1
    assert "pass " not in daemon.output().split("edge unavailable")[-1]  # no pass was needed
    assert daemon.stop() == 0
