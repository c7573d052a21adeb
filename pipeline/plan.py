"""A run's plan (``_plan.json``): the input's listing, the staged blocks, and the shards cut from them.

The plan is made once, when a run first stages its input (``make_plan``, driver), and saved; every later attempt of
the run loads it, so a rerun finds the same shards and refuses an input that changed since (``input_changes``). A
shard is the unit of work, of publishing (one part) and of resume. ``plan_problem`` checks a loaded plan holds
together before anything trusts it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from pipeline.reader import InputListing

PLAN_VERSION = 3
"""3 adds ``split_bytes``; a version 2 plan (every file scanned whole) still loads."""


@dataclass(frozen=True)
class Block:
    name: str
    rows: int
    lo: int
    """Smallest ordinal (input position) in the block."""
    hi: int


@dataclass
class Plan:
    input: list[dict]
    """The input's listing (path, kind, size, version, split per file) when the run started."""
    blocks: list[Block]
    shards: list[list[tuple[int, int, int]]]
    """Per shard, its segments: (block index, first row, end row) — a shard may cut a block."""
    shard_rows: int
    ignored: list[str] = field(default_factory=list)
    split_bytes: int = 0
    """The piece size the input was scanned with (0: every file whole), kept so a rerun stages it the same way."""

    @property
    def rows(self) -> int:
        return sum(b.rows for b in self.blocks)

    def segments(self, shard: int) -> list[dict]:
        """The shard's rows as ``{"block": Block fields, "start", "stop"}`` (what a worker reads)."""
        return [
            {"block": self.blocks[i].__dict__, "start": start, "stop": stop} for i, start, stop in self.shards[shard]
        ]

    def shard_rows_of(self, shard: int) -> int:
        return sum(stop - start for _, start, stop in self.shards[shard])

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "version": PLAN_VERSION,
                "input": self.input,
                "ignored": self.ignored,
                "shard_rows": self.shard_rows,
                "blocks": [[b.name, b.rows, b.lo, b.hi] for b in self.blocks],
                "shards": [[list(seg) for seg in s] for s in self.shards],
                "split_bytes": self.split_bytes,
            }
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Plan:
        d = json.loads(data)
        if d.get("version") not in (2, PLAN_VERSION):
            raise ValueError(f"_plan.json: version {d.get('version')} is not 2 or {PLAN_VERSION}")
        return cls(
            input=d["input"],
            blocks=[Block(*b) for b in d["blocks"]],
            shards=[[tuple(seg) for seg in s] for s in d["shards"]],
            shard_rows=d["shard_rows"],
            ignored=d.get("ignored", []),
            split_bytes=d.get("split_bytes", 0),
        )


def make_plan(
    listing: InputListing, blocks: list[Block], shard_rows: int, actors: int, batch_rows: int, split_bytes: int = 0
) -> Plan:
    """Cut the rows (in input order) into shards of ``shard_rows`` rows, fewer when the input is small: about four
    shards per actor, but not fewer rows than a batch. A shard may start or end inside a block. ``split_bytes``:
    the piece size the blocks were scanned with, recorded."""
    total = sum(b.rows for b in blocks)
    target = max(1, min(shard_rows, max(batch_rows, math.ceil(total / (4 * actors)))))
    shards: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    room = target
    for i, b in enumerate(blocks):
        start = 0
        while start < b.rows:
            take = min(room, b.rows - start)
            current.append((i, start, start + take))
            start += take
            room -= take
            if room == 0:
                shards.append(current)
                current, room = [], target
    if current:
        shards.append(current)
    return Plan(listing.fingerprint(), list(blocks), shards, shard_rows, list(listing.ignored), split_bytes)


def input_changes(plan: Plan, listing: InputListing) -> list[str]:
    """How the input differs from the plan's listing (empty when it is the same)."""
    before = {(f["path"], f.get("split")): f for f in plan.input}
    now = {(f["path"], f.get("split")): f for f in listing.fingerprint()}
    changes = []
    for key in sorted(set(before) | set(now), key=str):
        name = key[0] if key[1] is None else f"{key[0]}[{key[1]}]"
        if key not in now:
            changes.append(f"{name} is gone")
        elif key not in before:
            changes.append(f"{name} is new")
        elif before[key]["size"] != now[key]["size"]:
            changes.append(f"{name} changed (size {before[key]['size']} -> {now[key]['size']})")
        elif before[key]["version"] != now[key]["version"]:  # e.g. restored from a copy: the bytes may differ
            changes.append(
                f"{name} was modified (mtime/version changed: {before[key]['version']} -> {now[key]['version']}, "
                f"size the same: {now[key]['size']})"
            )
    return changes


def plan_problem(plan: Plan) -> str | None:
    """What in a plan read back does not hold together (a shard naming rows its block does not have), or None."""
    for s, segments in enumerate(plan.shards):
        for segment in segments:
            if len(segment) != 3 or not all(isinstance(x, int) for x in segment):
                return f"shard {s} has a segment {list(segment)!r}, not [block, start, stop]"
            i, start, stop = segment
            if not (0 <= i < len(plan.blocks) and 0 <= start < stop <= plan.blocks[i].rows):
                return f"shard {s} names rows {start}..{stop} of block {i}, which the plan's blocks do not have"
    return None
