"""Rebuild results.json from the log of a run of ``bench/run.py`` that measured every section but
failed before writing its file (it logs each row as it is made). Marks the file as rebuilt.

``python bench/from_log.py LOG STARTED_AT [DROPPED...]``; rows the log lacks are carried over
from the results.json it replaces, marked with their run's date, as a full run does.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import platform
import re
import sys

import docker

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = "push to running, steps (ms from the start of git push, debug log, median of 5)"


def main() -> int:
    log_path, started = pathlib.Path(sys.argv[1]), sys.argv[2]
    rows = []
    for line in log_path.read_text().splitlines():
        if line.startswith("{'scenario'"):
            rows.append(ast.literal_eval(line))
        elif m := re.match(r"^(?:cold converge N=\d+|no-op N=\d+): (\{'scenario'.*\})$", line):
            rows.append(ast.literal_eval(m.group(1)))
        elif m := re.match(r"^push steps \(.*\): (\{.*\})$", line):
            rows.append({"scenario": STEPS, "breakdown_ms": ast.literal_eval(m.group(1))})
    out = ROOT / "bench" / "results.json"
    previous = json.loads(out.read_text())
    client = docker.from_env()
    results = {
        "date": started[:10], "started_at": started, "command": "bench/run.py",
        "rebuilt_from_log": f"bench/from_log.py {log_path.name}: the run measured every section, then failed "
                            "before writing this file (the dashboard section returned no row); its rows are "
                            "read back from its log",
        "host": {"name": platform.node(), "cores": os.cpu_count(), "kernel": platform.release(),
                 "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                 "docker": client.version()["Version"], "python": platform.python_version()},
        "concurrency": 4, "rows": rows}
    fresh = {r["scenario"] for r in rows}
    for row in previous["rows"]:
        if row["scenario"] not in fresh:
            rows.append({**row, "from_earlier_run": row.get("from_earlier_run", previous["date"])})
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{len(fresh)} rows from the log, {len(rows) - len(fresh)} carried over")
    return 0


if __name__ == "__main__":
    sys.exit(main())
