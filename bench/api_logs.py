"""Benchmarks of the API processes: ``GET /apps`` under load, log streams, memory per process.

Run on its own: ``.venv/bin/python bench/api_logs.py --only api,logs,memory [--quick]``
(its rows replace the same rows of ``bench/results.json``), or through ``bench/run.py``
(``--only api``, ``--only logs``, ``--only memory``), which calls the functions here.

Run it as ``nice -n -10 .venv/bin/python bench/api_logs.py ...`` on a host shared with other
work: the daemon and wrk (its children) then get their share of the cores whatever the others
run (dockerd is not niced). Honest about the load generator: the machine has 2 cores shared by the daemon, the
generator and anything else running, so every ``GET /apps`` row names its generator
and gives the CPU the daemon and the generator used (cores, over the run), the daemon's
CPU per request, and the load average: a daemon far under 2 cores with a busy machine
is starved, not slow (``daemon_runqueue_wait_s_per_s``: seconds its processes spent runnable
but waiting for a core, per second). ``wrk -t4`` (the earlier runs' generator) is compared with
``wrk -t1`` (one thread, the lightest generator here).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any

import run as base  # bench/run.py: the repo, the daemon and docker helpers

ROOT = base.ROOT


def _remove(owner: str) -> None:
    """This owner's containers, gone (another benchmark's clean-up may remove some first: the
    bench image's label is on every container made from it)."""
    for row in base.owner_rows(owner):
        with contextlib.suppress(base.docker.errors.NotFound, base.docker.errors.APIError):
            base.client.api.remove_container(row["Id"], force=True)


def _token(state: pathlib.Path, *extra: str) -> str:
    return subprocess.run([sys.executable, "-m", "cynchrod", "token", "create", "--org", "default", *extra,
                           "--state", str(state)], check=True, capture_output=True, text=True,
                          cwd=ROOT).stdout.strip()


def _loadavg() -> float:
    return float(pathlib.Path("/proc/loadavg").read_text().split()[0])


def _role(pid: int, daemon_pid: int) -> str:
    """reconciler (the ``serve`` process), api-master (gunicorn's arbiter) or api-worker."""
    if pid == daemon_pid:
        return "reconciler"
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    ppid = int(stat.rsplit(")", 1)[1].split()[1])
    return "api-master" if ppid == daemon_pid else "api-worker"


def _rollup(pid: int) -> dict[str, int]:
    """kB figures of /proc/PID/smaps_rollup (Rss, Pss, Private_* ...)."""
    out = {}
    for line in pathlib.Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        out[key.strip()] = int(rest.split()[0])
    return out


def _runqueue_wait_s(pids: list[int]) -> float:
    """Seconds these processes have spent runnable but waiting for a core (/proc/PID/schedstat)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += int(pathlib.Path(f"/proc/{pid}/schedstat").read_text().split()[1])
    return total / 1e9


def wrk_run(url: str, token: str, seconds: int, *, threads: int, connections: int,
            pids: list[int]) -> dict[str, Any]:
    """One ``wrk`` run: throughput, latency percentiles, and the CPU the daemon and wrk used."""
    cpu0, t0, load0, wait0 = base._cpu_seconds(pids), time.perf_counter(), _loadavg(), _runqueue_wait_s(pids)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency",
                          "-H", f"Authorization: Bearer {token}", url],
                         capture_output=True, text=True, check=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter() - t0
    daemon_cpu = base._cpu_seconds(pids) - cpu0
    waited = _runqueue_wait_s(pids) - wait0

    def ms(pct: str) -> float:
        value, unit = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        return round(float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit], 2)

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    gen_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"rps": round(rps), "p50_ms": ms("50"), "p90_ms": ms("90"), "p99_ms": ms("99"),
            "non_2xx": int(errors.group(1)) if errors else 0,
            "daemon_cpu_cores": round(daemon_cpu / wall, 2), "generator_cpu_cores": round(gen_cpu / wall, 2),
            "daemon_cpu_ms_per_request": round(1000 * daemon_cpu / max(1.0, rps * wall), 3),
            # Runnable but not running (summed over the daemon's processes): a starved daemon.
            "daemon_runqueue_wait_s_per_s": round(waited / wall, 2),
            "loadavg_1m": round(max(load0, _loadavg()), 2)}


def _connections_per_worker(port: int) -> list[int]:
    """Established connections to ``port`` per API worker (how accepts were spread)."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"], capture_output=True,
                         text=True).stdout
    counts: dict[str, int] = {}
    for pid in re.findall(r"pid=(\d+)", out):
        counts[pid] = counts.get(pid, 0) + 1
    return sorted(counts.values(), reverse=True)


