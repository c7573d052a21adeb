"""Where a run's files live: the one source of truth for every output path (local or s3://).

ROOT/model=<slug>/run_date=YYYY-MM-DD/run_id=<id>/part-s<shard>.parquet   one per shard
                                                  _manifest.json    files, sizes, checksums, counts
                                                  _SUCCESS          (written last)
                                                  _plan.json        the input's listing and its shards
                                                  _progress.json    finished shards (consolidated)
                                                  _progress/        one marker per shard finished since
                                                  _lease.json       the driver writing the run, until when
                                                  _staging/         the input as validated blocks (until done):
                                                    f<file>[-p<piece>]-b<block>.parquet, _fixups.parquet (ids)
ROOT/_audits/<base model>.<base run>__<new model>.<new run>/   a diff of two runs (audit.parquet, .html, summary)
ROOT/_scratch/<run_id>/                                        Ray's session files of a local run (short roots)

The partition names (``model=``, ``run_date=``, ``run_id=``), the URL of a path and the publishing of a file are
spelled here only; the query layer, the audit and the job ask this module for them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import re
import secrets
from dataclasses import dataclass

import fsspec
from fsspec.core import url_to_fs

PART_GLOB = "part-*.parquet"
MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
PLAN = "_plan.json"
PROGRESS = "_progress.json"
MARKERS = "_progress"
LEASE = "_lease.json"
STAGING = "_staging"
FIXUPS = "_fixups.parquet"  # in STAGING: the ids settled over every block
AUDITS = "_audits"
SCRATCH = "_scratch"
PARTITIONS = ("model", "run_date", "run_id")  # the run directory's levels, outermost first
_RUN_DIR = re.compile(r"model=([^/]+)/run_date=([^/]+)/run_id=([^/]+)$")


def shard_name(shard: int) -> str:
    return f"s{shard:06d}"


def part_name(shard: int) -> str:
    """A part is named by its shard: a retried shard replaces its own part, never adds one, and no id can forge a
    name (ids once hashed into part names collided, issue 13)."""
    return f"part-{shard_name(shard)}.parquet"


def block_name(file: int, block: int, piece: int | None = None) -> str:
    """A staging block of input file ``file`` (of its piece ``piece`` where the file is scanned in pieces): names
    sort in input order."""
    prefix = f"f{file:06d}-" if piece is None else f"f{file:06d}-p{piece:06d}-"
    return f"{prefix}b{block:06d}.parquet"


def model_slug(model_id: str) -> str:
    """A path-safe, readable name for a model id ('HuggingFaceTB/SmolLM2' -> 'HuggingFaceTB--SmolLM2')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "--", model_id).strip("-.") or "model"


