"""The swarm driver's pure parts: the drift digest, image error codes, references."""

from __future__ import annotations

from typing import Any

from cynchrod.core import specs
from cynchrod.runtime import swarm


def test_drift_digest_ignores_engine_defaults_replicas_and_its_own_label() -> None:
    sent = {"Name": "o_d_a_main", "Labels": {"io.cynchrod.owner": "o"},
            "TaskTemplate": {"ContainerSpec": {"Image": "r/x:1@sha256:ab", "Env": ["B=2", "A=1"], "Init": True},
                             "Resources": {"Limits": {"NanoCPUs": 10**8}}},
            "EndpointSpec": {"Mode": "dnsrr", "Ports": [{"TargetPort": 80, "PublishMode": "host"}]}}
    stored = {**sent, "Labels": {**sent["Labels"], swarm.LABEL_APPLIED: "x"}, "Mode": {"Replicated": {"Replicas": 0}},
              "TaskTemplate": {**sent["TaskTemplate"], "ForceUpdate": 3, "Runtime": "container",
                               "ContainerSpec": {**sent["TaskTemplate"]["ContainerSpec"], "Isolation": "default"}},
              "EndpointSpec": {"Mode": "dnsrr", "Ports": [{"TargetPort": 80, "PublishMode": "host",
                                                           "PublishedPort": 0}]}}
    assert swarm.spec_digest(stored) == swarm.spec_digest(sent)
    by_hand = {**stored, "TaskTemplate": {**stored["TaskTemplate"], "ContainerSpec": {
        **stored["TaskTemplate"]["ContainerSpec"], "Env": ["B=2", "A=1", "C=3"]}}}
    assert swarm.spec_digest(by_hand) != swarm.spec_digest(sent)


def test_image_errors_and_references() -> None:
    assert swarm.image_error("No such image: 10.0.0.1:5000/x:1") == "image_not_found"
    assert swarm.image_error("Get http://r/v2/: dial tcp 10.0.0.1:5000: connection refused") == "image_pull_failed"
    assert swarm.image_error("task: non-zero exit (1)") is None
    assert swarm.split_reference("10.0.0.1:5000/cynchrod/d-web:abc") == ("10.0.0.1:5000/cynchrod/d-web", "abc")
    assert swarm.split_reference("10.0.0.1:5000/busybox") == ("10.0.0.1:5000/busybox", "latest")
    reg = swarm.Registry("http://10.0.0.1:5000/")
    assert reg.host == "10.0.0.1:5000" and reg.auth_config is None
    assert swarm.Registry("r.example", "u", "p").auth_config == {"username": "u", "password": "p"}


def _body(service: specs.ServiceSpec) -> dict[str, Any]:
    rt = object.__new__(swarm.SwarmRuntime)  # _body of a one-service app with no secrets calls no engine
    rt.owner, rt.instance, rt.stop_timeout = "o", "", 10
    spec = specs.AppSpec(org="default", name="a", services=(service,))
    return rt._body(spec, service, "r/x:1", "o_default_a_main")


