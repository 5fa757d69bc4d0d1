"""The spec hash of a service that uses none of the Compose-era fields is the hash it had before
they existed (measured at the commit before them): an upgrade must not recreate running containers."""

from __future__ import annotations

import dataclasses

from cynchrod.core import specs


def _full() -> specs.ServiceSpec:
    return specs.ServiceSpec(
        name="web", image="img:1", command=("sh", "-c", "x"), env=(("A", "1"),), port=8080, host_port=18080,
        cpu=0.5, memory=128, volumes=(specs.Volume("data", "/data", True),), depends_on=("db",),
        healthcheck=specs.Healthcheck(test=("CMD", "true")), secrets=("s",), replicas=2, domain="a.example")


def test_hashes_of_specs_without_new_fields_are_unchanged() -> None:
    assert _full().hash(restarted_at=None) == "860abf9bc2f476bf"
    assert _full().hash(restarted_at="2026-01-01") == "478156b31837501d"
    assert specs.ServiceSpec(name="main", image="x").hash(restarted_at=None) == "abcfe677e20975f7"


def test_each_new_field_set_changes_the_hash_and_survives_json() -> None:
    base = _full()
    changes = {
        "entrypoint": ("/bin/sh",), "user": "1000", "working_dir": "/w", "hostname": "h", "stop_signal": "SIGINT",
        "stop_grace_period": 3.0, "init": False, "read_only": True, "tmpfs": ("/tmp",), "labels": (("a", "b"),),
        "expose": (9000,), "ports": (specs.Port(9000, 19000),), "cpu_reservation": 0.25, "memory_reservation": 64,
        "depends_on_conditions": (("db", "service_healthy"),),
        "binds": (specs.Bind("/state/files/ab/x.conf", "/etc/x.conf"),), "tty": True, "stdin_open": True,
    }
    seen = {base.hash(restarted_at=None)}
    for key, value in changes.items():
        changed = dataclasses.replace(base, **{key: value})
        seen.add(changed.hash(restarted_at=None))
        app = specs.AppSpec(org="o", name="a", services=(changed,))
        assert specs.AppSpec.from_json(app.to_json()) == app, key
    assert len(seen) == len(changes) + 1
