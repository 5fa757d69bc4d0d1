"""cynchrod benchmarks, side by side with docker-compose and the bare Docker SDK.

Run: ``.venv/bin/python bench/run.py [--quick] [--out bench/results.json]`` as root
on a host with dockerd (``scripts/setup``; ``apt-get install docker-compose wrk``).
Not part of the test suite. Every scenario makes its own image (FROM scratch +
Debian's busybox-static) and repositories, measures cynchrod and its peers in the
same run, reports medians and ratios, and removes everything it made (all
objects carry the label ``io.cynchrod.bench``). Nothing is pulled.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import hmac
import http.client
import json
import os
import pathlib
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable
from typing import Any

import docker

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cynchrod import edge, runtime, store  # noqa: E402
from cynchrod.desired import source  # noqa: E402
from cynchrod.edge import deploy  # noqa: E402
from cynchrod.runtime import local  # noqa: E402
from cynchrod.shell import reconciler  # noqa: E402

IMAGE = "cynchrod-bench/busybox:1"
LABEL = "io.cynchrod.bench"
CONCURRENCY = 4
RUN = f"bench{os.getpid()}"  # compose project prefix: unique per run
SECRET = "bench-webhook-secret-0123456789"
client = docker.from_env(timeout=300)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def git(*args: str, cwd: pathlib.Path) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


class Repo:
    def __init__(self, root: pathlib.Path) -> None:
        self.bare, self.work = root / "origin.git", root / "work"
        git("init", "-q", "--bare", "-b", "main", str(self.bare), cwd=root)
        git("clone", "-q", str(self.bare), str(self.work), cwd=root)
        git("checkout", "-q", "-b", "main", cwd=self.work)

    def push(self, files: dict[str, str | None], message: str = "bench") -> str:
        for path, text in files.items():
            target = self.work / path
            if text is None:
                git("rm", "-q", path, cwd=self.work)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
        git("add", "-A", cwd=self.work)
        git("commit", "-q", "--allow-empty", "-m", message, cwd=self.work)
        git("push", "-q", "origin", "HEAD:main", cwd=self.work)
        return git("rev-parse", "HEAD", cwd=self.work).strip()


def build_image() -> None:
    with tempfile.TemporaryDirectory() as ctx:
        shutil.copy("/bin/busybox", pathlib.Path(ctx) / "busybox")
        (pathlib.Path(ctx) / "www").mkdir()
        (pathlib.Path(ctx) / "www" / "index.html").write_text("ok\n")
        (pathlib.Path(ctx) / "Dockerfile").write_text(
            'FROM scratch\nCOPY busybox /bin/busybox\nRUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
            'COPY www /www\nCMD ["sleep", "3600"]\n')
        subprocess.run(["docker", "build", "-q", "--label", f"{LABEL}=1", "-t", IMAGE, ctx], check=True,
                       capture_output=True)


def force_remove(container_id: str) -> None:
    """Remove a container; one already gone, or being removed by the engine, is fine."""
    try:
        client.api.remove_container(container_id, force=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as exc:
        if exc.status_code != 409:
            raise


#: The owners this run's apps run under: cleanup removes their containers and no one else's.
OWNERS: set[str] = set()


def ours(labels: dict[str, str]) -> bool:
    """A container this run made: its apps' (an owner of this run), or labelled by this run (bare
    loops, docker-compose projects). Other people's benchmarks may run on the same engine, from
    the same image (whose label every container inherits), at the same time."""
    return (labels.get(runtime.LABEL_OWNER) in OWNERS or labels.get(LABEL, "").startswith(RUN)
            or labels.get("com.docker.compose.project", "").startswith(RUN))


def cleanup() -> None:
    rows = [c for c in client.api.containers(all=True, filters={"label": LABEL}) if ours(c["Labels"] or {})]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda c: force_remove(c["Id"]), rows))
    for n in client.api.networks(filters={"label": "com.docker.compose.project"}):
        if n["Name"].startswith(RUN):
            try:
                client.api.remove_network(n["Id"])
            except docker.errors.APIError as exc:
                log(f"left network {n['Name']}: {exc.explanation}")


def manifest(name: str, *, extra: str = "") -> str:
    return f"name: {name}\nimage: {IMAGE}\ncommand: [sleep, '3600']\ncpu: 0.1\nmemory: 64\n{extra}"


def stopped_apps(n: int) -> dict[str, str | None]:
    """N apps declared stopped: cynchrod keeps their containers (created, never started), so
    a list call returns N rows without N running processes on a 2-core host."""
    return {f"apps/app{i:04d}.yaml": manifest(f"app{i:04d}", extra="state: stopped\n") for i in range(n)}


def harness(repo: Repo, state: pathlib.Path, owner: str) -> tuple[reconciler.Reconciler, local.LocalRuntime]:
    OWNERS.add(owner)
    rt = local.LocalRuntime(owner=owner, stop_timeout=1)
    rec = reconciler.Reconciler(src=source.Source(str(repo.bare), state_dir=state), rt=rt,
                                db=store.Store(state / "cynchrod.db"), concurrency=CONCURRENCY,
                                max_apps=lambda org: 100000)
    return rec, rt


def owner_rows(owner: str) -> list[dict[str, Any]]:
    OWNERS.add(owner)
    return client.api.containers(all=True, filters={"label": [f"{runtime.LABEL_OWNER}={owner}"]})


def remove_owner(owner: str) -> None:
    rows = owner_rows(owner)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda c: force_remove(c["Id"]), rows))


def bare_create_start(names: list[str], *, label: str) -> float:
    def one(name: str) -> None:
        host = client.api.create_host_config(nano_cpus=100_000_000, mem_limit=64 * 2**20,
                                             memswap_limit=64 * 2**20, init=True)
        cid = client.api.create_container(IMAGE, command=["sleep", "3600"], name=name,
                                          labels={LABEL: f"{RUN}-{label}"}, host_config=host)["Id"]
        client.api.start(cid)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(one, names))
    return time.perf_counter() - started


def compose_file(path: pathlib.Path, n: int, project: str) -> None:
    lines = ["version: '2.4'", "services:"]
    for i in range(n):
        lines += [f"  app{i:04d}:", f"    image: {IMAGE}", "    command: [sleep, '3600']", "    init: true",
                  "    cpus: 0.1", "    mem_limit: 64m", "    memswap_limit: 64m",
                  f"    labels: {{{LABEL}: '{project}'}}"]
    path.write_text("\n".join(lines) + "\n")


def compose_down(path: pathlib.Path, project: str) -> None:
    try:
        compose(path, project, "down", "-t", "0")
    except subprocess.CalledProcessError as exc:
        log(f"docker-compose down failed: {exc.stderr[-300:] if exc.stderr else exc}")
    cleanup()


def compose(path: pathlib.Path, project: str, *args: str) -> float:
    started = time.perf_counter()
    # docker-compose 1.29 deadlocks when COMPOSE_PARALLEL_LIMIT is below the number of
    # services (its project- and service-level pools share one limit; seen here at 4
    # and at its default 64 with 100 services), so it gets one slot per service: more
    # parallelism than cynchrod's 4, which favours compose.
    services = path.read_text().count("\n  app")
    done = subprocess.run(["docker-compose", "-f", str(path), "-p", project, *args], capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "COMPOSE_PARALLEL_LIMIT": str(max(services + 1, 64)),
                                             "COMPOSE_HTTP_TIMEOUT": "600"})
    if done.returncode:
        log(f"docker-compose {' '.join(args)} failed: {done.stderr[-600:]}")
        done.check_returncode()
    return time.perf_counter() - started


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


# -- scenarios --------------------------------------------------------------------


def cold_converge(tmp: pathlib.Path, sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    """N apps from nothing, for cynchrod (a fresh state: clone and parse included), docker-compose and a
    bare SDK loop; and, while each has its N containers running, its no-op: cynchrod's pass with its view
    of the engine live (as in the daemon), ``docker-compose up -d`` again, and the bare loop's one list
    call. These are the scaling curves' points (issue 15, item 5)."""
    rows = []
    for n in sizes:
        cyn, comp, bare, cyn_noop, cyn_calls, comp_noop, bare_noop = [], [], [], [], [], [], []
        for r in range(repeats if n <= 10 else 1):
            work = tmp / f"cold-{n}-{r}"
            work.mkdir()
            repo = Repo(work)
            repo.push({f"apps/app{i:04d}.yaml": manifest(f"app{i:04d}") for i in range(n)})
            owner = f"bench-cold-{n}-{r}"
            rec, rt = harness(repo, work / "state", owner)  # a fresh state: clone and parse are included
            started = time.perf_counter()
            result = rec.run_pass()
            cyn.append(time.perf_counter() - started)
            assert result.ok and len(owner_rows(owner)) == n, result.source_error
            if n >= 100:
                walls, calls = _noop_passes(rec, rt, n, 5)
                cyn_noop.append(median(walls))
                cyn_calls.append(calls)
            remove_owner(owner)
            path = work / "docker-compose.yml"
            compose_file(path, n, f"{RUN}c{n}{r}")
            comp.append(compose(path, f"{RUN}c{n}{r}", "up", "-d"))
            if n >= 100:
                comp_noop.append(median([compose(path, f"{RUN}c{n}{r}", "up", "-d") for _ in range(2)]))
            compose_down(path, f"{RUN}c{n}{r}")
            names = [f"bench-bare-{n}-{r}-{i}" for i in range(n)]
            bare.append(bare_create_start(names, label=f"bare{n}"))
            if n >= 100:
                bare_noop.append(median([_bare_noop(f"bare{n}", set(names)) for _ in range(5)]))
            cleanup()
        row: dict[str, Any] = {"scenario": f"cold converge N={n}", "cynchrod_s": median(cyn),
                               "docker_compose_s": median(comp), "bare_sdk_s": median(bare),
                               "ratio_vs_bare": median(cyn) / median(bare),
                               "ratio_vs_compose": median(cyn) / median(comp), "runs": len(cyn)}
        if cyn_noop:
            row.update({"cynchrod_noop_s": median(cyn_noop), "cynchrod_noop_docker_calls": median(cyn_calls),
                        "docker_compose_noop_s": median(comp_noop), "bare_sdk_noop_s": median(bare_noop)})
        rows.append(row)
        log(f"cold converge N={n}: {rows[-1]}")
    return rows