def test_compose_keys_reach_the_swarm_body_and_leave_a_plain_body_alone() -> None:
    plain = _body(specs.ServiceSpec(name="main", image="x", command=("sleep", "1"), port=80))
    container = plain["TaskTemplate"]["ContainerSpec"]
    assert set(container) == {"Image", "Command", "Args", "Env", "Labels", "StopGracePeriod", "Init"}
    assert plain["TaskTemplate"]["Resources"]["Reservations"]["MemoryBytes"] == 512 * 2**20
    full = _body(specs.ServiceSpec(
        name="main", image="x", command=("serve",), entrypoint=("/entry",), user="1000", working_dir="/w",
        hostname="h", stop_signal="SIGQUIT", stop_grace_period=3.0, init=False, read_only=True,
        tmpfs=("/run:size=64m,mode=1777",), labels=(("team", "web"),), volumes=(specs.Volume("", "/scratch"),),
        ports=(specs.Port(53, 5353, "udp"),), memory_reservation=64, port=80))
    container = full["TaskTemplate"]["ContainerSpec"]
    assert (container["Command"], container["Args"], container["User"], container["Dir"], container["Hostname"],
            container["StopSignal"], container["StopGracePeriod"], container["Init"], container["ReadOnly"]) == (
        ["/entry"], ["serve"], "1000", "/w", "h", "SIGQUIT", 3 * 10**9, False, True)
    assert container["Labels"]["team"] == "web"
    assert [m["Type"] for m in container["Mounts"]] == ["volume", "tmpfs"]
    assert container["Mounts"][1]["TmpfsOptions"] == {"SizeBytes": 64 * 2**20, "Mode": 0o1777}
    assert full["TaskTemplate"]["Resources"]["Reservations"]["MemoryBytes"] == 64 * 2**20
    assert full["EndpointSpec"]["Ports"][1] == {"Protocol": "udp", "TargetPort": 53, "PublishMode": "host",
                                                "PublishedPort": 5353}


def test_min_ready_and_on_failure_reach_the_update_config_and_a_oneshot_runs_once() -> None:
    """``update_config.monitor`` is ``min_ready`` (2 s by default, as before the key), ``failure_action``
    follows ``on_failure`` (rollback: the swarm's own; keep: the update goes on), a oneshot's restart
    condition is ``none``; a plain service's task template is what it was."""
    plain = _body(specs.ServiceSpec(name="main", image="x", port=80))
    assert plain["UpdateConfig"] == {"Parallelism": 1, "FailureAction": "continue", "Monitor": 2 * 10**9,
                                     "Order": "start-first"}
    assert plain["TaskTemplate"]["RestartPolicy"] == {"Condition": "any", "Delay": 5 * 10**9, "MaxAttempts": 0,
                                                      "Window": 0}
    rt = object.__new__(swarm.SwarmRuntime)
    rt.owner, rt.instance, rt.stop_timeout = "o", "", 10
    service = specs.ServiceSpec(name="main", image="x", min_ready=7.5, oneshot=True)
    spec = specs.AppSpec(org="default", name="a", services=(service,), on_failure="rollback")
    body = rt._body(spec, service, "r/x:1", "o_default_a_main")
    assert (body["UpdateConfig"]["FailureAction"], body["UpdateConfig"]["Monitor"]) == ("rollback", 7_500_000_000)
    assert body["TaskTemplate"]["RestartPolicy"]["Condition"] == "none"
    # Not in the unit's spec hash: a service applied before them is not redeployed for them.
    assert spec.service_hash(service) == specs.AppSpec(
        org="default", name="a", services=(specs.ServiceSpec(name="main", image="x", oneshot=True),)).service_hash(
        specs.ServiceSpec(name="main", image="x", oneshot=True))


def _task(tid: str, *, slot: int = 1, desired: str = "running", state: str = "running", index: int = 10,
          code: int | None = None, err: str = "", check: bool = False, service: str = "s1") -> dict[str, Any]:
    container: dict[str, Any] = {"Labels": {"io.cynchrod.org": "default", "io.cynchrod.app": "a",
                                            "io.cynchrod.service": "main", "io.cynchrod.spec-hash": "h1"}}
    if check:
        container["Healthcheck"] = {"Test": ["CMD", "false"]}
    status: dict[str, Any] = {"State": state, "Err": err or None}
    if code is not None:
        status["ContainerStatus"] = {"ExitCode": code}
    return {"ID": tid, "ServiceID": service, "Slot": slot, "DesiredState": desired, "Status": status,
            "Version": {"Index": index}, "Spec": {"ContainerSpec": container}, "NodeID": "n1"}


def _service(condition: str = "any") -> dict[str, Any]:
    return {"ID": "s1", "Version": {"Index": 5}, "Spec": {
        "Labels": {}, "Mode": {"Replicated": {"Replicas": 1}},
        "TaskTemplate": {"RestartPolicy": {"Condition": condition}}}}


