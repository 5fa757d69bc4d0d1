"""Image updates on the three-node lab: a service follows a new tag pushed to the lab registry
(not on loopback: spoken to over plain HTTP as an ``insecure`` registry), committed to Git and
rolled out by an ordinary pass to the nodes, which pull it from the registry."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest

from cynchrod.desired import registry
from cynchrod.shell import control, updates
from tests.helpers import git
from tests.swarm.conftest import Lab, SwarmHarness

pytestmark = [pytest.mark.swarm, pytest.mark.xdist_group("swarm")]  # one lab per machine: one worker


def push(lab: Lab, name: str, content: str) -> None:
    with tempfile.TemporaryDirectory() as ctx:
        shutil.copy("/bin/busybox", pathlib.Path(ctx) / "busybox")
        (pathlib.Path(ctx) / "Dockerfile").write_text(
            "FROM scratch\nCOPY busybox /bin/busybox\n"
            f'RUN ["/bin/busybox", "--install", "-s", "/bin"]\nLABEL content="{content}"\nCMD ["sleep", "3600"]\n')
        env = {**os.environ, "DOCKER_HOST": lab.docker_host}
        subprocess.run(["docker", "build", "-q", "-t", name, ctx], check=True, capture_output=True, env=env)
        subprocess.run(["docker", "push", name], check=True, capture_output=True, env=env)


def test_a_service_follows_a_new_tag_pushed_to_the_lab_registry(sw: SwarmHarness, lab: Lab) -> None:
    base = f"{lab.registry}/cynchrod-test/follow"
    push(lab, f"{base}:1.0.0", "1.0.0")
    sw.repo.push({"apps/follow.yaml": (  # type: ignore[attr-defined]
        f"name: follow\nimage: {base}:1.0.0  # bumped by cynchrod\ncommand: [sleep, '3600']\ncpu: 0.1\n"
        "memory: 64\nreplicas: 3\nupdate:\n  semver: '^1'\n  interval: 5s\n")})
    assert [a.status for a in sw.sync().apps] == ["running"]
    push(lab, f"{base}:1.1.0", "1.1.0")
    ctl = control.Control(src=sw.src, db=sw.db, wake=lambda trigger: None)
    checker = updates.Checker(db=sw.db, ctl=ctl, client=registry.Registry(insecure=[lab.registry]))
    try:
        for future in checker.tick():
            future.result(30)
    finally:
        checker.close()
    state = sw.db.update_states(sw.app("follow").id)[0]
    assert state.reason == "committed" and state.candidate == "1.1.0", state
    assert [a.status for a in sw.sync().apps] == ["running"]
    name = sw.rt.service_name("default", "follow", "main")
    image = sw.services()[name]["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]
    assert image.startswith(f"{base}:1.1.0"), image
    tasks = sw.tasks(name)
    assert len(tasks) == 3 and all(t["Status"]["State"] == "running" for t in tasks)
    work = sw.repo.work  # type: ignore[attr-defined]
    git("pull", "-q", "origin", "main", cwd=work)
    assert git("log", "-1", "--format=%s", cwd=work).strip() == "update default/follow: follow 1.0.0 → 1.1.0"
    assert f"image: {base}:1.1.0  # bumped by cynchrod" in (work / "apps/follow.yaml").read_text()
