"""How long the CLI takes to start, and whether the light entry points stay free of torch.

Measures wall seconds (median and max of --repeats runs, each a fresh interpreter) of `atman --help`,
`atman explain --help`, `atman query --help` and `python -c "import pipeline"`, and lists the heavy modules each one
imported (from `python -X importtime`). The figure belongs in bench/RESULTS.md with the machine it ran on; a timed
test would only measure how loaded the machine was.

    python bench/bench_cli.py --repeats 10 --out bench/cli.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEAVY = ("torch", "transformers", "ray", "duckdb", "pyarrow", "datasets", "captum")
ATMAN = str(Path(sys.executable).parent / "atman")
COMMANDS = {
    "atman --help": [ATMAN, "--help"],
    "atman explain --help": [ATMAN, "explain", "--help"],
    "atman query --help": [ATMAN, "query", "--help"],
    "import pipeline": [sys.executable, "-c", "import pipeline"],
}


def heavy_imports(cmd: list[str]) -> list[str]:
    """The heavy top-level packages a command imports (python -X importtime lists every import on stderr)."""
    script = cmd[2] if cmd[0] == sys.executable else "from pipeline.cli import main; main()"
    args = [] if cmd[0] == sys.executable else cmd[1:]
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import sys; sys.argv = ['atman', *{args!r}]\n{script}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    seen = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in out.stderr.splitlines() if "|" in line}
    return sorted(seen & set(HEAVY))


def measure(cmd: list[str], repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "max_s": max(times), "runs": repeats, "heavy": heavy_imports(cmd)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", help="Write the figures as JSON here.")
    args = parser.parse_args()
    results = {name: measure(cmd, args.repeats) for name, cmd in COMMANDS.items()}
    record = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "results": results,
    }
    for name, r in results.items():
        heavy = ", ".join(r["heavy"]) or "none"
        print(f"{name:24s} median {r['median_s']:.2f} s  max {r['max_s']:.2f} s  heavy imports: {heavy}")
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
