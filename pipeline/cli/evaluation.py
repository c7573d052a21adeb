"""``atman eval``: the paper's evaluation protocols on the bundled (or given) data, one subcommand each: ``squad``
(plausibility and deletion AOPC per method), ``sweep`` (AtMan over factor x conceptual threshold), ``boxes`` (the
image protocol) and ``forget`` (take methods out of a records file so the next run computes them again)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Literal

import typer
from pydantic import ValidationError
from rich.console import Console

from pipeline.atman.config import MODES, AtManConfig
from pipeline.cli.common import (
    ENGINE,
    ModelName,
    SuppressionMode,
    SweepPrecision,
    WeightsDType,
    err,
    fail,
    method_option,
    quiet_libraries,
    reported,
    threshold,
)
from pipeline.data import BOXES, SQUAD_DEV
from pipeline.eval_methods import DEFAULT_METHODS, GRAMMAR, LDS_MASKS
from pipeline.messages import describe
from pipeline.models import DEFAULT_MODEL

app = typer.Typer(help="Evaluate attribution methods (the paper's protocols).", no_args_is_help=True)

EvalGranularity = Literal["token", "word", "sentence", "paragraph"]  # `custom` needs a delimiter the data lacks
SquadData = Annotated[
    str,
    typer.Option(
        help="SQuAD JSONL (id, context, question, answers[{text, answer_start}]); default: the bundled "
        "76-example dev subset (CC BY-SA 4.0)."
    ),
]
Limit = Annotated[int | None, typer.Option(help="Only the first N examples.")]
Sample = Annotated[int | None, typer.Option(help="N examples evenly spaced through the file.")]
Units = Annotated[EvalGranularity, method_option("granularity")]
Out = Annotated[str | None, typer.Option(help="Also write the JSON result to this file.")]
LdsMasks = Annotated[
    int,
    typer.Option(
        help="Random ablations per example for the LDS (ContextCite's metric; one forward pass each, shared by the "
        "methods); 0: no LDS."
    ),
]
Records = Annotated[
    str | None,
    typer.Option(
        help="JSONL file keeping each finished example; rerun with the same file to go on where a run stopped."
    ),
]


@app.command("squad")
def eval_squad(
    data: SquadData = str(SQUAD_DEV),
    limit: Limit = None,
    sample: Sample = None,
    methods: Annotated[
        str, typer.Option(help=f"Comma-separated method names: {GRAMMAR}; <mode>: {', '.join(MODES)}.")
    ] = ",".join(DEFAULT_METHODS),
    model: ModelName = DEFAULT_MODEL,
    granularity: Units = ENGINE.granularity,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    out: Out = None,
    records: Records = None,
    dtype: WeightsDType = "auto",
    precision: SweepPrecision = ENGINE.precision,
    lds_masks: LdsMasks = LDS_MASKS,
) -> None:
    """SQuAD plausibility (mAP / mAR, means and interquartile means, 0-100) and deletion AOPC per method."""
    from pipeline.eval_methods import check_lds_masks, parse_methods
    from pipeline.evaluate import evaluate, load_squad

    quiet_libraries()
    with reported(ValueError, FileNotFoundError):
        names = parse_methods(methods)
        check_lds_masks(lds_masks)
        examples = load_squad(data, limit, sample)
    lm = _eval_model(model, dtype)
    with reported(ValueError):  # e.g. a precision the weights' dtype cannot take
        result = _with_progress(
            len(examples),
            lambda tick: evaluate(lm, examples, names, granularity, on_example=tick, records=records,
                                  precision=precision, lds_masks=lds_masks),
        )  # fmt: skip
    if _emit(result, out, as_json):
        return
    _print_metrics(
        f"SQuAD, {result['n']} examples, {result['model']}, {granularity} units",
        ["method"],
        [([name], m) for name, m in result["methods"].items()],
    )
    Console().print(f"answer units are {100 * result['answer_share']:.1f} % of all units (random's expected mAP)")
    for pair, d in result["differences"].items():
        lo, hi = d["ci95"]
        Console().print(f"mAP {pair}: {d['mAP']:+.1f} (95 % bootstrap CI {lo:+.1f} to {hi:+.1f})", highlight=False)


@app.command("boxes")
def eval_boxes(
    model: Annotated[str, typer.Option(help="A vision-language model: Hugging Face id or local directory.")],
    data: Annotated[
        str,
        typer.Option(
            help="Box JSONL (id, image path relative to the file, question, target, boxes [[x0, y0, x1, y1]]); "
            "default: the bundled synthetic squares."
        ),
    ] = str(BOXES),
    limit: Limit = None,
    methods: Annotated[str, typer.Option(help="Comma-separated: atman, atman:<mode>[+squares], ixg, ig, random.")] = (
        "atman,ixg,ig,random"
    ),
    image_grid: Annotated[
        str | None, typer.Option(help="Group image tokens into ROWSxCOLS cells (default: one unit per token).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON result.")] = False,
    out: Out = None,
) -> None:
    """The paper's image protocol: the share of relevance inside ground-truth boxes (mAP / mAR) per method."""
    from pipeline.eval_boxes import evaluate_boxes, load_boxes
    from pipeline.eval_methods import parse_methods

    quiet_libraries()
    with reported(ValueError, FileNotFoundError):
        names = parse_methods(methods)
        bad = [n for n in names if not (n.startswith("atman") or n in ("ixg", "ig", "random"))]
        if bad:
            raise ValueError(f"methods: {', '.join(bad)} not available for images (atman, ixg, ig, random)")
        examples = load_boxes(data, limit)
    lm = _eval_model(model)
    if getattr(lm, "processor", None) is None:
        fail(f"model: {model!r} is not a vision-language model (its config has no vision_config)")
    with reported(ValueError):
        result = _with_progress(
            len(examples), lambda tick: evaluate_boxes(lm, examples, names, image_grid, on_example=tick)
        )
    if _emit(result, out, as_json):
        return
    rows = [([name], m) for name, m in result["methods"].items()]
    _print_metrics(f"boxes, {result['n']} examples, {result['model']}", ["method"], rows)
    Console().print(f"box pixels are {100 * result['box_share']:.1f} % of the units' area (random's expected mAP)")