def _runtime() -> swarm.SwarmRuntime:
    import threading
    rt = object.__new__(swarm.SwarmRuntime)
    rt.owner, rt.instance = "o", ""
    rt._lock, rt._nodes, rt._drift = threading.Lock(), {"n1": "node1"}, {}
    rt._deployed, rt._ended = {}, {}
    return rt


def test_task_states_as_the_health_gate_reads_them() -> None:
    """Swarm holds a health-checked task in ``starting`` until healthy and kills it when unhealthy;
    a oneshot's task that ran to its end stays its slot's unit; a failed task Swarm replaced is one of
    ``ended`` (the health gate's facts) when it ended after this daemon changed its service."""
    assert swarm.task_health(_task("t", state="starting", check=True)) == "starting"
    assert swarm.task_health(_task("t", check=True)) == "healthy"
    assert swarm.task_health(_task("t", state="failed", err="task: non-zero exit (143): dockerexec: unhealthy "
                                   "container", check=True)) == "unhealthy"
    assert swarm.task_health(_task("t")) == ""
    done = _task("t1", desired="shutdown", state="complete", code=0)
    assert swarm.current_tasks({"s1": _service("none")}, [done]) == {("s1", 1): done}
    assert swarm.current_tasks({"s1": _service("any")}, [done]) == {}

    rt = _runtime()
    svc = _service()
    old = _task("t0", desired="shutdown", state="failed", code=1, index=4)  # before this daemon's change
    failed = _task("t1", desired="shutdown", state="failed", code=143, index=12, check=True,
                   err="task: non-zero exit (143): dockerexec: unhealthy container")
    replacement = _task("t2", desired="ready", state="ready", index=13, check=True)
    units, unsettled = rt._units({"s1": svc}, [old, failed, replacement])
    assert [(u.instance, u.state) for u in units] == [("t2", "restarting")] and unsettled == {"s1"}
    assert rt.ended("default", "a") == []  # a service this daemon did not change: nothing judged
    rt._deploying("s1", 5)
    rt._units({"s1": svc}, [old, failed, replacement])
    ended = rt.ended("default", "a")
    assert [(u.instance, u.state, u.exit_code, u.health) for u in ended] == [("t1", "exited", 143, "unhealthy")]
    assert rt.ended("default", "other") == []
    rt._deploying("s1", 13)  # changed again: what ended before is not this deployment's
    assert rt.ended("default", "a") == []
    # A completed oneshot is settled: the event feed does not keep polling for it.
    _, unsettled = rt._units({"s1": _service("none")}, [done])
    assert unsettled == set()


def test_a_read_from_before_a_task_ended_does_not_forget_that_it_ended() -> None:
    """Tasks are read on two threads (the event feed's rereads, the apply's polls): a read that began
    while the task still ran may be noted after one that saw it fail. A task that ended stays ended,
    so the older read adds nothing and takes nothing away (CI, lab: a crash-looping service's
    failed task was forgotten, and its replacement, up for min_ready, was judged ready)."""
    rt = _runtime()
    svc = _service()
    rt._deploying("s1", 5)
    running = _task("t1", index=8)
    failed = _task("t1", desired="shutdown", state="failed", code=3, index=12)
    replacement = _task("t2", index=13)
    rt._units({"s1": svc}, [failed, replacement])  # the newer read, noted first
    rt._units({"s1": svc}, [running])  # the older read, noted after it
    assert [(u.instance, u.exit_code) for u in rt.ended("default", "a")] == [("t1", 3)]
    # A crash loop's ended tasks are bounded: the newest are kept.
    rt._units({"s1": svc}, [_task(f"x{i}", desired="shutdown", state="failed", code=3, index=20 + i)
                            for i in range(200)])
    kept = rt.ended("default", "a")
    assert len(kept) == swarm.ENDED_KEPT and kept[-1].instance == "x199"