def api_get_apps(tmp: pathlib.Path, n: int = 300, seconds: int = 10, concurrency: int = 4) -> list[dict[str, Any]]:
    """``GET /apps`` with ``n`` apps and 32 clients: idle (wrk -t4 and wrk -t1), then during a
    converge of the ``n`` apps (the stopped apps set running: ``n`` containers created) with
    the reconciler's ``concurrency``. Other than the default 4: idle with wrk -t1 only, and the
    rows' names say the concurrency (how converge speed trades against the API's latency)."""
    suffix = "" if concurrency == 4 else f", concurrency {concurrency}"
    work = tmp / f"api-{n}-c{concurrency}"
    work.mkdir()
    repo = base.Repo(work)
    owner = f"bench-api-{n}-c{concurrency}"
    repo.push({f"apps/app{i:04d}.yaml": base.manifest(f"app{i:04d}", extra="state: stopped\n") for i in range(n)})
    state = work / "state"
    token = _token(state)
    config = work / "c.yaml"
    config.write_text(f"defaults: {{max_apps: {n + 10}}}\nconcurrency: {concurrency}\n")
    daemon = base.Serve(repo, state, owner, args=("--config", str(config)))
    url = daemon.url + "/apps"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    base.wait(lambda: len(json.loads(urllib.request.urlopen(req, timeout=5).read())["apps"]) == n, 60)
    time.sleep(1)
    pids = daemon.pids()
    rows: list[dict[str, Any]] = []
    spread: list[list[int]] = []

    def sample_spread() -> None:
        time.sleep(2)
        spread.append(_connections_per_worker(daemon.port))

    for threads in (4, 1) if concurrency == 4 else (1,):
        t = threading.Thread(target=sample_spread)
        t.start()
        idle = wrk_run(url, token, seconds, threads=threads, connections=32, pids=pids)
        t.join()
        rows.append({"scenario": f"GET /apps, {n} apps, 32 clients, idle, wrk -t{threads}{suffix}", **idle,
                     "connections_per_worker": spread[-1]})
        base.log(str(rows[-1]))
    # The converge: every app set running at once (the push wakes the reconciler through the watch).
    repo.push({f"apps/app{i:04d}.yaml": base.manifest(f"app{i:04d}") for i in range(n)})
    base.wait(lambda: len(base.owner_rows(owner)) >= 4, 60)
    before, started = len(base.owner_rows(owner)), time.perf_counter()
    busy = wrk_run(url, token, seconds, threads=1, connections=32, pids=pids)
    made = len(base.owner_rows(owner))
    pace = (made - before) / (time.perf_counter() - started)
    rows.append({"scenario": f"GET /apps, {n} apps, 32 clients, during a {n}-app converge, wrk -t1{suffix}", **busy,
                 "containers_made_meanwhile": made, "containers_per_s": round(pace, 2),
                 "p99_vs_idle": round(busy["p99_ms"] / rows[-1]["p99_ms"], 2)})
    base.log(str(rows[-1]))
    # SIGTERM would stop the reconciler after this converge: minutes on a busy host.
    os.killpg(daemon.proc.pid, base.signal.SIGKILL)
    daemon.proc.wait(60)
    daemon.log.close()
    _remove(owner)
    return rows