def _noop_passes(rec: reconciler.Reconciler, rt: local.LocalRuntime, n: int, passes: int) -> tuple[list[float], float]:
    """No-op passes with the view fed by the engine's events, as in the daemon: (wall times, engine calls a pass)."""
    stop = threading.Event()
    events = threading.Thread(target=rec.view.run, args=(stop,), daemon=True)
    events.start()
    wait(lambda: rec.view._live, 30)
    calls: list[str] = []
    hook = lambda resp, *a, **k: calls.append(resp.request.path_url)  # noqa: E731
    rt.api.hooks["response"].append(hook)
    walls = []
    for _ in range(passes):
        t0 = time.perf_counter()
        result = rec.run_pass()
        walls.append(time.perf_counter() - t0)
        assert all(not a.actions for a in result.apps) and len(result.apps) == n
    rt.api.hooks["response"].remove(hook)
    stop.set()
    rec.view.stop()
    events.join(5)
    return walls, len(calls) / passes


def _bare_noop(label: str, names: set[str]) -> float:
    """The bare loop's no-op: one list call, and each wanted container found running."""
    t0 = time.perf_counter()
    found = {c["Names"][0].lstrip("/"): c["State"]
             for c in client.api.containers(filters={"label": f"{LABEL}={RUN}-{label}"})}
    assert all(found.get(name) == "running" for name in names)
    return time.perf_counter() - t0


def noop_passes(rec: Any, passes: int, n: int) -> tuple[list[float], list[float]]:
    """(wall seconds, CPU seconds) of ``passes`` passes that must find nothing to do over ``n`` apps."""
    walls, cpus = [], []
    for _ in range(passes):
        cpu0, t0 = time.process_time(), time.perf_counter()
        result = rec.run_pass()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - cpu0)
        assert all(not a.actions for a in result.apps) and len(result.apps) == n
    return walls, cpus

def noop_pass(tmp: pathlib.Path, n: int, passes: int) -> dict[str, Any]:
    work = tmp / f"noop-{n}"
    work.mkdir()
    repo = Repo(work)
    owner = f"bench-noop-{n}"
    repo.push(stopped_apps(n))
    rec, rt = harness(repo, work / "state", owner)
    rec.run_pass()
    from cynchrod.desired import declared

    desired = declared.Cache().load(*_files(rec))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda spec: rt.api.create_container(
            IMAGE, command=["sleep", "3600"], name=rt.container_name(spec.org, spec.name, "main"),
            labels={**runtime.unit_labels(rt.owner, rt.instance, spec, spec.services[0], 0), LABEL: f"{RUN}-noop"}),
            desired.apps.values()))
    assert all(not a.actions for a in rec.run_pass().apps)
    # The daemon's view follows the engine's events: a no-op pass then makes no engine call.
    stop = threading.Event()
    events = threading.Thread(target=rec.view.run, args=(stop,), daemon=True)
    events.start()
    wait(lambda: rec.view._live, 30)
    calls: list[str] = []
    rt.api.hooks["response"].append(lambda resp, *a, **k: calls.append(resp.request.path_url))
    walls, cpus = noop_passes(rec, passes, n)
    calls_per_pass = len(calls) / passes
    if calls:
        log(f"no-op N={n}: engine calls made by the passes: {sorted(set(calls))[:5]}")
    stop.set()
    rec.view.stop()
    events.join(5)
    list_calls = []
    for _ in range(passes):
        t0 = time.perf_counter()
        rt.api.containers(all=True, filters=rt.owner_filter)
        list_calls.append(time.perf_counter() - t0)
    row = {"scenario": f"no-op pass N={n}", "cynchrod_s": median(walls), "cynchrod_cpu_s": median(cpus),
           "docker_calls_per_pass": calls_per_pass,
           "bare_list_call_s": median(list_calls), "ratio_vs_bare_list": median(walls) / median(list_calls),
           "passes": passes}
    if n <= 100:
        path = work / "docker-compose.yml"
        compose_file(path, n, f"{RUN}n{n}")
        compose(path, f"{RUN}n{n}", "up", "-d")
        times = [compose(path, f"{RUN}n{n}", "up", "-d") for _ in range(3)]
        compose_down(path, f"{RUN}n{n}")
        row["docker_compose_noop_s"] = median(times)
        row["ratio_vs_compose"] = median(walls) / median(times)
    remove_owner(owner)
    cleanup()
    log(f"no-op N={n}: {row}")
    return row


