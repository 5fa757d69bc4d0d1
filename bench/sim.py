"""Past this machine, by simulation (issue 15, item 6); run by ``bench/run.py --only sim``.

``python bench/sim.py core N``: N manifests parsed by the real parser (``manifests.Cache``),
tagged as the reconciler tags them, applied to the in-memory runtime
(``cynchrod/runtime/memory.py``), their rows in a real store; then the pure decision
(``decisions.decide``) of a no-op pass over them is timed, and this process's memory
(VmRSS and PSS, interpreter and libraries included) is read after it.

``python bench/sim.py store N DEPLOYMENTS ORGS``: a real store with N apps in ORGS orgs and
DEPLOYMENTS finished deployments each; the body of ``GET /apps`` for one org is built from
a cold cache (the store's query and the API's own ``app_json``, as ``list_apps`` builds it),
for every org, and for an admin (all orgs).

Each prints one JSON object. Run in a fresh process each, so that memory is this work's alone.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cynchrod import store  # noqa: E402
from cynchrod.core import decisions, planning  # noqa: E402
from cynchrod.desired import manifests  # noqa: E402
from cynchrod.runtime.memory import MemoryRuntime  # noqa: E402
from cynchrod.shell import reconciler  # noqa: E402

SOURCE = "file:///sim/apps.git"


def manifest(org: str, name: str) -> bytes:
    return (f"name: {name}\norg: {org}\nimage: registry.local/{org}/{name}:1\ncommand: [sleep, '3600']\n"
            f"cpu: 0.1\nmemory: 64\nport: 8080\nenv: {{MODE: production, APP: {name}}}\n").encode()


def proc_memory_mib() -> tuple[float, float]:
    rss = int(re.search(r"VmRSS:\s+(\d+)", pathlib.Path("/proc/self/status").read_text()).group(1))  # type: ignore[union-attr]
    pss = int(re.search(r"Pss:\s+(\d+)", pathlib.Path("/proc/self/smaps_rollup").read_text()).group(1))  # type: ignore[union-attr]
    return rss / 1024, pss / 1024


def core(n: int, orgs: int) -> dict[str, object]:
    t0 = time.perf_counter()
    blobs = {f"blob{i}": manifest(f"org{i % orgs:03d}", f"app{i:05d}") for i in range(n)}
    files = [(f"apps/app{i:05d}.yaml", f"blob{i}") for i in range(n)]
    desired = manifests.Cache().load(files, blobs.__getitem__)
    assert not desired.errors and len(desired.apps) == n, desired.errors[:3]
    specs_ = {k: dataclasses.replace(v, source=SOURCE) for k, v in desired.apps.items()}
    del blobs
    rt = MemoryRuntime()
    with tempfile.TemporaryDirectory() as tmp:
        db = store.Store(pathlib.Path(tmp) / "cynchrod.db")
        first = decisions.decide(decisions.Inputs(desired=specs_, rows={}, units=[], now=0.0, read=frozenset({SOURCE}),
                                                  max_apps={o: n for o in {k[0] for k in specs_}}))
        for d in first:
            for action in d.actions:
                rt.apply(action)
        with db.batch():
            for spec in specs_.values():
                app = db.ensure_app(spec, commit="c" * 40)
                db.update_app(app.id, status=decisions.RUNNING, deployed_hash=spec.hash)
        setup_s = time.perf_counter() - t0
        rows = db.live_apps()
        units = rt.list_units()
        caps = {o: n for o in {k[0] for k in specs_}}
        reconciler.freeze_heap()  # as the daemon does after a pass that loaded a new commit of many apps
        times, cpu = [], []
        for _ in range(7):
            t1, c1 = time.perf_counter(), time.process_time()
            plan = decisions.decide(decisions.Inputs(desired=specs_, rows=rows, units=units, now=1.0,
                                                     read=frozenset({SOURCE}), max_apps=caps))
            times.append(time.perf_counter() - t1)
            cpu.append(time.process_time() - c1)
            assert len(plan) == n and not any(d.acts or d.prune for d in plan), \
                [d for d in plan if d.acts][:2]
        rss, pss = proc_memory_mib()
        db.close()
    return {"apps": n, "orgs": orgs, "units": len(units), "noop_decide_first_ms": round(times[0] * 1000, 1),
            "noop_decide_p50_ms": round(statistics.median(times[1:]) * 1000, 1),
            "noop_decide_cpu_p50_ms": round(statistics.median(cpu[1:]) * 1000, 1),
            "process_rss_mib": round(rss, 1), "process_pss_mib": round(pss, 1), "setup_s": round(setup_s, 1)}


def store_bodies(n: int, deployments: int, orgs: int) -> dict[str, object]:
    from cynchrod.api.apps import app_json
    from cynchrod.core import specs

    with tempfile.TemporaryDirectory() as tmp:
        db = store.Store(pathlib.Path(tmp) / "cynchrod.db")
        t0 = time.perf_counter()
        with db.batch():
            for i in range(n):
                org, name = f"org{i % orgs:03d}", f"app{i:05d}"
                spec = specs.AppSpec(org=org, name=name, services=(specs.ServiceSpec(
                    name="main", image=f"registry.local/{org}/{name}:1", memory=64, port=8080),), source=SOURCE,
                    path=f"apps/{name}.yaml")
                app = db.ensure_app(spec, commit="c" * 40)
                db.update_app(app.id, status=decisions.RUNNING, deployed_hash=spec.hash, container_id="f" * 64,
                              services_json=json.dumps([{"name": "main", "image": spec.services[0].image,
                                                         "port": 8080, "replicas": 1, "units": [{
                                                             "replica": 0, "state": planning.RUNNING}]}]))
            ids = [r[0] for r in db._db.execute("SELECT id FROM apps")]
            stamp = store.now()
            db._db.executemany(
                'INSERT INTO deployments (app_id, "commit", trigger, status, started_at, finished_at) '
                "VALUES (?,?,?,?,?,?)",
                ((app_id, f"{k:040x}", "push", decisions.RUNNING, stamp, stamp)
                 for app_id in ids for k in range(deployments)))
        setup_s = time.perf_counter() - t0
        count = db._db.execute("SELECT COUNT(*) FROM deployments").fetchone()[0]
        db.close()
        per_org, sizes = [], []
        for o in range(orgs):
            db = store.Store(pathlib.Path(tmp) / "cynchrod.db")  # a cold cache: a new process's store
            t1 = time.perf_counter()
            body = json.dumps({"apps": [app_json(a) for a in db.apps(org=f"org{o:03d}", include_removed=False)]},
                              separators=(",", ":")).encode()
            per_org.append(time.perf_counter() - t1)
            sizes.append(len(body))
            db.close()
        db = store.Store(pathlib.Path(tmp) / "cynchrod.db")
        t1 = time.perf_counter()
        everything = json.dumps({"apps": [app_json(a) for a in db.apps(include_removed=False)]},
                                separators=(",", ":")).encode()
        admin_ms = (time.perf_counter() - t1) * 1000
        db.close()
    per_org.sort()
    return {"apps": n, "orgs": orgs, "apps_per_org": n // orgs, "deployments": count,
            "org_body_p50_ms": round(statistics.median(per_org) * 1000, 2),
            "org_body_max_ms": round(per_org[-1] * 1000, 2), "org_body_kib": round(statistics.median(sizes) / 1024, 1),
            "admin_body_ms": round(admin_ms, 1), "admin_body_kib": round(len(everything) / 1024, 1),
            "setup_s": round(setup_s, 1)}


def main() -> int:
    what = sys.argv[1]
    if what == "core":
        out = core(int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 100)
    else:
        out = store_bodies(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
