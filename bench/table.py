"""bench/results.json as the docs' Benchmarks page (docs/benchmarks.md), and its charts.

``python bench/table.py``: print the Markdown (the table, the per-app costs, the simulation).
``python bench/table.py --write``: also draw ``docs/bench/scaling.png`` and ``docs/bench/memory.png``
(matplotlib: ``pip install -r bench/requirements.txt``) and replace the page's block
between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` with the Markdown.
Everything here is read from results.json: nothing is typed in by hand.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
#: The page the block is written into, and where its charts go (the page links them as bench/*.png).
PAGE = ROOT / "docs" / "benchmarks.md"
CHARTS = ROOT / "docs" / "bench"


def fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {fmt(v)}" for k, v in value.items())
    return str(value)


def table(data: dict[str, Any]) -> list[str]:
    out = ["| scenario | cynchrod | peer | ratio |", "| --- | --- | --- | --- |"]
    for row in data["rows"]:
        name = row["scenario"] + (f" (earlier run, {row['from_earlier_run']})" if "from_earlier_run" in row else "") \
            + (f" (re-run {row['from_partial_run']})" if "from_partial_run" in row else "")
        ours = {k: v for k, v in row.items() if k.startswith(("cynchrod", "idle", "during", "noop_decide",
                                                                 "org_body", "admin_body", "process_",
                                                                 "breakdown"))}
        ratios = {k: v for k, v in row.items() if k.startswith(("ratio", "overhead"))}
        peers = {k: v for k, v in row.items() if k not in ours and k not in ratios and k != "scenario"
                 and k not in ("runs", "passes", "from_earlier_run", "from_partial_run")}
        out.append(f"| {name} | {', '.join(f'{k}={fmt(v)}' for k, v in ours.items())} | "
                   f"{', '.join(f'{k}={fmt(v)}' for k, v in peers.items())} | "
                   f"{', '.join(f'{k}={fmt(v)}' for k, v in ratios.items())} |")
    return out


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y against x."""
    n = len(points)
    if n < 2:
        return float("nan")
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else float("nan")


