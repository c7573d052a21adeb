"""Where a run's files live: the one source of truth for every output path (local or s3://).

ROOT/model=<slug>/run_date=YYYY-MM-DD/run_id=<id>/part-<hash>.parquet
                                                  _manifest.json
                                                  _SUCCESS          (written last)
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from dataclasses import dataclass

import fsspec
from fsspec.core import url_to_fs

PART_GLOB = "part-*.parquet"
MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"


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
        base = filesystem(self.root)[1].rstrip("/")
        return f"{base}/model={self.model}/run_date={self.run_date}/run_id={self.run_id}"

    @property
    def url(self) -> str:
        """The run directory as the user would write it (with its s3:// prefix)."""
        protocol = self.fs.protocol
        protocol = protocol[0] if isinstance(protocol, (tuple, list)) else protocol
        return self.dir if protocol in ("file", "local") else f"{protocol}://{self.dir}"

    def part(self, name: str) -> str:
        return f"{self.dir}/{name}"

    @property
    def manifest(self) -> str:
        return f"{self.dir}/{MANIFEST}"

    @property
    def success(self) -> str:
        return f"{self.dir}/{SUCCESS}"

    def parts(self) -> list[str]:
        return sorted(self.fs.glob(f"{self.dir}/{PART_GLOB}"))

    @classmethod
    def locate(cls, root: str, model_id: str, run_id: str, today: dt.date | None = None) -> RunPaths:
        """The run's directory: the existing one for ``run_id`` (resume), else a new one dated today (UTC)."""
        fs, base = filesystem(root)
        slug = model_slug(model_id)
        existing = sorted(fs.glob(f"{base.rstrip('/')}/model={slug}/run_date=*/run_id={valid_run_id(run_id)}"))
        if existing:
            date = re.search(r"run_date=([^/]+)", existing[-1]).group(1)
            return cls(root, slug, date, run_id)
        today = today or dt.datetime.now(dt.timezone.utc).date()
        return cls(root, slug, today.isoformat(), run_id)