def new_run_id(now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def valid_run_id(run_id: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", run_id):
        raise ValueError(f"run_id: {run_id!r} must be letters, digits, '.', '_' or '-' (at most 128)")
    return run_id


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem and path for a local path or URL. S3 credentials come from the environment or the usual
    AWS config (and ``AWS_ENDPOINT_URL`` for S3-compatible servers); they are never stored in the run."""
    return url_to_fs(url)


def read_ref(ref: str, limit: int | None = None, what: str = "image") -> bytes:
    """The bytes of a local path or URL, at most ``limit`` of them (checked before reading where the storage says
    the size); a missing, oversized or unreadable file is a ValueError that starts with ``what`` and names ``ref``."""
    try:
        fs, path = filesystem(ref)
        size = fs.size(path) if limit is not None else None
        if size is not None and size > limit:
            raise ValueError(f"{what}: {ref} is {size:,} bytes, over {limit:,}")
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ValueError(f"{what}: {ref} does not exist") from None
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - storage errors of any backend name the path
        raise ValueError(f"{what}: cannot read {ref} ({type(err).__name__}: {err})") from None


def protocol(fs) -> str:
    """The filesystem's main protocol ('file', 's3', ...): fsspec gives a name or a tuple of aliases."""
    return fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol


def is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def url(fs, path: str) -> str:
    """A path of ``fs`` as the user writes it: a local path as it is, any other with its protocol (``s3://...``);
    what DuckDB and the summaries need, since fsspec paths drop the protocol."""
    return path if is_local(fs) else f"{protocol(fs)}://{path}"


def is_remote(url: str) -> bool:
    """Whether ``url`` names remote storage (s3://..., gs://...): anything with a protocol but ``file://``."""
    return "://" in url and not url.startswith("file://")


def is_relative_local(path: str) -> bool:
    """A local path (or ``file://`` URL) relative to the working directory: what a cluster's pods cannot see."""
    return not is_remote(path) and not os.path.isabs(path.removeprefix("file://"))


def local_root(root: str) -> str | None:
    """The absolute local path of a root given as a path or ``file://`` URL; None for a remote root (s3://...)."""
    if is_remote(root):
        return None
    return os.path.abspath(root.removeprefix("file://"))


def run_glob(base: str, model: str = "*", run_date: str = "*", run_id: str = "*") -> str:
    """The run directories under the filesystem path ``base`` (each level a name or a glob)."""
    return f"{base.rstrip('/')}/model={model}/run_date={run_date}/run_id={run_id}"


def parse_run_dir(path: str) -> tuple[str, str, str] | None:
    """``(model, run_date, run_id)`` of a run directory's path, or None for a path that is not one."""
    m = _RUN_DIR.search(path)
    return (m.group(1), m.group(2), m.group(3)) if m else None


def partition_pattern(name: str) -> str:
    """A regular expression whose group 1 is the value of partition ``name`` in a part's path (for SQL's
    ``regexp_extract(filename, ...)``)."""
    if name not in PARTITIONS:
        raise ValueError(f"partition: {name!r} is not one of {', '.join(PARTITIONS)}")
    return f"{name}=([^/]+)"


def audit_dir(base: str, old_model: str, old_run_id: str, new_model: str, new_run_id: str) -> str:
    """Where the diff of two runs is written under the filesystem path ``base`` of a root."""
    return f"{base.rstrip('/')}/{AUDITS}/{old_model}.{old_run_id}__{new_model}.{new_run_id}"


def scratch_dir(local: str, run_id: str) -> str:
    """A local run's Ray session directory under the local root ``local``."""
    return os.path.join(local, SCRATCH, run_id)


def fresh_ls(fs, path: str, detail: bool = False) -> list:
    """``fs.ls`` without fsspec's listing cache: other processes (the actors) write here, so a cached listing of
    this process would be stale."""
    fs.invalidate_cache(path)
    return fs.ls(path, detail=detail)


def storage_error(err: BaseException) -> bool:
    """Whether ``err`` says a store cannot be reached or read (network, permissions, credentials)."""
    if isinstance(err, OSError):
        return True
    try:
        import botocore.exceptions as boto
    except ImportError:
        return False
    return isinstance(err, (boto.BotoCoreError, boto.ClientError))


@dataclass(frozen=True)
class RunPaths:
    root: str
    model: str
    run_date: str
    run_id: str

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return filesystem(self.root)[0]

    @property
    def dir(self) -> str:
        return run_glob(filesystem(self.root)[1], self.model, self.run_date, self.run_id)

    @property
    def url(self) -> str:
        """The run directory as the user would write it (with its s3:// prefix)."""
        return url(self.fs, self.dir)

    def part(self, name: str) -> str:
        return f"{self.dir}/{name}"

    @property
    def manifest(self) -> str:
        return f"{self.dir}/{MANIFEST}"

    @property
    def success(self) -> str:
        return f"{self.dir}/{SUCCESS}"

    @property
    def plan(self) -> str:
        return f"{self.dir}/{PLAN}"

    @property
    def progress(self) -> str:
        return f"{self.dir}/{PROGRESS}"

    @property
    def markers(self) -> str:
        return f"{self.dir}/{MARKERS}"

    def marker(self, shard: int) -> str:
        return f"{self.markers}/{shard_name(shard)}.json"

    @property
    def lease(self) -> str:
        return f"{self.dir}/{LEASE}"

    @property
    def staging(self) -> str:
        return f"{self.dir}/{STAGING}"

    def parts(self) -> list[str]:
        fs = self.fs
        fs.invalidate_cache(self.dir)
        return sorted(fs.glob(f"{self.dir}/{PART_GLOB}"))

    @classmethod
    def locate(cls, root: str, model_id: str, run_id: str, today: dt.date | None = None) -> RunPaths:
        """The run's directory: the existing one for ``run_id`` (resume), else a new one dated today (UTC)."""
        fs, base = filesystem(root)
        slug = model_slug(model_id)
        existing = sorted(fs.glob(run_glob(base, slug, run_id=valid_run_id(run_id))))
        if existing:
            _, date, _ = parse_run_dir(existing[-1])
            return cls(root, slug, date, run_id)
        today = today or dt.datetime.now(dt.timezone.utc).date()
        return cls(root, slug, today.isoformat(), run_id)


# --- writing ------------------------------------------------------------------------------------------------------


TMP_PREFIX = ".tmp-"
"""What ``publish`` names a local file while it is written: ``.tmp-<pid>-<random>-<name>``, renamed when whole."""


def publish(fs, path: str, data: bytes) -> None:
    """Write a file whole: a local file appears by rename; an object store publishes a PUT atomically. A failed
    local write (a full disk) removes its temporary file and names ``path`` in its error (the OS names none)."""
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(3)}-{name}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(err, OSError) and err.errno is not None:
            raise OSError(err.errno, err.strerror or str(err), path) from None  # its subclass, with the path
        raise


def remove_temps(fs, folder: str) -> list[str]:
    """Remove the temporary files that writes interrupted in ``folder`` (a process killed, a full disk) left, except
    this process's own (one may be in flight: the lease's renewal); returns their paths. Local only: an object
    store publishes a file whole."""
    if not is_local(fs) or not os.path.isdir(folder):
        return []
    mine = f"{TMP_PREFIX}{os.getpid()}-"
    stale = [n for n in os.listdir(folder) if n.startswith(TMP_PREFIX) and not n.startswith(mine)]
    for name in stale:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, name))
    return [os.path.join(folder, n) for n in stale]


def parquet_bytes(table, compression: str) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression=None if compression == "none" else compression)
    return buf.getvalue()
