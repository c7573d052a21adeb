"""Whether a run's files can be trusted when they are read: a complete run's manifest checked for what it must
list, a part's verified sha256 remembered per file until the file changes (so a second query does not read it
again), and the links under a local root that lead outside it. The readers (``pipeline.parts.readable_parts``, the
query layer) decide what to leave out; this module only says what is wrong.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
import secrets
import stat
import tempfile
from pathlib import Path

from pipeline.layout import PART_GLOB, SUCCESS

log = logging.getLogger(__name__)
_SHA256 = re.compile(r"[0-9a-f]{64}")


class BadManifest(ValueError):
    """A run's ``_manifest.json`` that cannot be trusted to list its parts; the message names the file and field."""


def manifest_parts(manifest: dict, where: str, redo: str) -> list[dict]:
    """The part entries of a complete run's manifest ``where``, checked: each names a part file of the run (no other
    path) with its size, sha256, rows and shard in 0..shards-1, no name or shard twice. BadManifest otherwise."""
    if not manifest:
        raise BadManifest(f"{where} is missing (a run with {SUCCESS} has one); {redo}")
    files, shards = manifest.get("files"), manifest.get("shards")
    if not isinstance(files, list) or not _count(shards) or not _count(manifest.get("rows")):
        raise BadManifest(f"{where}: needs files (a list), shards and rows (counts); {redo}")
    names, seen = set(), set()
    for i, f in enumerate(files):
        bad = _bad_entry(f, shards)
        if bad is None and (f["name"] in names or f["shard"] in seen):
            bad = f"names part {f['name']} or shard {f['shard']} a second time"
        if bad:
            raise BadManifest(f"{where}: files[{i}] {bad}; {redo}")
        names.add(f["name"])
        seen.add(f["shard"])
    return files


def _bad_entry(f, shards: int) -> str | None:
    """What is wrong with one entry of a manifest's files, or None."""
    if not isinstance(f, dict):
        return "is not an object"
    name = f.get("name")
    if not isinstance(name, str) or "/" in name or "\\" in name or not fnmatch.fnmatch(name, PART_GLOB):
        return f"name {name!r} is not a part's file name ({PART_GLOB})"
    for key in ("bytes", "rows"):
        if not _count(f.get(key)):
            return f"{key} {f.get(key)!r} is not a count"
    if not _count(f.get("shard")) or f["shard"] >= shards:
        return f"shard {f.get('shard')!r} is not one of 0..{shards - 1}"
    if not isinstance(f.get("sha256"), str) or not _SHA256.fullmatch(f["sha256"]):
        return f"sha256 {f.get('sha256')!r} is not a SHA-256 digest (64 hex digits)"
    return None


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def identity(info: dict, sha256: str) -> str | None:
    """What changes whenever a file's bytes do (size, mtime and ctime, inode; an object's ETag and time), with the
    digest it was checked against; None for a store that says none of it (its parts are always hashed)."""
    marks = [info.get(k) for k in ("mtime", "created", "ino", "ETag", "LastModified", "generation", "updated")]
    if all(m is None for m in marks):
        return None
    return json.dumps([info.get("size"), *marks, sha256], default=str)


def cache_dir() -> Path | None:
    """Where verified parts are remembered, one small JSON per run: ``$ATMAN_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/atman``, else this user's ``atman-<uid>`` in the temp directory (not under $HOME, which
    queries leave untouched), each with ``verified/`` below. None where the default one is not this user's alone;
    every part is then hashed on every query."""
    for env, below in (("ATMAN_CACHE_DIR", ""), ("XDG_CACHE_HOME", "atman")):
        if os.environ.get(env):
            return Path(os.environ[env], below, "verified")
    mine = Path(tempfile.gettempdir(), f"atman-{os.getuid()}")
    try:
        mine.mkdir(mode=0o700, exist_ok=True)
        st = mine.lstat()
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None  # made by someone else: it could vouch for a damaged part
    return mine / "verified"


def _checks_file(run_url: str) -> Path | None:
    where = cache_dir()
    return where / f"{hashlib.sha256(run_url.encode()).hexdigest()[:32]}.json" if where else None


def load_checks(run_url: str) -> dict[str, str]:
    """Part name -> identity when last verified, of this run; {} when unknown or unreadable."""
    path = _checks_file(run_url)
    try:
        data = json.loads(path.read_text()) if path else {}
    except (OSError, ValueError):
        return {}
    parts = data.get("parts") if isinstance(data, dict) and data.get("run") == run_url else None
    return {k: v for k, v in parts.items() if isinstance(v, str)} if isinstance(parts, dict) else {}


def save_checks(run_url: str, checks: dict[str, str]) -> None:
    """Remember ``checks`` (written whole, by rename); a cache that cannot be written only costs a rehash."""
    path = _checks_file(run_url)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(3)}")
        tmp.write_text(json.dumps({"run": run_url, "parts": checks}))
        os.replace(tmp, path)
    except OSError as err:
        log.debug("cannot write the verified-parts cache %s: %s", path, err)


def links_leaving(base: str) -> list[tuple[str, str]]:
    """(link, where it leads) for each symbolic link under the local directory ``base`` that leads outside it: one
    walk of the root that follows no link. DuckDB refuses to open a file through such a link, but its glob() lists
    through one (``glob('ROOT/ev*/*')`` would list /etc for ROOT/evil -> /etc)."""
    real, found, todo = os.path.realpath(base), [], [base]
    while todo:
        try:
            with os.scandir(todo.pop()) as entries:
                for e in entries:
                    if e.is_symlink():
                        target = os.path.realpath(e.path)
                        if os.path.commonpath([real, target]) != real:
                            found.append((e.path, target))
                    elif e.is_dir():
                        todo.append(e.path)
        except OSError:  # unreadable: DuckDB cannot list it either
            continue
    return sorted(found)
