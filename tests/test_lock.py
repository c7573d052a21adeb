"""Installs are locked (issue 25): infra/lock/ pins every package `make install` puts into the venv, by version and
hash, within pyproject's ranges; the venv the suite runs in is exactly the lock (`make test-latest` says how far
upstream has moved instead)."""

from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK, NODEPS = ROOT / "infra/lock/requirements.txt", ROOT / "infra/lock/nodeps.txt"
_PIN = re.compile(r"^([A-Za-z0-9._-]+)==(\S+) \\$")


def pins(path: Path) -> dict[str, str]:
    """name -> version of a hashed requirements file; every pin must carry at least one sha256 hash."""
    lines = path.read_text().splitlines()
    out = {}
    for i, line in enumerate(lines):
        m = _PIN.match(line)
        if m:
            assert lines[i + 1].strip().startswith("--hash=sha256:"), f"{path.name}: {m.group(1)} has no hash"
            out[canonicalize_name(m.group(1))] = m.group(2)
    return out


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    return [r for r in reqs if r.marker is None or r.marker.evaluate()]


def test_the_lock_pins_every_declared_dependency_within_its_range():
    locked = pins(LOCK)
    for req in declared():
        name = canonicalize_name(req.name)
        if name == "torch":  # left out of the lock: TORCH_CONSTRAINTS (CPU build here, the CUDA build on a GPU)
            assert name not in locked
            continue
        assert name in locked, f"{req.name} is in pyproject.toml but not in the lock: run make lock"
        assert req.specifier.contains(locked[name], prereleases=True), (
            f"{req.name}: the lock's {locked[name]} is outside pyproject's {req.specifier}: run make lock"
        )
    assert len(locked) > 100, "the whole dependency tree, not only the direct dependencies"


def test_the_no_deps_packages_are_hashed_as_listed():
    listed = {
        canonicalize_name(Requirement(line).name): str(Requirement(line).specifier).removeprefix("==")
        for line in (ROOT / "infra/lock/nodeps.in").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert pins(NODEPS) == listed, "nodeps.txt differs from nodeps.in: run make lock"


def test_the_venv_is_the_lock():
    """The suite runs on exactly the locked versions (a package upgraded by hand, or a lock changed without
    `make install`, shows here)."""
    locked = {**pins(LOCK), **pins(NODEPS)}
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    moved = {n: (v, installed.get(n)) for n, v in locked.items() if installed.get(n) != v}
    if os.environ.get("ATMAN_UNLOCKED") == "1":  # make test-latest: report, the rest of the suite is the check
        pytest.skip(f"make test-latest: newer than the lock: {moved}")
    assert not moved, f"installed versions differ from the lock (name: (lock, installed)): {moved}"


def test_the_locked_set_is_complete_and_consistent():
    """`pip check` on the venv: every requirement of every installed package is met, but for the packages the lock
    installs without their dependencies on purpose (nodeps.in says why)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    on_purpose = set(pins(NODEPS))
    broken = [
        line
        for line in out.stdout.splitlines()
        if line.strip() and canonicalize_name(line.split()[0]) not in on_purpose
    ]
    assert not broken, "\n".join(broken)