@app.command("forget")
def eval_forget(
    records: Annotated[str, typer.Argument(help="A records file of `eval squad` or `eval sweep` (--records).")],
    methods: Annotated[
        str,
        typer.Option(help="Comma-separated method names (for a sweep, setting names such as 'factor=0.1 kappa=off')."),
    ],
) -> None:
    """Take methods out of a records file, so the next run with it computes them again (and only them) on every
    example: after a method's code changed, its rows are redone without redoing the others."""
    from pipeline.evaluate import forget_methods

    names = [name.strip() for name in methods.split(",") if name.strip()]
    if not names:
        fail("methods: name at least one method")
    missing = {FileNotFoundError: lambda e: f"records: {records} does not exist"}
    with reported(ValueError, FileNotFoundError, say=missing):
        counts = forget_methods(records, names)
    for name, n in counts.items():
        Console().print(f"{name}: taken out of {n} examples" + ("" if n else " (no example held it)"), highlight=False)


@app.command("sweep")
def eval_sweep(
    data: SquadData = str(SQUAD_DEV),
    limit: Limit = None,
    sample: Sample = None,
    mode: SuppressionMode = ENGINE.mode,
    factors: Annotated[str, typer.Option(help="Comma-separated factors m (AtManConfig.factor).")] = "0,0.05,0.1,0.3",
    kappas: Annotated[
        str, typer.Option(help="Comma-separated conceptual thresholds in [0, 1]; 'none' = off.")
    ] = "none,0.7,0.9",
    model: ModelName = DEFAULT_MODEL,
    granularity: Units = ENGINE.granularity,
    out: Out = None,
    records: Records = None,
    lds_masks: LdsMasks = LDS_MASKS,
) -> None:
    """The paper's line sweep: AtMan's mAP / mAR / AOPC / LDS over factor x conceptual threshold on SQuAD."""
    from pipeline.eval_methods import check_lds_masks
    from pipeline.evaluate import load_squad, sweep

    quiet_libraries()
    grid_f = [_grid_value("factors", x, float, "factor") for x in factors.split(",")]
    grid_k = [_grid_value("kappas", x, threshold, "conceptual_threshold") for x in kappas.split(",")]
    with reported(ValueError, FileNotFoundError, say={FileNotFoundError: lambda e: f"data: {e}"}):
        check_lds_masks(lds_masks)
        examples = load_squad(data, limit, sample)
    lm = _eval_model(model)
    result = _with_progress(
        len(examples),
        lambda tick: sweep(lm, examples, mode, grid_f, grid_k, granularity, on_example=tick, records=records,
                           lds_masks=lds_masks),
    )  # fmt: skip
    _emit(result, out, as_json=False)
    _print_metrics(
        f"AtMan {mode} sweep, SQuAD, {result['n']} examples, {result['model']}",
        ["factor", "kappa"],
        [
            ([str(g["factor"]), "off" if g["conceptual_threshold"] is None else str(g["conceptual_threshold"])], g)
            for g in result["grid"]
        ],  # fmt: skip
    )


