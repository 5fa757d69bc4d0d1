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
