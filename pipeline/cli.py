"""The ``atman`` command line. Exit codes: 0 ok, 2 bad input or config (stderr names the field), 1 other failure."""

from __future__ import annotations

import json
import logging
import sys
from typing import Annotated, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console

from pipeline.atman.config import GRANULARITIES, MODES, AtManConfig
from pipeline.models import DEFAULT_MODEL

app = typer.Typer(
    help="AtMan explanations of causal LMs: which parts of the prompt the prediction relies on.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


@app.callback()
def _root() -> None:
    """AtMan explanations of causal LMs: which parts of the prompt the prediction relies on."""


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


def describe(error: ValidationError) -> str:
    """One line per invalid field: 'field: what is wrong'."""
    return "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'config'}: {e['msg']}" for e in error.errors())


def _quiet_libraries() -> None:
    import transformers

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _threshold(value: str) -> float | None:
    if value.strip().lower() in {"none", "off"}:
        return None
    try:
        return float(value)
    except ValueError:
        fail(f"conceptual-threshold: {value!r} is not a number or 'none'")


def _span(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        start, end = (int(x) for x in value.split(":"))
    except ValueError:
        fail(f"explain-span: {value!r} is not START:END character offsets, e.g. 0:42")
    return start, end


@app.command()
def explain(
    prompt: Annotated[str, typer.Option(help="The prompt text.")],
    target: Annotated[str | None, typer.Option(help="Target text to explain (default: generate one).")] = None,
    generate: Annotated[int | None, typer.Option(help="Generate N tokens greedily and explain them.")] = None,
    model: Annotated[str, typer.Option(help="Embedded alias, Hugging Face id or local directory.")] = DEFAULT_MODEL,
    granularity: Annotated[str, typer.Option(help=f"One of {', '.join(GRANULARITIES)}.")] = "token",
    delimiter: Annotated[str | None, typer.Option(help="Separator for --granularity custom.")] = None,
    mode: Annotated[str, typer.Option(help=f"Suppression form: {', '.join(MODES)}.")] = "log_additive",
    factor: Annotated[float, typer.Option(help="Attention multiplier m of suppressed units (paper: 0.1).")] = 0.1,
    conceptual_threshold: Annotated[
        str, typer.Option(help="Conceptual suppression cosine threshold (paper: 0.7), or 'none'.")
    ] = "0.7",
    explain_span: Annotated[str | None, typer.Option(help="Only explain prompt characters START:END.")] = None,
    chat: Annotated[
        bool | None,
        typer.Option("--chat/--no-chat", help="Wrap in the chat template / raw text (default: chat for questions)."),
    ] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Explain one prediction: score every unit of the prompt by how much suppressing it hurts the target."""
    _quiet_libraries()
    try:
        config = AtManConfig(
            mode=mode,
            factor=factor,
            granularity=granularity,
            delimiter=delimiter,
            conceptual_threshold=_threshold(conceptual_threshold),
        )
    except ValidationError as error:
        fail(describe(error))
    from pipeline import Explainer, load_model

    try:
        lm = load_model(model, dtype=dtype, device=device)
        explanation = Explainer(lm, config).explain(
            prompt, target, generate=generate, explain_span=_span(explain_span), chat=chat
        )
    except ValidationError as error:
        fail(describe(error))
    except (ValueError, FileNotFoundError) as error:
        fail(str(error))
    if as_json:
        sys.stdout.write(json.dumps(explanation.to_dict(), ensure_ascii=False) + "\n")
    else:
        explanation.show(Console())


@app.command()
def run(
    job: Annotated[str, typer.Argument(help="Job spec (YAML), e.g. jobs/examples/demo.yaml.")],
    run_id: Annotated[str | None, typer.Option(help="Run id; reuse one to resume that run (default: new).")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a spec field: --set method.factor=0.3 (repeatable).")
    ] = None,
    address: Annotated[
        str, typer.Option(help="local (embedded Ray), auto or ray://HOST:10001 (a cluster), inline (no Ray).")
    ] = "local",
    retry_errors: Annotated[bool, typer.Option(help="Explain again the rows of this run that ended in error.")] = False,
    preview: Annotated[int, typer.Option(help="Print the top units of the first N explained prompts.")] = 0,
) -> None:
    """Run a job: explain every prompt of its input and write Parquet (resumable with --run-id)."""
    from pipeline.jobspec import JobSpecError, load_job

    _quiet_libraries()
    try:
        spec = load_job(job, set_ or [])
    except JobSpecError as error:
        fail(str(error))
    if address not in ("local", "inline", "auto") and not address.startswith("ray://"):
        fail(f"address: {address!r} is not local, inline, auto or ray://HOST:10001 (use `atman submit` for http://)")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pipeline.job import RunIncomplete, run_job

    progress = Progress(
        TextColumn("[bold]explaining"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
    )
    task = progress.add_task("explain", total=None)

    def started(paths, rows: int, pending: int) -> None:
        err.print(f"run {paths.run_id}: {rows} input rows, {pending} to explain -> {paths.url}", highlight=False)
        progress.update(task, total=pending)

    try:
        with progress:
            summary = run_job(
                spec,
                run_id,
                address=address,
                retry_errors=retry_errors,
                on_start=started,
                on_progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
    except JobSpecError as error:
        fail(str(error))
    except ValueError as error:  # run id
        fail(str(error))
    except RunIncomplete as error:
        fail(str(error), code=1)
    from pipeline.render import render_preview, render_summary

    out = Console()
    render_summary(summary, out)
    if preview:
        render_preview(summary.location, preview, out)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