def _files(rec: reconciler.Reconciler) -> tuple[list[tuple[str, str]], Any]:
    src = rec.source
    files, _ = src.files(src.resolve())
    return files, src.read


def change_one(tmp: pathlib.Path, n: int, repeats: int) -> dict[str, Any]:
    """One app of ``n`` running gets a new env (a commit): cynchrod's pass, with its view of the engine
    live as in the daemon, beside a bare stop+remove+create+start of one container, alternating so that
    the host's load falls on both."""
    work = tmp / f"change-{n}"
    work.mkdir()
    repo = Repo(work)
    owner = f"bench-change-{n}"
    repo.push({f"apps/app{i:04d}.yaml": manifest(f"app{i:04d}") for i in range(n)})
    rec, rt = harness(repo, work / "state", owner)
    rec.run_pass()
    stop = threading.Event()
    events = threading.Thread(target=rec.view.run, args=(stop,), daemon=True)
    events.start()
    wait(lambda: rec.view._live, 30)
    cyn, bare = [], []
    name = "bench-bare-change"
    bare_create_start([name], label="change")
    for r in range(repeats):
        repo.push({"apps/app0000.yaml": manifest("app0000", extra=f"env: {{REV: '{r}'}}\n")})
        time.sleep(0.3)
        t0 = time.perf_counter()
        result = rec.run_pass()
        cyn.append(time.perf_counter() - t0)
        assert [a.name for a in result.apps if a.actions] == ["app0000"]
        time.sleep(0.3)
        t0 = time.perf_counter()
        client.api.stop(name, timeout=1)
        client.api.remove_container(name, force=True)
        bare_create_start([name], label="change")
        bare.append(time.perf_counter() - t0)
    stop.set()
    rec.view.stop()
    events.join(5)
    remove_owner(owner)
    cleanup()
    row = {"scenario": f"change one app of {n}", "cynchrod_s": median(cyn), "bare_recreate_s": median(bare),
           "ratio_vs_bare": median(cyn) / median(bare), "runs": repeats}
    log(str(row))
    return row


def swarm_rows(tmp: pathlib.Path, n_cold: int, n_noop: int, passes: int) -> list[dict[str, Any]]:
    """The swarm runtime on the three-node lab (``scripts/swarm-lab``): a cold converge of
    ``n_cold`` apps beside a bare ``services.create`` loop (same specs, same concurrency, both
    timed until every task runs), and a no-op pass over ``n_noop`` services."""
    from cynchrod.desired import secrets as vault
    from cynchrod.runtime import swarm

    lab = ROOT / "scripts" / "swarm-lab"
    out = subprocess.run([str(lab), "up", "3"], check=True, capture_output=True, text=True).stdout
    env = dict(line.split("=", 1) for line in out.strip().splitlines()[-2:])
    image = f"{env['REGISTRY']}/cynchrod-bench/busybox:1"
    ctx = tmp / "swarm-image"
    ctx.mkdir()
    shutil.copy("/bin/busybox", ctx / "busybox")
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY busybox /bin/busybox\n"
                                    'RUN ["/bin/busybox", "--install", "-s", "/bin"]\n')
    denv = {**os.environ, "DOCKER_HOST": env["DOCKER_HOST"]}
    subprocess.run(["docker", "build", "-q", "-t", image, str(ctx)], check=True, capture_output=True, env=denv)
    subprocess.run(["docker", "push", image], check=True, capture_output=True, env=denv)
    manager = docker.DockerClient(base_url=env["DOCKER_HOST"], timeout=300)

    def spec(name: str, extra: str = "") -> str:
        # 0.05 CPU reserved each: 100 apps fit the lab's 3 x 2 CPUs.
        return f"name: {name}\nimage: {image}\ncommand: [sleep, '3600']\ncpu: 0.05\nmemory: 64\n{extra}"

    def make(work: pathlib.Path, owner: str) -> tuple[reconciler.Reconciler, swarm.SwarmRuntime]:
        db = store.Store(work / "state" / "cynchrod.db")
        rt = swarm.SwarmRuntime(owner=owner, instance=db.instance_id(), stop_timeout=1,
                                base_url=env["DOCKER_HOST"], secret_value=vault.Secrets(
                                    db, state_dir=work / "state", files=False).value)
        rec = reconciler.Reconciler(src=source.Source(str(repo.bare), state_dir=work / "state"), rt=rt, db=db,
                                    concurrency=CONCURRENCY, max_apps=lambda org: 100000)
        return rec, rt

    def poll(check: Any, timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        while not check():
            if time.perf_counter() > deadline:
                raise RuntimeError("timed out")
            time.sleep(0.2)

    def remove(label: str) -> None:
        services = manager.api.services(filters={"label": [label]})
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda s: manager.api.remove_service(s["ID"]), services))
        poll(lambda: not manager.api.tasks(filters={"label": [label], "desired-state": "running"}), 300)

    rows: list[dict[str, Any]] = []
    try:
        work = tmp / "swarm-cold"
        work.mkdir()
        repo = Repo(work)
        repo.push({f"apps/app{i:04d}.yaml": spec(f"app{i:04d}") for i in range(n_cold)})
        owner = "bench-swarm-cold"
        rec, rt = make(work, owner)
        started = time.perf_counter()
        result = rec.run_pass()
        cyn = time.perf_counter() - started
        assert result.ok and len(rt.list_units()) == n_cold, result
        body = rt._body(next(iter(rec.desired._loaded.values()))[1].apps[("default", "app0000")],
                        next(iter(rec.desired._loaded.values()))[1].apps[("default", "app0000")].services[0], image, "x")
        remove(f"{runtime.LABEL_OWNER}={owner}")

        def create(i: int) -> None:
            manager.api.create_service(body["TaskTemplate"], name=f"bench-bare-{i:04d}",
                                       labels={LABEL: "swarm-bare"}, mode=docker.types.ServiceMode(
                                           "replicated", replicas=1), endpoint_spec=body["EndpointSpec"])

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(create, range(n_cold)))
        created = time.perf_counter() - t0
        poll(lambda: sum(t["Status"]["State"] == "running" for t in manager.api.tasks(
            filters={"label": [f"{LABEL}=swarm-bare"]})) >= n_cold, 600)
        bare = time.perf_counter() - t0
        remove(f"{LABEL}=swarm-bare")
        rows.append({"scenario": f"swarm cold converge N={n_cold} (3 nodes)", "cynchrod_s": cyn,
                     "bare_sdk_services_create_s": bare, "bare_create_calls_only_s": created,
                     "ratio_vs_bare": cyn / bare, "runs": 1})
        log(str(rows[-1]))

        work = tmp / "swarm-noop"
        work.mkdir()
        repo = Repo(work)
        owner = "bench-swarm-noop"
        # Stopped apps: services scaled to 0, so 1,000 services need no 1,000 processes.
        repo.push({f"apps/app{i:04d}.yaml": spec(f"app{i:04d}", "state: stopped\n") for i in range(n_noop)})
        rec, rt = make(work, owner)
        first = rec.run_pass()
        failed = [(a.name, a.error) for a in first.apps if a.error]
        assert first.ok, (failed[:5], len(failed), first.source_error, first.manifest_errors[:3])
        # A stopped app with no service needs nothing, so its service is made here, as the
        # runtime makes it (replicas 0), the way the one-host row makes stopped containers.
        specs_now = next(iter(rec.desired._loaded.values()))[1].apps.values()
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(lambda a: rt._converge(a, a.services[0]), specs_now))
        made = time.perf_counter() - t0
        assert len(manager.api.services(filters={"label": [f"{runtime.LABEL_OWNER}={owner}"]})) == n_noop
        assert all(not a.actions for a in rec.run_pass().apps)

        def timed_passes() -> tuple[list[float], list[float], list[int]]:
            walls, cpus, calls = [], [], []
            requests: list[str] = []
            hook = lambda resp, *a, **k: requests.append(resp.request.path_url)  # noqa: E731
            rt.api.hooks["response"].append(hook)
            for _ in range(passes):
                before, asked = rt.calls, len(requests)
                cpu0, t1 = time.process_time(), time.perf_counter()
                result = rec.run_pass()
                walls.append(time.perf_counter() - t1)
                cpus.append(time.process_time() - cpu0)
                assert rt.calls - before == len(requests) - asked  # the driver's count is the HTTP requests'
                calls.append(rt.calls - before)
                assert all(not a.actions for a in result.apps) and len(result.apps) == n_noop
            rt.api.hooks["response"].remove(hook)
            return walls, cpus, calls

        # Without its event thread (``cynchrod sync``) the view relists for each pass: what every
        # pass cost before the swarm driver fed the view by events.
        relist_walls, _, relist_calls = timed_passes()
        # As in the daemon: the view follows the manager's events; a no-op pass reads nothing.
        stop = threading.Event()
        events = threading.Thread(target=rec.view.run, args=(stop,), daemon=True)
        events.start()
        wait(lambda: rec.view._live, 30)
        watch_before = rt.watch_calls
        walls, cpus, calls = timed_passes()
        stop.set()
        rec.view.stop()
        events.join(5)
        lists, task_lists = [], []
        owner_filter = {"label": runtime.owner_labels(owner)}
        for _ in range(passes):
            t1 = time.perf_counter()
            manager.api.services(filters=owner_filter)
            manager.api.tasks(filters=owner_filter)
            lists.append(time.perf_counter() - t1)
            t1 = time.perf_counter()
            manager.api.tasks(filters=owner_filter)
            task_lists.append(time.perf_counter() - t1)
        rows.append({"scenario": f"swarm no-op pass N={n_noop} services", "cynchrod_s": median(walls),
                     "cynchrod_cpu_s": median(cpus), "docker_calls_per_pass": median(calls),
                     "bare_services_and_tasks_list_s": median(lists),
                     "ratio_vs_bare_list": median(walls) / median(lists),
                     "relisting_pass_s": median(relist_walls), "relisting_pass_calls": median(relist_calls),
                     "relisting_ratio_vs_bare_list": median(relist_walls) / median(lists),
                     "event_thread_reads_during_passes": rt.watch_calls - watch_before,
                     "poll_tasks_list_s": median(task_lists), "poll_every_s": swarm.POLL_S,
                     "making_the_stopped_services_s": made, "passes": passes})
        log(str(rows[-1]))
        remove(f"{runtime.LABEL_OWNER}={owner}")
    finally:
        manager.close()
        subprocess.run([str(lab), "down"], check=False, capture_output=True)
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Serve:
    def __init__(self, repo: Repo, state: pathlib.Path, owner: str, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ()) -> None:
        OWNERS.add(owner)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(state.parent / "daemon.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cynchrod", "serve", "--repo", str(repo.bare), "--state", str(state),
             "--owner", owner, "--interval", "300", "--listen", f"127.0.0.1:{self.port}", "--stop-timeout", "1",
             *args],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
            env={**os.environ, "CYNCHROD_WEBHOOK_SECRET": SECRET, "CYNCHROD_LOG_LEVEL": "WARNING", **(env or {})})
        for _ in range(300):
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)

    def pids(self) -> list[int]:
        """The daemon's processes: the reconciler, the API master and its workers."""
        return tree(self.proc.pid)

    def rss_mib(self) -> float:
        """VmRSS of the reconciler, the API master and its workers, added: counts shared pages twice."""
        total = 0
        for pid in self.pids():
            status = pathlib.Path(f"/proc/{pid}/status").read_text()
            total += int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        return total / 1024

    def pss_mib(self) -> float:
        """Proportional set size of all the daemon's processes: shared pages counted once."""
        total = 0
        for pid in self.pids():
            rollup = pathlib.Path(f"/proc/{pid}/smaps_rollup").read_text()
            total += int(re.search(r"Pss:\s+(\d+)", rollup).group(1))  # type: ignore[union-attr]
        return total / 1024

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self.log.close()