def curves(data: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """The scaling curves' points, (apps, value), from the cold-converge and memory rows."""
    found: dict[str, list[tuple[float, float]]] = {}
    for row in data["rows"]:
        cold = re.fullmatch(r"cold converge N=(\d+)", row["scenario"])
        if cold and int(cold.group(1)) >= 100:  # the curves: 100, 300 and 1,000 apps
            n = float(cold.group(1))
            for key in ("cynchrod_s", "docker_compose_s", "bare_sdk_s", "cynchrod_noop_s", "docker_compose_noop_s",
                        "bare_sdk_noop_s"):
                if key in row:
                    found.setdefault(key, []).append((n, float(row[key])))
        noop = re.fullmatch(r"no-op pass N=(\d+)", row["scenario"])
        if noop:  # the no-op section: stopped apps with created containers, 20 passes
            found.setdefault("noop_section_s", []).append((float(noop.group(1)), float(row["cynchrod_s"])))
            found.setdefault("noop_section_list_s", []).append((float(noop.group(1)), float(row["bare_list_call_s"])))
        mem = re.fullmatch(r"daemon memory, (\d+) apps and containers", row["scenario"])
        if mem:
            found.setdefault("pss_mib", []).append((float(mem.group(1)), float(row["cynchrod_pss_mib"])))
    return {k: sorted(v) for k, v in found.items()}


LABELS = {"cynchrod_s": "cynchrod", "docker_compose_s": "docker-compose", "bare_sdk_s": "bare SDK loop",
          "cynchrod_noop_s": "cynchrod (view fed by events)", "docker_compose_noop_s": "docker-compose up -d",
          "bare_sdk_noop_s": "bare SDK (one list call)", "pss_mib": "cynchrod daemon PSS (all processes)",
          "noop_section_s": "cynchrod, no-op section (created containers)",
          "noop_section_list_s": "one list call, no-op section"}


def per_app(data: dict[str, Any]) -> list[str]:
    c = curves(data)
    if not c:
        return []
    out = ["Per-app cost (least-squares slope over the points of the scaling curves, "
           "from the same run):", "", "| curve | points (apps) | per app |", "| --- | --- | --- |"]
    for key, points in c.items():
        if len(points) < 2:
            continue
        unit = "KiB" if key == "pss_mib" else "ms"
        scale = 1024 if key == "pss_mib" else 1000
        what = ("memory: " if key == "pss_mib" else "no-op: " if "noop" in key else "cold converge: ") + LABELS[key]
        out.append(f"| {what} | {', '.join(str(int(x)) for x, _ in points)} | "
                   f"{slope(points) * scale:.3g} {unit} |")
    return out


def draw(data: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = curves(data)
    CHARTS.mkdir(parents=True, exist_ok=True)
    fig, (cold, noop) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, style in (("cynchrod_s", "o-"), ("docker_compose_s", "s--"), ("bare_sdk_s", "^:")):
        if key in c:
            xs, ys = zip(*c[key], strict=True)
            cold.plot(xs, ys, style, label=f"{LABELS[key]} ({slope(c[key]) * 1000:.0f} ms/app)")
    cold.set(title="cold converge (all running)", xlabel="apps", ylabel="seconds")
    cold.legend()
    for key, style in (("cynchrod_noop_s", "o-"), ("docker_compose_noop_s", "s--"), ("bare_sdk_noop_s", "^:"),
                       ("noop_section_s", "x-"), ("noop_section_list_s", "+:")):
        if key in c:
            xs, ys = zip(*c[key], strict=True)
            noop.plot(xs, ys, style, label=f"{LABELS[key]} ({slope(c[key]) * 1000:.3g} ms/app)")
    noop.set(title="no-op (nothing to change)", xlabel="apps", ylabel="seconds (log)", yscale="log")
    noop.legend(fontsize=8)
    fig.suptitle(f"cynchrod bench {data['date']}, {data['host']['cores']} cores, same run")
    fig.tight_layout()
    fig.savefig(CHARTS / "scaling.png", dpi=90)
    plt.close(fig)
    if "pss_mib" in c:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        xs, ys = zip(*c["pss_mib"], strict=True)
        ax.plot(xs, ys, "o-", label=f"{LABELS['pss_mib']} ({slope(c['pss_mib']) * 1024:.0f} KiB/app)")
        ax.set(title="daemon memory against apps", xlabel="apps (and containers)", ylabel="PSS, MiB", ylim=(0, None))
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(CHARTS / "memory.png", dpi=90)
        plt.close(fig)


def _row(data: dict[str, Any], prefix: str) -> dict[str, Any] | None:
    return next((r for r in data["rows"] if r["scenario"].startswith(prefix) and "from_earlier_run" not in r), None)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def summary(data: dict[str, Any]) -> list[str]:
    """Issue 15's items 3-6 and issue 9's rows, in words, with the figures of this run."""
    out = ["Issue 15's targets (items 3-6) and issue 9's rows, from this run:", ""]
    push, steps = _row(data, "push to running, git push"), _row(data, "push to running, steps")
    if push:
        out.append(f"* Push to running (`git push` into a local bare repository that `cynchrod serve` watches, no "
                   f"webhook, until the new container answers HTTP): p50 {ms(push['cynchrod_p50_s'])}, against "
                   f"{ms(push['bare_create_start_p50_s'])} for a bare create+start of the same container "
                   f"(+{ms(push['overhead_p50_s'])}; target +150 ms) and "
                   f"{ms(push['bare_stop_remove_create_start_p50_s'])}"
                   f" for a bare stop+remove+create+start (+{ms(push['overhead_vs_bare_replace_p50_s'])}): the app "
                   "has a host port, so the old container must stop before the new one can bind it.")
    if steps:
        out.append("  Where the time goes, ms after `git push` starts (median of 5 pushes, daemon at debug level): "
                   + ", ".join(f"{k} {v:g}" for k, v in steps["breakdown_ms"].items()) + ".")
    change = _row(data, "change one app of")
    if change:
        out.append(f"* {change['scenario'].capitalize()}: {ms(change['cynchrod_s'])} against "
                   f"{ms(change['bare_recreate_s'])} for a bare stop+remove+create+start: "
                   f"{change['ratio_vs_bare']:.2f}x (target 1.15x).")
    noop = _row(data, "no-op pass N=1000")
    if noop:
        out.append(f"* No-op pass at 1,000 apps through the engine (issue 9): {ms(noop['cynchrod_s'])} wall, "
                   f"{ms(noop['cynchrod_cpu_s'])} CPU, {noop['docker_calls_per_pass']:g} engine calls per pass "
                   f"(one list call alone takes {ms(noop['bare_list_call_s'])}).")
    heal = _row(data, "self-heal after docker kill")
    if heal:
        out.append(f"* Self-heal (`docker kill` → answering again): p50 {ms(heal['cynchrod_p50_s'])}, "
                   f"p95 {ms(heal['cynchrod_p95_s'])}.")
    mem = [r for r in data["rows"] if r["scenario"].startswith("daemon memory,") and "apps" in r
           and "from_earlier_run" not in r]
    if mem:
        out.append("* Daemon memory (PSS of the reconciler, the API master and its workers): "
                   + ", ".join(f"{r['cynchrod_pss_mib']:g} MiB at {r['apps']} apps" for r in mem) + ".")
    for r in data["rows"]:
        if r["scenario"].startswith("daemon memory,") and "processes" in r and isinstance(r["processes"], list):
            out.append(f"* {r['scenario'].capitalize()}, PSS per process: "
                       + ", ".join(f"{p['role']} {p['pss_mib']:g} MiB" for p in r["processes"])
                       + f" ({r['cynchrod_pss_mib']:g} MiB in all).")
    core, bodies = _row(data, "simulation: no-op decision"), _row(data, "simulation: GET /apps body")
    if core:
        out.append(f"* Simulation, the pure core at {core['apps']:,} apps ({core['orgs']} orgs, in-memory runtime, "
                   f"rows in a real store): a no-op decision takes {core['noop_decide_cpu_p50_ms']:g} ms of CPU "
                   f"({core['noop_decide_p50_ms']:g} ms wall on this shared host; target 100 ms); the whole process "
                   f"(interpreter, specs, units, rows) holds {core['process_pss_mib']:g} MiB PSS (target 200 MiB).")
    if bodies:
        out.append(f"* Simulation, the store at {bodies['apps']:,} apps with {bodies['deployments'] // bodies['apps']} "
                   f"deployments each ({bodies['deployments']:,} rows), {bodies['orgs']} orgs of "
                   f"{bodies['apps_per_org']} apps: `GET /apps` for one org built from a cold cache in "
                   f"{bodies['org_body_p50_ms']:g} ms p50, {bodies['org_body_max_ms']:g} ms at worst "
                   f"({bodies['org_body_kib']:g} KiB; target 5 ms); for an admin, all {bodies['apps']:,} apps: "
                   f"{bodies['admin_body_ms']:g} ms ({bodies['admin_body_kib']:g} KiB).")
    return out if len(out) > 2 else []


def markdown(data: dict[str, Any]) -> str:
    host = data["host"]
    lines = [BEGIN, "<!-- generated by bench/table.py --write from bench/results.json; do not edit -->", "",
             f"Measured {data['date']} on {host['cores']} cores (kernel {host['kernel']}, Docker {host['docker']}, "
             f"Python {host['python']}{', host ' + host['name'] if host.get('name') else ''}); "
             f"cynchrod applies {data['concurrency']} apps at once.", "", *table(data), ""]
    slopes = per_app(data)
    if slopes:
        lines += ["![cold converge and no-op against apps](bench/scaling.png)",
                  "![daemon memory against apps](bench/memory.png)", "", *slopes, ""]
    said = summary(data)
    if said:
        lines += [*said, ""]
    lines.append(END)
    return "\n".join(lines)


def main() -> int:
    source = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--results=")),
                  str(ROOT / "bench" / "results.json"))
    data = json.loads(pathlib.Path(source).read_text())
    text = markdown(data)
    if "--write" in sys.argv:
        draw(data)
        old = PAGE.read_text()
        if BEGIN not in old:
            raise SystemExit(f"{PAGE.relative_to(ROOT)} has no {BEGIN} … {END} block")
        head, rest = old.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        PAGE.write_text(head + text + tail)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
