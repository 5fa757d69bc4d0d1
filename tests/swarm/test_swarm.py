"""The swarm runtime against a real three-node swarm (``scripts/swarm-lab``): placement,
limits, names across nodes, secrets, drift, failures the swarm would retry forever."""

from __future__ import annotations

import collections
import json
import threading
import time
import urllib.request

import docker
import pytest

from cynchrod.core import planning
from tests.helpers import breaks, numbers_until, wait_for
from tests.swarm.conftest import Lab, SwarmHarness

pytestmark = [pytest.mark.swarm, pytest.mark.xdist_group("swarm")]  # one lab per machine: one worker


def app(lab: Lab, name: str, extra: str = "", command: str = "[sleep, '3600']") -> str:
    return f"name: {name}\nimage: {lab.image}\ncommand: {command}\ncpu: 0.1\nmemory: 64\n{extra}"


def container(lab: Lab, task: dict) -> tuple[str, docker.models.containers.Container]:  # type: ignore[type-arg]
    """The node (hostname) a task runs on and its container, through that node's own engine."""
    manager = lab.client()
    try:
        node = manager.api.inspect_node(task["NodeID"])["Description"]["Hostname"]
    finally:
        manager.close()
    client = lab.client(node)
    return node, client.containers.get(task["Status"]["ContainerStatus"]["ContainerID"])


def test_replicas_spread_over_three_nodes_with_limits_and_a_one_call_resync(sw: SwarmHarness, lab: Lab) -> None:
    sw.repo.push({"apps/spread.yaml": app(lab, "spread", "replicas: 3\n")})  # type: ignore[attr-defined]
    result = sw.sync()
    assert [a.status for a in result.apps] == ["running"], result
    name = sw.rt.service_name("default", "spread", "main")
    tasks = sw.tasks(name)
    assert len(tasks) == 3 and all(t["Status"]["State"] == "running" for t in tasks)
    nodes = set()
    for task in tasks:
        node, c = container(lab, task)
        nodes.add(node)
        host = c.attrs["HostConfig"]
        assert host["NanoCpus"] == 100_000_000 and host["Memory"] == 64 * 1024 * 1024
        assert c.labels["io.cynchrod.app"] == "spread"
    assert nodes == set(lab.nodes), nodes
    # Reservations equal to the limits: the scheduler only places what fits.
    resources = sw.services()[name]["Spec"]["TaskTemplate"]["Resources"]
    assert resources["Reservations"] == resources["Limits"] == {"NanoCPUs": 100_000_000, "MemoryBytes": 64 << 20}
    units = sw.rt.list_units()
    assert sorted(u.replica for u in units) == [0, 1, 2] and {u.node for u in units} == set(lab.nodes)
    assert all(u.state == planning.RUNNING for u in units)
    # A pass with nothing to do: its relist is one services list and one tasks list, nothing else.
    before = sw.rt.calls
    again = sw.rec.run_pass()
    assert [a.actions for a in again.apps] == [[]]
    assert sw.rt.calls - before == 2
    row = sw.app("spread")
    assert row.status == "running"