def http_ok(port: int) -> bool:
    # A short timeout: while a container is replaced, docker-proxy may accept a
    # connection it cannot forward, and a long timeout would be measured as latency.
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=0.05) as r:
            return r.status == 200
    except OSError:
        return False


def wait(check: Any, timeout: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if check():
            return time.perf_counter() - t0
        time.sleep(0.005)
    raise RuntimeError("timed out")


WEB = "name: {name}\nimage: " + IMAGE + "\ncommand: [httpd, -f, -p, '8080', -h, /www]\nport: 8080\nhostPort: {port}\n" \
      "memory: 64\nenv: {{REV: '{rev}'}}\n"


def push_to_running(tmp: pathlib.Path, pushes: int) -> dict[str, Any]:
    work = tmp / "push"
    work.mkdir()
    repo = Repo(work)
    owner = "bench-push"
    port = free_port()
    repo.push({"apps/web.yaml": WEB.format(name="web", port=port, rev=0)})
    daemon = Serve(repo, work / "state", owner)
    wait(lambda: http_ok(port), 30)
    from cynchrod import store  # the daemon's own store, read beside it (WAL): its deployments' verdicts
    db = store.Store(work / "state" / "cynchrod.db")

    def newest() -> store.Deployment | None:
        app = db.live_apps().get(("default", "web"))
        found = db.deployments(app.id, limit=1) if app is not None else []
        return found[0] if found else None

    wait(lambda: (d := newest()) is not None and d.status == "running", 30)
    cyn = []
    healthy = []
    for r in range(1, pushes + 1):
        before = newest()
        after = repo.push({"apps/web.yaml": WEB.format(name="web", port=port, rev=r)})
        body = json.dumps({"ref": "refs/heads/main", "after": after}).encode()
        sig = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        old = owner_rows(owner)[0]["Id"]
        t0 = time.perf_counter()
        req = urllib.request.Request(daemon.url + "/webhooks/git", data=body, method="POST",
                                     headers={"X-Hub-Signature-256": sig, "Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=5)
        wait(lambda: (rows := owner_rows(owner)) and rows[0]["Id"] != old and rows[0]["State"] == "running"
             and http_ok(port), 30)
        cyn.append(time.perf_counter() - t0)
        # Push to healthy, same push: until its deployment's health gate says running (min_ready, 2 s
        # by default, counted from the start; the port probed).
        wait(lambda b=before: (d := newest()) is not None and b is not None and d.id > b.id  # type: ignore[misc]
             and d.status == "running", 60)
        healthy.append(time.perf_counter() - t0)
    db.close()
    daemon.stop()
    remove_owner(owner)
    bare = []
    for r in range(pushes):
        host = client.api.create_host_config(port_bindings={8080: ("127.0.0.1", port)}, mem_limit=64 * 2**20,
                                             init=True)
        t0 = time.perf_counter()
        cid = client.api.create_container(IMAGE, command=["httpd", "-f", "-p", "8080", "-h", "/www"],
                                          ports=[8080], labels={LABEL: f"{RUN}-push"}, host_config=host)["Id"]
        client.api.start(cid)
        wait(lambda: http_ok(port), 30)
        bare.append(time.perf_counter() - t0)
        client.api.remove_container(cid, force=True)
    row = {"scenario": f"push to running ({pushes} pushes)", "cynchrod_p50_s": median(cyn),
           "cynchrod_p95_s": pct(cyn, 95), "bare_create_start_p50_s": median(bare), "bare_p95_s": pct(bare, 95),
           "overhead_p50_s": median(cyn) - median(bare), "cynchrod_push_to_healthy_p50_s": median(healthy),
           "cynchrod_push_to_healthy_p95_s": pct(healthy, 95),
           "ratio_healthy_over_running_p50": median(healthy) / median(cyn)}
    log(str(row))
    return row


# -- push to running through a watched local repository (issue 15, item 3) ---------

#: Daemon debug lines that mark the steps of a push, in order (see ``_push_steps``).
PUSH_STEPS = [("delivered (watch)", r"watch: "), ("fetched", r"fetched "), ("parsed", r"read and parsed "),
              ("decided", r"decided \d+ apps"), ("image checked", r"engine inspect"),
              ("old stopped", r"engine stop"), ("old removed", r"engine remove"), ("created", r"engine create"),
              ("started", r"engine start"), ("pass done", r"pass watch ")]


def _log_stamp(line: str) -> float | None:
    match = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ", line)
    if not match:
        return None
    return time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")) + int(match.group(2)) / 1000


def _push_steps(log_path: pathlib.Path, offset: int, t0: float) -> dict[str, float]:
    """Milliseconds from the start of ``git push`` to each step, from the daemon's debug log."""
    lines = log_path.read_bytes()[offset:].decode(errors="replace").splitlines()
    steps: dict[str, float] = {}
    for line in lines:
        stamp = _log_stamp(line)
        if stamp is None:
            continue
        for step, pattern in PUSH_STEPS:
            if step not in steps and re.search(pattern, line):
                steps[step] = round((stamp - t0) * 1000, 1)
    return steps


def push_to_running_git(tmp: pathlib.Path, pushes: int, *, debug: bool = False) -> tuple[list[float], list[Any]]:
    """``git push`` into a local bare repository that ``cynchrod serve`` watches (no webhook), timed from
    the push's start until the new container is running and answers HTTP; with ``debug``, the daemon
    logs at debug level and each push's steps are read from its log (logging costs a little)."""
    work = tmp / ("push-git-debug" if debug else "push-git")
    work.mkdir()
    repo = Repo(work)
    owner = "bench-push-git"
    port = free_port()
    repo.push({"apps/web.yaml": WEB.format(name="web", port=port, rev=0)})
    state = work / "state"
    daemon = Serve(repo, state, owner, env={"CYNCHROD_LOG_LEVEL": "DEBUG"} if debug else None)
    log_path = state.parent / "daemon.log"
    wait(lambda: http_ok(port), 30)
    times, steps = [], []
    for r in range(1, pushes + 1):
        target = work / "work" / "apps" / "web.yaml"
        target.write_text(WEB.format(name="web", port=port, rev=r))
        git("commit", "-q", "-am", f"rev {r}", cwd=work / "work")
        old = owner_rows(owner)[0]["Id"]
        time.sleep(0.3)  # the last pass's trailing work (store writes) is over
        offset = log_path.stat().st_size
        wall0, t0 = time.time(), time.perf_counter()
        git("push", "-q", "origin", "HEAD:main", cwd=work / "work")
        pushed = time.perf_counter() - t0
        wait(lambda: (rows := owner_rows(owner)) and rows[0]["Id"] != old and rows[0]["State"] == "running"
             and http_ok(port), 30)
        times.append(time.perf_counter() - t0)
        if debug:
            steps.append({"git push returned": round(pushed * 1000, 1), **_push_steps(log_path, offset, wall0),
                          "running and answering": round(times[-1] * 1000, 1)})
    daemon.stop()
    remove_owner(owner)
    return times, steps


def bare_create_start_http(pushes: int) -> list[float]:
    """The peer of push to running: create+start of the same container until it answers HTTP."""
    port = free_port()
    bare = []
    for _ in range(pushes):
        host = client.api.create_host_config(port_bindings={8080: ("127.0.0.1", port)}, mem_limit=64 * 2**20,
                                             memswap_limit=64 * 2**20, init=True)
        t0 = time.perf_counter()
        cid = client.api.create_container(IMAGE, command=["httpd", "-f", "-p", "8080", "-h", "/www"],
                                          ports=[8080], labels={LABEL: f"{RUN}-push"}, host_config=host,
                                          environment={"REV": "0"})["Id"]
        client.api.start(cid)
        wait(lambda: http_ok(port), 30)
        bare.append(time.perf_counter() - t0)
        client.api.remove_container(cid, force=True)
    return bare


def bare_replace_http(pushes: int) -> list[float]:
    """A bare replace of the same container: stop+remove the old one, create+start the new one until
    it answers HTTP (what cynchrod does for an app with a host port, which cannot be bound twice)."""
    port = free_port()
    host = client.api.create_host_config(port_bindings={8080: ("127.0.0.1", port)}, mem_limit=64 * 2**20,
                                         memswap_limit=64 * 2**20, init=True)

    def make(rev: int) -> str:
        cid = client.api.create_container(IMAGE, command=["httpd", "-f", "-p", "8080", "-h", "/www"],
                                          ports=[8080], labels={LABEL: f"{RUN}-push"}, host_config=host,
                                          environment={"REV": str(rev)}, name="bench-bare-replace")["Id"]
        client.api.start(cid)
        return str(cid)

    old = make(0)
    wait(lambda: http_ok(port), 30)
    times = []
    for r in range(1, pushes + 1):
        time.sleep(0.3)
        t0 = time.perf_counter()
        client.api.stop(old, timeout=1)
        client.api.remove_container(old, force=True)
        old = make(r)
        wait(lambda: http_ok(port), 30)
        times.append(time.perf_counter() - t0)
    client.api.remove_container(old, force=True)
    return times


def push_git_rows(tmp: pathlib.Path, pushes: int) -> list[dict[str, Any]]:
    """Item 3 of issue 15: push to running through a watched repository beside a bare create+start
    (interleaved in halves, so that the host's load falls on both), and the steps of each push."""
    half = pushes // 2
    (tmp / "push-a").mkdir()
    (tmp / "push-b").mkdir()
    cyn_a, _ = push_to_running_git(tmp / "push-a", half)
    bare_a, replace_a = bare_create_start_http(half), bare_replace_http(half)
    cyn_b, _ = push_to_running_git(tmp / "push-b", pushes - half)
    bare_b, replace_b = bare_create_start_http(pushes - half), bare_replace_http(pushes - half)
    cyn, bare, replace = cyn_a + cyn_b, bare_a + bare_b, replace_a + replace_b
    _, steps = push_to_running_git(tmp, 5, debug=True)
    breakdown = {name: round(median([s[name] for s in steps if name in s]), 1)
                 for name in ["git push returned", *(p[0] for p in PUSH_STEPS), "running and answering"]
                 if any(name in s for s in steps)}
    row = {"scenario": f"push to running, git push to a watched repository ({pushes} pushes)",
           "cynchrod_p50_s": median(cyn), "cynchrod_p95_s": pct(cyn, 95),
           "bare_create_start_p50_s": median(bare), "bare_p95_s": pct(bare, 95),
           "bare_stop_remove_create_start_p50_s": median(replace),
           "overhead_p50_s": median(cyn) - median(bare), "overhead_vs_bare_replace_p50_s": median(cyn) - median(replace)}
    log(str(row))
    log(f"push steps (ms after git push starts, median of 5 with debug logging): {breakdown}")
    return [row, {"scenario": "push to running, steps (ms from the start of git push, debug log, median of 5)",
                  "breakdown_ms": breakdown}]


def self_heal(tmp: pathlib.Path, kills: int) -> dict[str, Any]:
    work = tmp / "heal"
    work.mkdir()
    repo = Repo(work)
    owner = "bench-heal"
    ports = [free_port() for _ in range(kills)]
    # One app per kill: each is a first death, so back-off (which starts at the third) is not measured.
    repo.push({f"apps/w{i}.yaml": WEB.format(name=f"w{i}", port=p, rev=0) for i, p in enumerate(ports)})
    daemon = Serve(repo, work / "state", owner)
    wait(lambda: all(http_ok(p) for p in ports), 60)
    times = []
    for i, port in enumerate(ports):
        row = next(c for c in owner_rows(owner) if c["Labels"][runtime.LABEL_APP] == f"w{i}")
        t0 = time.perf_counter()
        client.api.kill(row["Id"])
        wait(lambda: not http_ok(port), 10)
        wait(lambda: http_ok(port), 30)
        times.append(time.perf_counter() - t0)
    daemon.stop()
    remove_owner(owner)
    row = {"scenario": f"self-heal after docker kill ({kills} kills)", "cynchrod_p50_s": median(times),
           "cynchrod_p95_s": pct(times, 95)}
    log(str(row))
    return row


def tree(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in pathlib.Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo.extend(int(c) for c in (task / "children").read_text().split())
    return found


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


# GET /apps under load, log streams and memory per process: bench/api_logs.py.


def dashboard_page(tmp: pathlib.Path, n: int, requests_n: int, seconds: float) -> dict[str, Any]:
    """The dashboard's apps page for n apps, signed in as an admin: server-side render time (the page's
    Server-Timing header) when the store has not changed since the last render and the first render
    after it has; beside it GET /apps (JSON) for the same apps; and the passes that 5 browsers polling
    the list for ``seconds`` add (the list reads the store only)."""
    import http.cookiejar
    import urllib.parse

    work = tmp / f"dash-{n}"
    work.mkdir()
    repo = Repo(work)
    owner = f"bench-dash-{n}"
    repo.push(stopped_apps(n))
    state = work / "state"
    token = subprocess.run([sys.executable, "-m", "cynchrod", "token", "create", "--org", "default", "--admin",
                            "--state", str(state)], check=True, capture_output=True, text=True, cwd=ROOT).stdout.strip()
    config = work / "c.yaml"
    config.write_text(f"defaults: {{max_apps: {n + 10}}}\n")
    daemon = Serve(repo, state, owner, args=("--config", str(config)))
    api = urllib.request.Request(daemon.url + "/apps", headers={"Authorization": f"Bearer {token}"})

    def settled() -> bool:
        apps = json.loads(urllib.request.urlopen(api, timeout=5).read())["apps"]
        return len(apps) == n and all(a["status"] == "stopped" for a in apps)

    wait(settled, 120)
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    page = browser.open(daemon.url + "/signin", timeout=5).read().decode()
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    browser.open(daemon.url + "/signin", data=urllib.parse.urlencode({"token": token, "csrf_token": csrf}).encode(),
                 timeout=5).read()

    def render() -> tuple[float, float, int]:
        t0 = time.perf_counter()
        with browser.open(daemon.url + "/", timeout=10) as r:
            body = r.read()
            timing = r.headers["Server-Timing"]
        wall = (time.perf_counter() - t0) * 1000
        assert body.count(b'<tr id="row-') == n, "not every app is on the page"
        return float(timing.split("dur=")[1]), wall, len(body)

    first, _, size = render()  # the store changed since the daemon started: the rows are built
    renders = [render() for _ in range(requests_n)]
    server = [r[0] for r in renders]
    api_ms = []
    for _ in range(requests_n):
        t0 = time.perf_counter()
        urllib.request.urlopen(api, timeout=10).read()
        api_ms.append((time.perf_counter() - t0) * 1000)

    def passes() -> float:
        text = urllib.request.urlopen(daemon.url + "/metrics", timeout=5).read().decode()
        return sum(float(v) for v in re.findall(r"^cynchrod_passes_total\{[^}]*\} ([\d.e+]+)$", text, re.M))

    before = passes()
    stop = time.monotonic() + seconds

    def poller() -> None:
        while time.monotonic() < stop:
            browser.open(daemon.url + "/ui/apps.json", timeout=10).read()
            time.sleep(2)

    threads = [threading.Thread(target=poller) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    added = passes() - before
    daemon.stop()
    remove_owner(owner)
    row = {"scenario": f"dashboard apps page, {n} apps", "cynchrod_render_p50_ms": round(median(server), 2),
           "cynchrod_render_p95_ms": round(pct(server, 95), 2), "cynchrod_first_render_ms": round(first, 2),
           "page_kib": round(size / 1024, 1), "get_apps_json_p50_ms": round(median(api_ms), 2),
           "passes_added_by_5_pollers": added}
    log(str(row))
    return row


EDGE_WEB = "name: {name}\nimage: " + IMAGE + "\ncommand: [httpd, -f, -p, '8080', -h, /www]\nport: 8080\n" \
    "domain: {name}.localhost\nmemory: 64\nenv: {{REV: '{rev}'}}\n{extra}"


def edge_redeploys(tmp: pathlib.Path, redeploys: int) -> dict[str, Any]:
    """Requests failed per redeploy through a real Caddy: start-first (no host port) vs stop-first
    (a host port), same engine, same edge, same client: one request after another, fresh connections."""
    work = tmp / "edge"
    work.mkdir()
    admin_port, edge_port = free_port(), free_port()
    config = work / "caddy.json"
    config.write_text(json.dumps({"admin": {"listen": f"127.0.0.1:{admin_port}", "config": {"persist": False}},
                                  "storage": {"module": "file_system", "root": str(work / "caddy")}}))
    caddy = subprocess.Popen(["caddy", "run", "--config", str(config)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "HOME": str(work)})
    owner = "bench-edge"
    OWNERS.add(owner)
    try:
        wait(lambda: _admin_up(admin_port), 15)
        repo = Repo(work)
        state = work / "state"
        front = edge.Edge(f"http://127.0.0.1:{admin_port}", listen=f"127.0.0.1:{edge_port}", owner=owner)
        rt = local.LocalRuntime(owner=owner, stop_timeout=1)
        rec = reconciler.Reconciler(src=source.Source(str(repo.bare), state_dir=state),
                                    rt=deploy.Deployer(rt, front, ready_timeout=30, drain=1.0),
                                    db=store.Store(state / "cynchrod.db"), concurrency=CONCURRENCY, edge=front)
        host_port = free_port()
        apps = {"zd": "", "sf": f"hostPort: {host_port}\n"}
        repo.push({f"apps/{n}.yaml": EDGE_WEB.format(name=n, rev=0, extra=x) for n, x in apps.items()})
        rec.run_pass()
        row: dict[str, Any] = {"scenario": f"redeploy through the edge ({redeploys} redeploys each)"}
        for name, extra in apps.items():
            failed, sent, took = 0, 0, []
            stop = threading.Event()

            def client(host: str = f"{name}.localhost", stop: threading.Event = stop) -> None:
                nonlocal failed, sent
                while not stop.is_set():
                    conn = http.client.HTTPConnection("127.0.0.1", edge_port, timeout=5)
                    try:
                        conn.request("GET", "/", headers={"Host": host})
                        ok = conn.getresponse().status == 200
                    except (OSError, http.client.HTTPException):
                        ok = False
                    finally:
                        conn.close()
                    sent += 1
                    failed += not ok

            thread = threading.Thread(target=client)
            thread.start()
            for r in range(1, redeploys + 1):
                repo.push({f"apps/{name}.yaml": EDGE_WEB.format(name=name, rev=r, extra=extra)})
                t0 = time.perf_counter()
                result = rec.run_pass()
                took.append(time.perf_counter() - t0)
                assert result.ok, result
            stop.set()
            thread.join()
            key = "cynchrod_edge" if name == "zd" else "stop_first"
            row[f"{key}_failed_per_redeploy"] = failed / redeploys
            row[f"{key}_requests"] = sent
            row[f"{key}_redeploy_p50_s"] = median(took)
        front.close()
        rt.close()
    finally:
        remove_owner(owner)
        caddy.kill()
        caddy.wait()
    log(str(row))
    return row


def _admin_up(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/config/", timeout=1).close()
        return True
    except OSError:
        return False


#: Issue 15's own sections: push through a watched repository (item 3), the memory curve (item 5;
#: its time curves are the "cold" rows) and the simulations (item 6). Item 4 is "change".
ISSUE15 = ["pushgit", "scaling", "sim"]


def compose_file_app(i: int, rev: int = 0) -> dict[str, str | None]:
    """One compose app as a project writes it: a web and a worker, a .env, an env_file; declared
    stopped, so 300 of them need no 600 processes on a 2-core host."""
    name = f"app{i:04d}"
    return {
        f"apps/{name}/compose.yaml": (
            "services:\n  web:\n    image: ${IMAGE}\n    command: [sleep, '3600']\n    ports: ['8080']\n"
            "    environment:\n      GREETING: ${GREETING:-hello}\n    env_file: [web.env]\n"
            "    mem_limit: 64m\n    healthcheck:\n      test: [CMD, 'true']\n      interval: 5s\n"
            "    depends_on:\n      worker: {condition: service_started}\n"
            "  worker:\n    image: ${IMAGE}\n    command: sleep 3600\n    volumes: [cache:/cache]\n"
            "    mem_limit: 64m\nvolumes:\n  cache:\nx-cynchrod:\n  state: stopped\n"),
        f"apps/{name}/.env": f"IMAGE={IMAGE}\nGREETING=rev{rev}\n",
        f"apps/{name}/web.env": "LOG_LEVEL=info\n",
    }


def compose_apps(tmp: pathlib.Path, n: int, passes: int, changes: int) -> dict[str, Any]:
    """N compose apps (issue 21's cost): a no-op pass parses nothing and makes no engine call; a
    commit touching one app's ``.env`` re-parses that app alone. Parses are counted by wrapping
    ``compose.parse``; engine calls by the Docker client's response hook."""
    from cynchrod.desired import compose as compose_mod

    work = tmp / f"compose-{n}"
    work.mkdir()
    repo = Repo(work)
    owner = f"bench-compose-{n}"
    files: dict[str, str | None] = {}
    for i in range(n):
        files.update(compose_file_app(i))
    repo.push(files)
    rec, rt = harness(repo, work / "state", owner)
    parsed: list[str] = []
    real_parse = compose_mod.parse

    def counting(directory: str, *args: Any, **kwargs: Any) -> Any:
        parsed.append(directory)
        return real_parse(directory, *args, **kwargs)

    compose_mod.parse = counting  # type: ignore[assignment]
    try:
        t0 = time.perf_counter()
        first = rec.run_pass()
        first_s = time.perf_counter() - t0
        assert len(first.apps) == n and len(parsed) == n, (len(first.apps), len(parsed))
        # Their containers, created and never started (as the no-op rows make them): the pass has
        # 600 units to compare with, and no 600 processes run.
        from cynchrod.desired import declared

        desired = declared.Cache().load(*_files(rec))
        units = [(spec, svc) for spec in desired.apps.values() for svc in spec.services]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda u: rt.api.create_container(
                IMAGE, command=["sleep", "3600"], name=rt.container_name(u[0].org, u[0].name, u[1].name),
                labels={**runtime.unit_labels(rt.owner, rt.instance, u[0], u[1], 0), LABEL: f"{RUN}-compose"}),
                units))
        assert all(not a.actions for a in rec.run_pass().apps)
        stop = threading.Event()
        events = threading.Thread(target=rec.view.run, args=(stop,), daemon=True)
        events.start()
        wait(lambda: rec.view._live, 30)
        rec.run_pass()
        parsed.clear()
        calls: list[str] = []
        rt.api.hooks["response"].append(lambda resp, *a, **k: calls.append(resp.request.path_url))
        walls, cpus = noop_passes(rec, passes, n)
        noop_parses, noop_calls = len(parsed) / passes, len(calls) / passes
        change_walls, change_parses = [], []
        for r in range(changes):
            repo.push({"apps/app0007/.env": f"IMAGE={IMAGE}\nGREETING=rev{r + 1}\n"})
            parsed.clear()
            t0 = time.perf_counter()
            rec.run_pass()
            change_walls.append(time.perf_counter() - t0)
            change_parses.append(sorted(set(parsed)))
        stop.set()
        rec.view.stop()
        events.join(5)
    finally:
        compose_mod.parse = real_parse  # type: ignore[assignment]
    assert all(p == ["apps/app0007"] for p in change_parses), change_parses
    row = {"scenario": f"compose apps, no-op pass and one change, N={n}",
           "cynchrod_noop_s": median(walls), "cynchrod_noop_cpu_s": median(cpus),
           "noop_parses_per_pass": noop_parses, "noop_docker_calls_per_pass": noop_calls,
           "change_one_env_pass_s": median(change_walls), "change_one_env_apps_parsed": len(change_parses[0]),
           "first_pass_parse_all_s": first_s, "apps": n, "services": 2 * n, "containers": len(owner_rows(owner)),
           "passes": passes}
    remove_owner(owner)
    log(f"compose N={n}: {row}")
    return row


def issue15_rows(tmp: pathlib.Path, only: set[str], quick: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if "pushgit" in only:
        rows += push_git_rows(tmp, 10 if quick else 20)
    if "scaling" in only:
        rows += memory_curve(tmp, [100, 300] if quick else [100, 300, 1000])
    if "sim" in only:
        rows += simulation_rows(quick)
    return rows


def memory_curve(tmp: pathlib.Path, sizes: list[int]) -> list[dict[str, Any]]:
    """PSS of all the daemon's processes (reconciler, API master and workers; shared pages counted
    once) with N apps and their N containers: the apps are stopped ones whose containers are made
    beforehand (created, not started), so that 1,000 need no 1,000 processes; the daemon lists them,
    keeps them in its view and has a row for each."""
    rows = []
    for n in sizes:
        work = tmp / f"memcurve-{n}"
        work.mkdir()
        repo = Repo(work)
        owner = f"bench-memcurve-{n}"
        repo.push(stopped_apps(n))
        state = work / "state"
        db = store.Store(state / "cynchrod.db")
        instance = db.instance_id()
        db.close()
        OWNERS.add(owner)
        rt = local.LocalRuntime(owner=owner, instance=instance)
        from cynchrod.desired import declared

        files = [(f"apps/app{i:04d}.yaml", str(i)) for i in range(n)]
        desired = declared.Cache().load(files, lambda oid: manifest(f"app{int(oid):04d}",
                                                                    extra="state: stopped\n").encode())
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda spec: rt.api.create_container(
                IMAGE, command=["sleep", "3600"], name=rt.container_name(spec.org, spec.name, "main"),
                labels={**runtime.unit_labels(rt.owner, rt.instance, spec, spec.services[0], 0), LABEL: f"{RUN}-mem"}),
                desired.apps.values()))
        rt.close()
        config = work / "c.yaml"
        config.write_text(f"defaults: {{max_apps: {n + 10}}}\n")
        daemon = Serve(repo, state, owner, args=("--config", str(config)))

        def passes() -> float:
            text = urllib.request.urlopen(daemon.url + "/metrics", timeout=5).read().decode()
            return sum(float(v) for v in re.findall(r"^cynchrod_passes_total\{[^}]*\} ([\d.e+]+)$", text, re.M))

        wait(lambda: passes() >= 1, 120)
        time.sleep(2)
        row = {"scenario": f"daemon memory, {n} apps and containers", "cynchrod_pss_mib": round(daemon.pss_mib(), 1),
               "cynchrod_rss_mib": round(daemon.rss_mib(), 1), "processes": len(daemon.pids()), "apps": n}
        daemon.stop()
        remove_owner(owner)
        cleanup()
        rows.append(row)
        log(str(row))
    return rows


def simulation_rows(quick: bool) -> list[dict[str, Any]]:
    """Issue 15, item 6: bench/sim.py in fresh processes (the core at 10,000 apps; the store at
    10,000 apps with 20 deployments each, in 100 orgs of 100 apps)."""
    n = 2000 if quick else 10000

    def sim(*args: str) -> dict[str, Any]:
        out = subprocess.run([sys.executable, str(ROOT / "bench" / "sim.py"), *args], check=True,
                             capture_output=True, text=True, cwd=ROOT).stdout
        return dict(json.loads(out.strip().splitlines()[-1]))

    core = sim("core", str(n), "100")
    bodies = sim("store", str(n), "20", "100")
    rows = [{"scenario": f"simulation: no-op decision, {n} apps (in-memory runtime)", **core},
            {"scenario": f"simulation: GET /apps body per org, cold cache, {n} apps x 20 deployments", **bodies}]
    for row in rows:
        log(str(row))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller N and fewer repeats")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    parser.add_argument("--only", choices=["cold", "noop", "change", "push", "heal", "api", "logs", "memory", "dash",
                                           "edge", "swarm", "compose", *ISSUE15],
                        action="append",
                        help="run these scenarios only; their rows replace the same rows in --out")
    args = parser.parse_args()
    only = set(args.only or ["cold", "noop", "change", "push", "heal", "api", "logs", "memory", "dash", "edge",
                             "compose", *ISSUE15])
    quick = args.quick
    build_image()
    cleanup()
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["bench/run.py", *sys.argv[1:]]),
        "host": {"name": platform.node(), "cores": os.cpu_count(), "kernel": platform.release(),
                 "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                                                   "docker": client.version()["Version"],
                                                   "python": platform.python_version()},
        "concurrency": CONCURRENCY, "rows": []}
    with tempfile.TemporaryDirectory(prefix="cynchrod-bench-") as tmpdir:
        tmp = pathlib.Path(tmpdir)
        rows = results["rows"]
        failed: list[str] = []

        def section(name: str, measure: Callable[[], list[dict[str, Any]]]) -> None:
            """One section's rows; one that fails is logged and named in ``failed_sections``, and
            the run goes on (a crash at the end used to lose every row measured before it)."""
            try:
                rows.extend(measure())
            except Exception:
                log(f"section {name} failed:\n{traceback.format_exc()}")
                failed.append(name)
            finally:
                cleanup()

        if "cold" in only:
            section("cold", lambda: cold_converge(tmp, [10, 100] if quick else [10, 100, 300], 1 if quick else 3))
        if "noop" in only:
            section("noop", lambda: [noop_pass(tmp, 100, 20), noop_pass(tmp, 300 if quick else 1000, 20)])
        if "change" in only:
            section("change", lambda: [change_one(tmp, 100 if quick else 300, 5 if quick else 10)])
        if "push" in only:
            section("push", lambda: [push_to_running(tmp, 5 if quick else 20)])
        if "heal" in only:
            section("heal", lambda: [self_heal(tmp, 5 if quick else 10)])
        if only & {"api", "logs", "memory"}:
            # GET /apps under load, log streams, memory per process: bench/api_logs.py.
            sys.modules.setdefault("run", sys.modules[__name__])
            import api_logs

            section("api/logs/memory", lambda: api_logs.run(only, tmp, quick))
        if "dash" in only:
            section("dash", lambda: [dashboard_page(tmp, 300, 20 if quick else 100, 6 if quick else 20)])
        if "edge" in only:
            section("edge", lambda: [edge_redeploys(tmp, 5 if quick else 10)])
        section("issue 15", lambda: issue15_rows(tmp, only, quick))
        if "compose" in only:
            section("compose", lambda: [compose_apps(tmp, 300, 20, 3 if quick else 10)])
        if "swarm" in only:
            section("swarm", lambda: swarm_rows(tmp, 10 if quick else 100, 300 if quick else 1000, 10))
        if failed:
            results["failed_sections"] = failed
    out = pathlib.Path(args.out)
    if not args.only and out.exists():
        # A full run: rows it does not measure (the swarm lab's, run with --only swarm) are carried
        # over from the file it replaces, marked with the run they come from.
        previous = json.loads(out.read_text())
        fresh = {r["scenario"] for r in results["rows"]}
        for row in previous["rows"]:
            # Only the swarm lab's: a scenario a full run no longer measures is gone, not kept stale.
            if row["scenario"] not in fresh and row["scenario"].startswith("swarm "):
                when = row.get("from_earlier_run") or row.get("from_partial_run", previous["date"]).split(",")[0]
                results["rows"].append({**{k: v for k, v in row.items() if k != "from_partial_run"},
                                        "from_earlier_run": when})
    if args.only and out.exists():
        # Keep the other scenarios' rows from the last full run; replace the re-run ones. The header
        # (date, command, host) stays the full run's; each re-run row says its own run.
        previous = json.loads(out.read_text())
        rerun = f"{results['date']}, {results['command']}"
        results.update({k: previous[k] for k in ("date", "started_at", "command", "host") if k in previous})
        fresh = {r["scenario"]: {**r, "from_partial_run": rerun} for r in results["rows"]}
        results["rows"] = [fresh.pop(r["scenario"], r) for r in previous["rows"]] + list(fresh.values())
        results["partial_rerun"] = sorted(set(previous.get("partial_rerun", [])) | only)
    out.write_text(json.dumps(results, indent=2) + "\n")
    for row in results["rows"]:
        print(" | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
