"""The order `make test` hands whole test files to its pytest-xdist workers: the longest first.

`make test` gives each worker whole files (``--dist loadfile``, so a module's fixture, e.g. a job run, is made
once). pytest-xdist's own order puts the files with the most tests first; ours with the most seconds are few tests
each (a node lost under a cluster, a job submitted to a Ray head), so they came last and the suite ended with one
worker running them alone while the other idled. Longest first (``--no-loadscope-reorder`` keeps our order) is the
classic longest-processing-time rule. The seconds per file are measured (``tests/durations.json``), not guessed:

    make durations          # the suite once, its junit XML -> tests/durations.json

A file not in the table (a new one) counts as the median file. The table only orders the run: a stale one makes
the suite slower, never different.
"""

from __future__ import annotations

import json
import statistics
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

TABLE = Path(__file__).with_name("durations.json")


def file_seconds(junit_xml: Path) -> dict[str, float]:
    """Seconds per test file (``test_x.py``) from a junit XML report, longest first."""
    seconds: Counter[str] = Counter()
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        module = case.get("classname", "").split(".")  # tests.test_x or tests.test_x.TestClass
        if len(module) >= 2 and module[0] == "tests":
            seconds[f"{module[1]}.py"] += float(case.get("time") or 0)
    return {name: round(s, 1) for name, s in seconds.most_common()}


def longest_first(items: list, table: Path = TABLE) -> None:
    """Reorder pytest ``items`` in place: files by their measured seconds, longest first; tests within a file keep
    their order, and so do files of equal weight."""
    weights = json.loads(table.read_text()) if table.exists() else {}
    default = statistics.median(weights.values()) if weights else 0.0
    first_seen: dict[str, int] = {}
    for i, item in enumerate(items):
        first_seen.setdefault(item.path.name, i)
    items.sort(key=lambda item: (-weights.get(item.path.name, default), first_seen[item.path.name]))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} JUNIT.xml  (writes {TABLE.name})")
    TABLE.write_text(json.dumps(file_seconds(Path(sys.argv[1])), indent=1) + "\n")
    print(f"wrote {TABLE}")
