"""The swarm driver's pure parts: the drift digest, image error codes, references."""

from __future__ import annotations

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