def memory_per_process(tmp: pathlib.Path, sizes: list[int]) -> list[dict[str, Any]]:
    """PSS (shared pages counted once) and private memory of each daemon process, with ``n``
    apps declared (stopped: the figure is the daemon's, not the containers')."""
    rows = []
    for n in sizes:
        work = tmp / f"mem-{n}"
        work.mkdir()
        repo = base.Repo(work)
        owner = f"bench-mem-{n}"
        repo.push({f"apps/app{i:04d}.yaml": base.manifest(f"app{i:04d}", extra="state: stopped\n")
                   for i in range(n)})
        state = work / "state"
        token = _token(state)
        config = work / "c.yaml"
        config.write_text(f"defaults: {{max_apps: {n + 10}}}\n")
        daemon = base.Serve(repo, state, owner, args=("--config", str(config)))
        req = urllib.request.Request(daemon.url + "/apps", headers={"Authorization": f"Bearer {token}"})
        base.wait(lambda r=req, k=n: len(json.loads(urllib.request.urlopen(r, timeout=5).read())["apps"]) == k, 120)
        # Every worker serves a few requests first (its caches filled, as in use).
        for _ in range(20):
            urllib.request.urlopen(req, timeout=5).read()
        time.sleep(1)
        per: list[dict[str, Any]] = []
        for pid in daemon.pids():
            r = _rollup(pid)
            per.append({"role": _role(pid, daemon.proc.pid), "pss_mib": round(r["Pss"] / 1024, 1),
                        "rss_mib": round(r["Rss"] / 1024, 1),
                        "private_mib": round((r["Private_Clean"] + r["Private_Dirty"]) / 1024, 1)})
        per.sort(key=lambda p: ["reconciler", "api-master", "api-worker"].index(p["role"]))
        rows.append({"scenario": f"daemon memory, {n} apps declared",
                     "cynchrod_pss_mib": round(sum(p["pss_mib"] for p in per), 1),
                     "cynchrod_rss_mib": round(sum(p["rss_mib"] for p in per), 1), "processes": per})
        base.log(str(rows[-1]))
        daemon.stop()
        _remove(owner)
    return rows


def log_streams(tmp: pathlib.Path, seconds: float) -> list[dict[str, Any]]:
    """Lines/s to one WebSocket client of an app printing flat out, against ``docker logs -f``
    of the same container in the same run; then the daemon's CPU with 1 and with 20 clients
    of an app printing ~100 lines/s."""
    from cynchrod.cli.client import websocket

    work = tmp / "logs"
    work.mkdir()
    repo = base.Repo(work)
    owner = "bench-logs"
    flood = "[sh, -c, 'i=0; while true; do echo line $i; i=$((i+1)); done']"
    slow = "[sh, -c, 'i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.01; done']"
    repo.push({"apps/flood.yaml": f"name: flood\nimage: {base.IMAGE}\ncommand: {flood}\nmemory: 64\n",
               "apps/slow.yaml": f"name: slow\nimage: {base.IMAGE}\ncommand: {slow}\nmemory: 64\n"})
    state = work / "state"
    token = _token(state)
    daemon = base.Serve(repo, state, owner)
    req = urllib.request.Request(daemon.url + "/apps", headers={"Authorization": f"Bearer {token}"})

    def ids() -> dict[str, str]:
        apps = json.loads(urllib.request.urlopen(req, timeout=5).read())["apps"]
        return {a["name"]: a["id"] for a in apps if a["status"] == "running"}

    base.wait(lambda: len(ids()) == 2, 60)
    app_ids = ids()
    ws_base = daemon.url.replace("http://", "ws://")
    pids = daemon.pids()

    def count_ws(app: str, duration: float) -> int:
        ws = websocket(f"{ws_base}/apps/{app_ids[app]}/logs/stream?token={token}")
        n, end = 0, time.perf_counter() + duration
        while time.perf_counter() < end:
            message = ws.receive(timeout=0.5)
            if message is not None:
                n += len(json.loads(message))  # a message is a JSON array of lines
        ws.close()
        return n

    def docker_logs_f(duration: float) -> int:
        flood_id = next(c["Id"] for c in base.owner_rows(owner) if c["Labels"][base.runtime.LABEL_APP] == "flood")
        proc = subprocess.Popen(["docker", "logs", "-f", "--since", "0s", flood_id], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        n, end = 0, time.perf_counter() + duration
        assert proc.stdout is not None
        for _ in proc.stdout:
            n += 1
            if time.perf_counter() >= end:
                break
        proc.kill()
        proc.wait()
        return n

    # Alternated, twice each, so a neighbour's burst of load does not land on one side only.
    ours, theirs, ws_cpu = [], [], []
    for _ in range(2):
        cpu0, t0 = base._cpu_seconds(pids), time.perf_counter()
        ours.append(count_ws("flood", seconds) / seconds)
        ws_cpu.append((base._cpu_seconds(pids) - cpu0) / (time.perf_counter() - t0))
        theirs.append(docker_logs_f(seconds) / seconds)
    cpu0, t0 = base._cpu_seconds(pids), time.perf_counter()
    time.sleep(seconds)
    idle_cpu = (base._cpu_seconds(pids) - cpu0) / (time.perf_counter() - t0)

    def followers(k: int) -> tuple[float, list[int]]:
        """CPU (cores) of the daemon while ``k`` clients follow the ~100 line/s app."""
        counts: list[int] = []
        threads = [threading.Thread(target=lambda: counts.append(count_ws("slow", seconds))) for _ in range(k)]
        cpu0, t0 = base._cpu_seconds(pids), time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return (base._cpu_seconds(pids) - cpu0) / (time.perf_counter() - t0), counts

    one_cpu, one_counts = followers(1)
    busy_cpu, counts = followers(20)
    daemon.stop()
    _remove(owner)
    best_ours, best_theirs = max(ours), max(theirs)
    rows = [{"scenario": "log stream, one app printing flat out", "cynchrod_ws_lines_per_s": round(best_ours),
             "docker_logs_f_lines_per_s": round(best_theirs), "ratio_vs_docker_logs": best_ours / best_theirs,
             "runs_ws_lines_per_s": [round(x) for x in ours], "runs_docker_logs_f": [round(x) for x in theirs],
             "cynchrod_cpu_cores_while_streaming": round(max(ws_cpu), 2)},
            {"scenario": "log stream, 20 followers of a 100 line/s app", "cynchrod_cpu_idle": round(idle_cpu, 3),
             "cynchrod_cpu_1_follower": round(one_cpu, 3), "cynchrod_cpu_20_followers": round(busy_cpu, 3),
             "ratio_20_vs_1_follower_cpu": busy_cpu / one_cpu if one_cpu else None,
             "lines_1_follower_per_s": round(one_counts[0] / seconds),
             "lines_per_follower_per_s": round(base.median([c / seconds for c in counts]))}]
    for row in rows:
        base.log(str(row))
    return rows


def _guarded(scenario: Any, owner_prefix: str) -> Any:
    """``scenario`` whose daemons and containers are gone after it, also when it fails."""
    def call(*args: Any) -> Any:
        started = set(_daemons())
        try:
            return scenario(*args)
        finally:
            for pid in set(_daemons()) - started:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, base.signal.SIGKILL)
            for row in base.client.api.containers(all=True, filters={"label": base.runtime.LABEL_OWNER}):
                if row["Labels"][base.runtime.LABEL_OWNER].startswith(owner_prefix):
                    with contextlib.suppress(base.docker.errors.NotFound, base.docker.errors.APIError):
                        base.client.api.remove_container(row["Id"], force=True)
    return call