def _grid_value(option: str, text: str, parse, field: str):
    """One value of a sweep's comma-separated grid, parsed and checked as AtManConfig's ``field`` would check it."""

    def reason(error: BaseException) -> str:  # float('x') and pydantic's ValidationError alike
        return f"{option}: {text.strip()!r}: " + (
            describe(error) if isinstance(error, ValidationError) else "not a number"
        )

    with reported(ValueError, say={ValueError: reason}):
        value = parse(text.strip())
        AtManConfig(**{field: value})
    return value


def _eval_model(model: str, dtype: str = "auto"):
    from pipeline import load_model

    with reported(ValueError):
        return load_model(model, dtype=dtype)


def _emit(result: dict, out: str | None, as_json: bool) -> bool:
    """Write an evaluation's JSON result to ``out`` (if given) and print it under ``--json``; True when printed
    (stdout then holds only the JSON, so no table follows)."""
    text = json.dumps(result, ensure_ascii=False)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    if as_json:
        sys.stdout.write(text + "\n")
    return as_json


def _with_progress(total: int, run):
    """Run ``run(tick)`` under a progress bar on stderr; ``tick(done, total)`` advances it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("[bold]examples"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
    )
    task = progress.add_task("eval", total=total)
    with progress:
        try:
            return run(lambda done, _total: progress.update(task, completed=done))
        except ValueError as error:  # a records file of another run: exit 2 naming records
            if not str(error).startswith("records:"):
                raise
            fail(str(error))


_METRICS = [("mAP", "mAP", ".1f"), ("mAR", "mAR", ".1f"), ("mAP IQ", "mAP_IQ", ".1f"), ("mAR IQ", "mAR_IQ", ".1f"),
            ("AOPC (nats)", "aopc", ".3f"), ("AOPC removal", "aopc_removal", ".3f"), ("LDS", "lds", ".3f"),
            ("LDS removal", "lds_removal", ".3f"), ("s / example", "seconds_per_example", ".2f")]  # fmt: skip


def _print_metrics(title: str, keys: list[str], rows: list[tuple[list[str], dict]]) -> None:
    """One table layout for `eval squad`, `eval sweep` and `eval boxes`: key columns, then the metrics of
    MethodResult.summary that the rows have (boxes have no deletion curves)."""
    from rich.table import Table

    columns = [c for c in _METRICS if any(c[1] in m for _, m in rows)]
    table = Table(*keys, *(header for header, _, _ in columns), title=title)
    for names, m in rows:
        table.add_row(*names, *(format(m[key], spec) if m.get(key) is not None else "" for _, key, spec in columns))
    Console().print(table)