def test_web_reaches_db_by_name_on_another_node(sw: SwarmHarness, lab: Lab) -> None:
    serve = "[sh, -c, 'mkdir -p /www && echo db-says-hi > /www/index.html && exec httpd -f -p 8080 -h /www']"
    sw.repo.push({"apps/shop.yaml": (  # type: ignore[attr-defined]
        "name: shop\nservices:\n"
        f"  db:\n    image: {lab.image}\n    command: {serve}\n    cpu: 0.1\n    memory: 64\n"
        f"  web:\n    image: {lab.image}\n    command: [sleep, '3600']\n    cpu: 0.1\n    memory: 64\n"
        "    replicas: 2\n    depends_on: [db]\n")})
    result = sw.sync()
    assert [a.status for a in result.apps] == ["running"], result
    db_node = container(lab, sw.tasks(sw.rt.service_name("default", "shop", "db"))[0])[0]
    webs = [container(lab, t) for t in sw.tasks(sw.rt.service_name("default", "shop", "web"))]
    away = [c for node, c in webs if node != db_node]
    assert away, "spread placement put no web task beside the db's node"
    # busybox's own resolver, then nc to the address (the static busybox's wget crashes on overlay
    # addresses here, and its libc lookup of a name needs NSS libraries the image does not have).
    code, out = away[0].exec_run(["nslookup", "db"])
    assert code == 0, out
    address = [line.split()[-1] for line in out.decode().splitlines() if line.startswith("Address: ")][-1]
    code, out = away[0].exec_run(["sh", "-c", f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {address} 8080"])
    assert code == 0 and out.decode().splitlines()[-1] == "db-says-hi", out
    network = sw.api.inspect_network(sw.rt.network_name("default", "shop"))
    assert network["Driver"] == "overlay" and network["Attachable"] and network["Labels"]["io.cynchrod.app"] == "shop"
    assert sw.services()[sw.rt.service_name("default", "shop", "db")]["Spec"]["EndpointSpec"]["Mode"] == "dnsrr"


def test_secret_read_on_a_worker_then_rotated(sw: SwarmHarness, lab: Lab) -> None:
    sw.secrets.set("default", "token", b"first-value")
    sw.repo.push({"apps/vault.yaml": app(lab, "vault", "replicas: 3\nsecrets: [token]\n")})  # type: ignore[attr-defined]
    assert [a.status for a in sw.sync().apps] == ["running"]
    assert not (sw.secrets.staging / "default").exists()  # nothing staged on a disk
    name = sw.rt.service_name("default", "vault", "main")
    manager = next(iter(lab.nodes))

    def read_all() -> set[str]:
        seen = collections.defaultdict(set)
        for task in sw.tasks(name):
            node, c = container(lab, task)
            code, out = c.exec_run(["cat", "/run/secrets/token"])
            assert code == 0
            seen[node].add(out.decode())
        assert set(seen) - {manager}, "no task on a worker"
        return set().union(*seen.values())

    assert read_all() == {"first-value"}
    owned = {"label": [f"io.cynchrod.owner={sw.rt.owner}"]}
    first = [s["Spec"]["Name"] for s in sw.api.secrets(filters=owned)]
    assert len(first) == 1 and "first-value" not in first[0]
    sw.secrets.set("default", "token", b"second-value")
    result = sw.sync()
    assert [a.status for a in result.apps] == ["running"], result
    assert read_all() == {"second-value"}
    second = [s["Spec"]["Name"] for s in sw.api.secrets(filters=owned)]
    assert len(second) == 1 and second != first  # the old version is removed


def test_drift_by_hand_is_put_back(sw: SwarmHarness, lab: Lab) -> None:
    serve = "[sh, -c, 'mkdir -p /www && echo a-says-hi > /www/index.html && exec httpd -f -p 8080 -h /www']"
    port = 18090
    sw.repo.push({"apps/a.yaml": app(lab, "a", f"port: 8080\nhostPort: {port}\n", command=serve),  # type: ignore[attr-defined]
                  "apps/b.yaml": app(lab, "b")})
    assert [x.status for x in sw.sync().apps] == ["running", "running"]
    a, b = (sw.rt.service_name("default", n, "main") for n in ("a", "b"))
    # Published in host mode on the node that runs the task; a fixed host port updates stop-first.
    task = sw.tasks(a)[0]
    address = sw.api.inspect_node(task["NodeID"])["Status"]["Addr"]
    with urllib.request.urlopen(f"http://{address}:{port}/", timeout=5) as response:
        assert response.read() == b"a-says-hi\n"
    assert sw.app("a").host_port == port
    assert sw.services()[a]["Spec"]["UpdateConfig"]["Order"] == "stop-first"
    assert sw.services()[b]["Spec"]["UpdateConfig"]["Order"] == "start-first"
    svc = sw.api.inspect_service(a)
    template = svc["Spec"]["TaskTemplate"]
    template["ContainerSpec"]["Env"] = ["BY_HAND=1"]
    sw.api.update_service(svc["ID"], svc["Version"]["Index"], task_template=template, name=a,
                          labels=svc["Spec"]["Labels"], mode=svc["Spec"]["Mode"],
                          endpoint_spec=svc["Spec"].get("EndpointSpec"))
    sw.api.remove_service(b)
    result = sw.sync()
    assert [x.status for x in result.apps] == ["running", "running"], result
    assert any("recreate" in line for line in result.apps[0].actions), result.apps[0]
    assert any("create" in line for line in result.apps[1].actions), result.apps[1]
    assert "Env" not in sw.api.inspect_service(a)["Spec"]["TaskTemplate"]["ContainerSpec"]
    assert b in sw.services()
    assert [x.actions for x in sw.sync().apps] == [[], []]


def test_missing_image_and_unschedulable_are_reported_not_retried_forever(sw: SwarmHarness, lab: Lab) -> None:
    sw.repo.push({  # type: ignore[attr-defined]
        "apps/ghost.yaml": f"name: ghost\nimage: {lab.registry}/cynchrod-test/nothere:1\nmemory: 64\n",
        "apps/huge.yaml": app(lab, "huge").replace("cpu: 0.1", "cpu: 8"),
    })
    result = sw.sync()
    by_name = {a.name: a for a in result.apps}
    assert by_name["ghost"].status == "failed" and by_name["ghost"].error.startswith("image_not_found"), by_name
    assert sw.rt.service_name("default", "ghost", "main") not in sw.services()
    huge = sw.app("huge")
    assert huge.status == "failed" and (huge.last_error or "").startswith("unschedulable: "), huge
    assert "insufficient resources" in (huge.last_error or "")
    # The swarm keeps the service, to place it once something fits.
    assert sw.rt.service_name("default", "huge", "main") in sw.services()


def test_logs_tail_and_follow_name_node_and_replica(sw: SwarmHarness, lab: Lab) -> None:
    talk = "[sh, -c, 'i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.3; done']"
    sw.repo.push({"apps/talk.yaml": app(lab, "talk", "replicas: 2\n", command=talk)})  # type: ignore[attr-defined]
    assert [a.status for a in sw.sync().apps] == ["running"]

    def both() -> bool:
        lines = sw.rt.tail("default", "talk", 20)
        return len(lines) == 20 and {x.replica for x in lines} == {0, 1}

    wait_for(both, 15, "lines of both replicas")
    lines = sw.rt.tail("default", "talk", 20)
    assert len(lines) == 20 and all(x.line.startswith("tick-") and x.node in lab.nodes for x in lines)
    assert lines == sorted(lines, key=lambda x: x.timestamp)
    stream = sw.rt.follow("default", "talk", since=time.time())
    try:
        got = []
        for line in stream:
            got.append(line)
            if len({x.replica for x in got}) == 2:
                break
        assert all(x.service == "main" and x.line.startswith("tick-") for x in got)
    finally:
        stream.close()


def test_long_lines_come_whole_and_cut_at_32_kib_from_tail_and_follow(sw: SwarmHarness, lab: Lab) -> None:
    """Issue 24 item 7 on Swarm: a service's tasks' 16 KiB pieces are joined (per task: two replicas
    print at once), each line at most 32 KiB with the marker and ``truncated``; no timestamp inside."""
    from cynchrod.runtime import CUT_MARK

    started = time.time() - 1
    printer = ("[sh, -c, 'i=0; while true; do echo \"before $i\"; head -c 102400 /dev/zero | tr \"\\0\" a; echo;"
               " echo \"after $i\"; i=$((i+1)); sleep 1; done']")
    sw.repo.push({"apps/long.yaml": app(lab, "long", "replicas: 2\n", command=printer)})  # type: ignore[attr-defined]
    assert [a.status for a in sw.sync().apps] == ["running"]
    whole = "a" * 32 * 1024 + CUT_MARK

    def two_rounds() -> bool:
        lines = sw.rt.tail("default", "long", 40)
        return {x.replica for x in lines if x.line == "after 1"} == {0, 1}

    wait_for(two_rounds, 30, "two rounds of both replicas")
    tail = sw.rt.tail("default", "long", 40)
    assert all(len(x.line) < 100 or (x.line, x.truncated) == (whole, True) for x in tail)
    for replica in (0, 1):
        mine = [x.line for x in tail if x.replica == replica]
        start = mine.index("before 1")
        assert mine[start:start + 3] == ["before 1", whole, "after 1"]
    stream = sw.rt.follow("default", "long", since=started)
    timer = threading.Timer(30, stream.close)
    timer.start()
    try:
        got = []
        for line in stream:
            got.append(line)
            if {x.replica for x in got if x.line == "after 1"} == {0, 1}:
                break
    finally:
        timer.cancel()
        stream.close()
    for replica in (0, 1):
        mine = [x.line for x in got if x.replica == replica]
        assert mine[:6] == ["before 0", whole, "after 0", "before 1", whole, "after 1"], [m[:20] for m in mine]


def test_a_rotation_that_sends_the_last_line_again_gives_it_once(sw: SwarmHarness, lab: Lab,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 20: the Swarm follower reads through the same code as the local one, and asks the
    engine about a possible repeat as it does (``_docker.Given`` with a question): json-file rotating
    every 20 KB under a follower, four times, each line of the task comes once and none is lost."""
    from cynchrod.runtime import _docker

    monkeypatch.setattr(_docker, "LOG_CONFIG", {"type": "json-file", "config": {"max-size": "20k", "max-file": "3"}})
    writer = ("[sh, -c, 'x=$(printf %1000s | tr \" \" x); i=0;"
              " while [ $i -lt 80 ]; do echo \"line $i $x\"; i=$((i+1)); sleep 0.02; done; sleep 3600']")
    sw.repo.push({"apps/writer.yaml": app(lab, "writer", command=writer)})  # type: ignore[attr-defined]
    assert [a.status for a in sw.sync().apps] == ["running"]
    follower = sw.rt.follow("default", "writer", since=time.time() - 60)
    try:
        numbers = numbers_until(follower, 79)
    finally:
        follower.close()
    assert (numbers[:1], numbers[-1:], breaks(numbers)) == ([0], [79], [])


def test_with_the_view_fed_by_events_a_noop_pass_makes_no_engine_call_and_a_killed_task_is_healed(
        sw: SwarmHarness, lab: Lab) -> None:
    """As in the daemon: the view follows the manager's events (and its poll of the tasks), the
    passes run when it wakes them. A pass with nothing to do makes no engine call at all; a task
    killed by hand, on a worker (no event: the poll finds it) and on the manager (its container's
    events), is replaced and the app's row shows the new tasks, with no relist."""
    sw.repo.push({"apps/heal.yaml": app(lab, "heal", "replicas: 3\n")})  # type: ignore[attr-defined]
    assert [a.status for a in sw.sync().apps] == ["running"]
    name = sw.rt.service_name("default", "heal", "main")
    stop = threading.Event()
    loop = threading.Thread(target=sw.rec.serve, kwargs={"interval": 300, "stop": stop}, daemon=True)
    loop.start()
    try:
        wait_for(lambda: sw.rec.view._live and sw.rec.last_pass_at is not None, 30, "the view to follow events")
        requests: list[str] = []
        sw.api.hooks["response"].append(
            lambda response, *a, **k: requests.append(f"{response.request.method} {response.request.path_url}"))
        before, relists = sw.rt.calls, sw.rec.view.relists
        for _ in range(3):
            assert [a.actions for a in sw.rec.run_pass().apps] == [[]]
        assert requests == [] and sw.rt.calls == before, requests
        manager = next(iter(lab.nodes))

        def units() -> list[dict]:  # type: ignore[type-arg]
            services = json.loads(sw.app("heal").services_json or "[]")
            return services[0]["units"] if services else []

        for where in ("a worker", "the manager"):
            tasks = sw.tasks(name)
            victim = next(t for t in tasks if (container(lab, t)[0] == manager) == (where == "the manager"))
            node, c = container(lab, victim)
            c.kill()

            def healed(killed: str = victim["ID"][:12]) -> bool:
                now = units()
                return (len(now) == 3 and all(u["state"] == "running" for u in now)
                        and killed not in {u["instance"] for u in now})

            wait_for(healed, 60, f"the task killed on {where} ({node}) to be replaced and recorded")
            assert sw.app("heal").status == "running"
        assert sw.rec.view.relists == relists  # followed by events and polls, never a relist
        assert sw.rt.watch_calls > 0
    finally:
        stop.set()
        loop.join(30)
    assert not loop.is_alive()