def _daemons() -> list[int]:
    """Process groups of daemons this run started (``Serve`` starts each in its own session)."""
    out = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            pid = int(stat.parent.name)
            if int(fields[1]) == os.getpid() and int(fields[3]) == pid:  # our child leading its own group
                out.append(pid)
    return out


def run(only: set[str], tmp: pathlib.Path, quick: bool) -> list[dict[str, Any]]:
    """The rows of the scenarios named in ``only`` (api, logs, memory)."""
    rows: list[dict[str, Any]] = []
    if "api" in only and base.shutil.which("wrk"):
        rows += _guarded(api_get_apps, "bench-api-")(tmp, 300, 5 if quick else 10)
        # The same converge one container at a time: the API's share of the CPU against the pace.
        rows += _guarded(api_get_apps, "bench-api-")(tmp, 300, 5 if quick else 10, 1)
    if "memory" in only:
        rows += _guarded(memory_per_process, "bench-mem-")(tmp, [100, 1000])
    if "logs" in only:
        rows += _guarded(log_streams, "bench-logs")(tmp, 5 if quick else 10)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="api,logs,memory", help="comma-separated: api, logs, memory")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results.json"),
                        help="rows replace the same scenarios' rows in this file ('-': print only)")
    args = parser.parse_args()
    only = set(args.only.split(","))
    base.build_image()
    # Only this module's owners are removed (run.py's cleanup() would take another run's containers).
    with tempfile.TemporaryDirectory(prefix="cynchrod-bench-") as tmpdir:
        rows = run(only, pathlib.Path(tmpdir), args.quick)
    for row in rows:
        print(json.dumps(row))
    if args.out != "-":
        out = pathlib.Path(args.out)
        results = json.loads(out.read_text())
        fresh = {r["scenario"]: r for r in rows}
        results["rows"] = [fresh.pop(r["scenario"], r) for r in results["rows"]] + list(fresh.values())
        results["partial_rerun"] = sorted(set(results.get("partial_rerun", [])) | only)
        out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
