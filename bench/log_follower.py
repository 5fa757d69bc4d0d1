"""The live log follower's CPU per line (``Runtime.follow`` of the local driver, no API in between).

Run: ``.venv/bin/python bench/log_follower.py [--lines 100000] [--repeats 3] [--reader old --reader new]``;
prints one JSON row a scenario and reader (its ``--out`` file gets them too). A container of this
run (labelled as an app's, under an owner of its own) prints its lines, then sleeps; once its log
holds them all, a follower opened from its first line reads them, and the process's CPU time (every
thread: the engine stream's reader and the consumer) over the lines read is the figure. Scenarios:
``short`` (lines of 80 bytes, one engine message each) and ``long`` (lines of 100 KiB, which the
engine splits into 16 KiB pieces: joined and cut at 32 KiB). Readers (``--reader``, more than one:
their runs alternate on the same containers): ``new``, the driver's own (``_docker.EngineStream``:
the engine's frames parsed from 64 KiB reads), and ``old``, docker-py's ``logs(stream=True)`` (one
engine message an item, two HTTP-client reads each), the one before it.
CPU time, not wall time: the host is shared, and a process's own CPU is what it costs whatever the load.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time
import uuid
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import run as base  # bench/run.py: the image and docker helpers

from cynchrod import runtime
from cynchrod.runtime import local

OWNER = f"bench-logs-{uuid.uuid4().hex[:8]}"
SCRIPTS = {
    # One engine message a line (80 bytes with the newline).
    "short": "seq 1 {n} | sed 's/$/ " + "x" * 70 + "/' | cut -c1-79",
    # Lines of 100 KiB: seven engine messages each.
    "long": "x=$(head -c 102400 /dev/zero | tr '\\0' x); i=0; while [ $i -lt {n} ]; do echo \"$x\"; i=$((i+1)); done",
}


def container(scenario: str, n: int) -> str:
    script = SCRIPTS[scenario].format(n=n) + "; echo END; sleep 3600"
    labels = {runtime.LABEL_OWNER: OWNER, runtime.LABEL_INSTANCE: "", runtime.LABEL_ORG: "default",
              runtime.LABEL_APP: scenario, runtime.LABEL_SERVICE: "main", runtime.LABEL_REPLICA: "0",
              base.LABEL: base.RUN}
    host = base.client.api.create_host_config(log_config={"type": "json-file", "config": {"max-size": "1g"}})
    made = base.client.api.create_container(base.IMAGE, ["sh", "-c", script], labels=labels, host_config=host)
    base.client.api.start(made["Id"])
    deadline = time.monotonic() + 300
    while not base.client.api.logs(made["Id"], tail=1).startswith(b"END"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{scenario}: the container did not print its lines in 300 s")
        time.sleep(0.2)
    return str(made["Id"])


def _docker_py_open(self: Any, instance: str, since: float) -> Any:
    """The ``old`` reader: docker-py's own stream of messages (``_docker.whole_lines`` joins them)."""
    return self._client.api.logs(instance, stdout=True, stderr=True, stream=True, follow=True,
                                 timestamps=True, since=since)


OPENS = {"new": local._AppLogs._open, "old": _docker_py_open}


def follow_once(rt: local.LocalRuntime, scenario: str, reader: str) -> tuple[int, float, float]:
    """Lines read up to ``END``, the process's CPU seconds and the wall seconds it took."""
    local._AppLogs._open = OPENS[reader]  # type: ignore[method-assign]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    follower = rt.follow("default", scenario, since=1.0)
    lines = 0
    try:
        for batch in follower.batches():
            lines += len(batch)
            if batch and batch[-1].line == "END":
                break
    finally:
        follower.close()
    return lines, time.process_time() - cpu0, time.perf_counter() - wall0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=100_000, help="lines of the short scenario")
    parser.add_argument("--long-lines", type=int, default=300, help="lines of 100 KiB of the long scenario")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=sorted(SCRIPTS), action="append")
    parser.add_argument("--reader", choices=sorted(OPENS), action="append",
                        help="the engine stream's reader (again: each, runs alternating); new unless told")
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    base.build_image()
    base.OWNERS.add(OWNER)
    rt = local.LocalRuntime(owner=OWNER)
    rows: list[dict[str, Any]] = []
    try:
        for scenario in args.only or sorted(SCRIPTS, reverse=True):
            n = args.lines if scenario == "short" else args.long_lines
            container(scenario, n)
            readers = args.reader or ["new"]
            every: dict[str, list[tuple[int, float, float]]] = {reader: [] for reader in readers}
            for _ in range(args.repeats):
                for reader in readers:
                    every[reader].append(follow_once(rt, scenario, reader))
            for reader, runs in every.items():
                cpu = statistics.median(r[1] for r in runs)
                wall = statistics.median(r[2] for r in runs)
                row = {"scenario": f"log follower, {scenario} lines", "reader": reader, "lines": runs[0][0],
                       "cpu_us_per_line": round(cpu / runs[0][0] * 1e6, 2),
                       "cpu_us_per_line_runs": [round(r[1] / r[0] * 1e6, 2) for r in runs],
                       "lines_per_s": round(runs[0][0] / wall), "repeats": args.repeats}
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        base.cleanup()
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
