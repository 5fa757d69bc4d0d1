"""Print bench/results.json as the Markdown table kept in the README."""

from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def main() -> int:
    data = json.loads((ROOT / "bench" / "results.json").read_text())
    host = data["host"]
    print(f"Measured {data['date']} on {host['cores']} cores (kernel {host['kernel']}, Docker {host['docker']}, "
          f"Python {host['python']}); cynchrod applies {data['concurrency']} apps at once.\n")
    print("| scenario | cynchrod | peer | ratio |")
    print("| --- | --- | --- | --- |")
    for row in data["rows"]:
        name = row["scenario"]
        ours = {k: v for k, v in row.items() if k.startswith("cynchrod") or k.startswith("idle")
                or k.startswith("during")}
        peers = {k: v for k, v in row.items() if k not in ours and k != "scenario" and not k.startswith("ratio")
                 and k not in ("runs", "passes")}
        ratios = {k: v for k, v in row.items() if k.startswith("ratio") or k.startswith("overhead")}
        print(f"| {name} | {', '.join(f'{k}={fmt(v)}' for k, v in ours.items())} | "
              f"{', '.join(f'{k}={fmt(v)}' for k, v in peers.items() if k not in ratios)} | "
              f"{', '.join(f'{k}={fmt(v)}' for k, v in ratios.items())} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
