"""The wheels bench/gpu_suite.py needs on the lent GPU machine, in carries of at most 60 MiB (``make gpu-wheels``).

That machine has torch, transformers 5.17, accelerate, scipy, pyarrow and nvidia-ml-py (KINDS.md's list), but not
Ray, DuckDB, pydantic or platformdirs, nothing can be downloaded there, and one ``run`` call carries at most 64 MiB
(the working tree, ~3 MiB, included). So the locked versions (infra/lock/requirements.txt) of what is missing
there, or older there than ours, are downloaded here for CPython 3.12 on manylinux x86-64 and split by content:

- ``.gpu-wheels/a``: Ray and what it imports that the machine lacks (jsonschema and its parts). Ray's wheel is
  79 MB; its ``ray/jars`` (31 MB compressed: the Java workers' jars, which Python-only Ray never loads: Ray checks
  for the folder and runs without Java when it is absent) are left out of the wheel, its RECORD with them.
- ``.gpu-wheels/b``: pydantic (and its parts), platformdirs, DuckDB, our transformers with the huggingface-hub it
  checks for at import (and httpx2, its HTTP client), regex and typing-extensions at the versions they need, and
  ``tokenizer/``: the embedded SmolLM2 model's tokenizer files (the job section's models use it).

Carry b alone runs every section of the suite but the job; bench/gpu_suite.py's docstring has the two calls.

    .venv/bin/python bench/gpu_wheels.py --out .gpu-wheels
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "infra" / "lock" / "requirements.txt"
LIMIT = 60 << 20
CARRIES = {
    "a": ("ray", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py"),
    "b": (
        "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "platformdirs",
        "duckdb", "transformers", "huggingface-hub", "httpx2", "httpcore2", "truststore", "idna", "regex",
    ),
}  # fmt: skip
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")  # fmt: skip
LEFT_OUT = {"ray": "ray/jars/"}
"""Folders left out of a wheel: nothing imports them (see the module docstring)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def locked(lock: Path = LOCK) -> dict[str, str]:
    """name -> version of every package pinned in the lock (names normalised: lower case, '-')."""
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==([^\s\\;]+)", lock.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in pins}


def download(names: tuple[str, ...], versions: dict[str, str], dest: Path) -> None:
    """The wheels of ``names`` at their locked versions for CPython 3.12 on manylinux x86-64, without dependencies."""
    absent = [n for n in names if n not in versions]
    if absent:
        raise SystemExit(f"not in {LOCK}: {', '.join(absent)}")
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "-d", str(dest)]  # fmt: skip
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + [f"{n}=={versions[n]}" for n in names], check=True)


def leave_out(wheel: Path, prefix: str) -> int:
    """Rewrite ``wheel`` without the files under ``prefix`` (and their RECORD lines); returns how many went."""
    tmp = wheel.with_suffix(".tmp")
    gone = 0
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as out:
        for info in src.infolist():
            if info.filename.startswith(prefix):
                gone += 1
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not line.startswith(prefix)).encode()
            out.writestr(info, data)
    tmp.replace(wheel)
    return gone


def copy_tokenizer(dest: Path) -> None:
    """The embedded SmolLM2 model's tokenizer files (converted once from its GGUF, as the tests do)."""
    sys.path.insert(0, str(ROOT))
    from pipeline.models import DEFAULT_MODEL, converted_dir

    source = converted_dir(DEFAULT_MODEL)
    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def build_carry(name: str, names: tuple[str, ...], versions: dict[str, str], out: Path) -> int:
    carry = out / name
    shutil.rmtree(carry, ignore_errors=True)
    download(names, versions, carry)
    for package, prefix in LEFT_OUT.items():
        for wheel in carry.glob(f"{package}-*.whl"):
            print(f"{wheel.name}: {leave_out(wheel, prefix)} files under {prefix} left out")
    if name == "b":
        copy_tokenizer(carry / "tokenizer")
    total = size(carry)
    if total > LIMIT:
        raise SystemExit(f"carry {name}: {total / 2**20:.1f} MiB, over {LIMIT >> 20} MiB")
    print(f"carry {name}: {total / 2**20:.1f} MiB in {carry}")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / ".gpu-wheels"))
    args = parser.parse_args()
    versions = locked()
    for name, names in CARRIES.items():
        build_carry(name, names, versions, Path(args.out))


if __name__ == "__main__":
    main()
