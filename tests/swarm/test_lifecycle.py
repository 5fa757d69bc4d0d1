"""A repo app on the swarm from build to delete: built on the manager, pushed to the lab's
registry, run by digest on every node; stopped, started, restarted, deleted (its images
gone from the registry)."""

from __future__ import annotations

import pathlib

import pytest

from cynchrod.runtime import swarm
from tests.helpers import GitRepo, git, wait_for
from tests.swarm.conftest import Lab, SwarmHarness

pytestmark = [pytest.mark.swarm, pytest.mark.xdist_group("swarm")]  # one lab per machine: one worker


def running_tasks(sw: SwarmHarness, name: str) -> list[dict]:  # type: ignore[type-arg]
    return [t for t in sw.tasks(name) if t["Status"]["State"] == "running"]


def test_repo_app_built_pushed_run_on_workers_then_stop_start_restart_delete(
        sw: SwarmHarness, lab: Lab, tmp_path: pathlib.Path) -> None:
    (tmp_path / "src").mkdir()
    src = GitRepo(tmp_path / "src")
    src.push({"Dockerfile": f"FROM {lab.image}\nRUN echo v1 > /version\nCMD [\"sleep\", \"3600\"]\n"})
    commit = git("rev-parse", "HEAD", cwd=src.work).strip()[:12]
    manifest = f"name: web\nbuild: {{repo: {src.url}}}\nreplicas: 3\ncpu: 0.1\nmemory: 64\n"
    # Another app, stopped, so that the repository still declares something when web is deleted.
    keep = f"name: keep\nimage: {lab.image}\nmemory: 64\nstate: stopped\n"
    sw.repo.push({"apps/web.yaml": manifest, "apps/keep.yaml": keep})  # type: ignore[attr-defined]
    result = sw.sync()
    assert [a.status for a in result.apps] == ["stopped", "running"], result
    name = sw.rt.service_name("default", "web", "main")
    image = sw.services()[name]["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]
    digest = sw.registry.digest("cynchrod/default-web", commit)
    assert digest and image == f"{lab.registry}/cynchrod/default-web:{commit}@{digest}"
    tasks = running_tasks(sw, name)
    nodes = {sw.api.inspect_node(t["NodeID"])["Description"]["Hostname"] for t in tasks}
    assert len(tasks) == 3 and nodes == set(lab.nodes)  # pulled from the registry by the workers

    sw.repo.push({"apps/web.yaml": manifest + "state: stopped\n"})  # type: ignore[attr-defined]
    assert [a.status for a in sw.sync().apps] == ["stopped", "stopped"]
    assert sw.services()[name]["Spec"]["Mode"]["Replicated"]["Replicas"] == 0
    wait_for(lambda: not running_tasks(sw, name), 15, "the tasks to stop")

    sw.repo.push({"apps/web.yaml": manifest})  # type: ignore[attr-defined]
    assert [a.status for a in sw.sync().apps] == ["stopped", "running"]
    before = {t["ID"] for t in running_tasks(sw, name)}
    assert len(before) == 3

    sw.repo.push({"apps/web.yaml": manifest + "restartedAt: '2026-11-29T00:00:00Z'\n"})  # type: ignore[attr-defined]
    restarted = sw.sync()
    assert [a.status for a in restarted.apps] == ["stopped", "running"], restarted
    after = {t["ID"] for t in running_tasks(sw, name)}
    assert len(after) == 3 and not after & before
    assert sw.app("web").status == "running"

    sw.repo.push({"apps/web.yaml": None})  # type: ignore[attr-defined]
    assert [a.status for a in sw.sync().apps] == ["stopped", "removed"]
    assert name not in sw.services()
    assert sw.registry.digest("cynchrod/default-web", commit) is None  # gone from the registry too
    assert not sw.api.images(filters={"label": f"io.cynchrod.owner={sw.rt.owner}"})


def test_registry_prune_keeps_the_newest(sw: SwarmHarness, lab: Lab, tmp_path: pathlib.Path) -> None:
    (tmp_path / "src").mkdir()
    src = GitRepo(tmp_path / "src")
    manifest = f"name: site\nbuild: {{repo: {src.url}}}\ncpu: 0.1\nmemory: 64\n"
    commits = []
    for n in range(5):
        src.push({"Dockerfile": f"FROM {lab.image}\nRUN echo v{n} > /version\nCMD [\"sleep\", \"3600\"]\n"})
        commits.append(git("rev-parse", "HEAD", cwd=src.work).strip()[:12])
        if n == 0:
            sw.repo.push({"apps/site.yaml": manifest})  # type: ignore[attr-defined]
        assert [a.status for a in sw.sync().apps] == ["running"]
    present = [c for c in commits if sw.registry.digest("cynchrod/default-site", c)]
    assert present == commits[-3:]
    assert isinstance(sw.rt.registry, swarm.Registry)
