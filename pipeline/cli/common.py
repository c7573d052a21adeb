"""What the commands share: the stderr console, the one way a command fails, and the options several declare.

A command fails one way: a one-line message on stderr (``error: ...``, naming the field) and the exit code that
``pipeline.errors.exit_code`` gives the error, so the code follows from the error's type in one place
(pipeline/errors.py) rather than at each ``except``. ``reported`` turns the errors a block expects into that;
``fail`` is the same for a check the command makes itself (bad input: exit 2 unless told otherwise).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Annotated, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from pipeline.atman.config import AtManConfig, Mode, Precision
from pipeline.errors import BadInput, exit_code
from pipeline.jobspec import AuditSpec
from pipeline.messages import describe
from pipeline.models import DType

ENGINE = AtManConfig()  # the library defaults, so every command's defaults are the same ones
AUDIT = AuditSpec()  # the job spec's audit thresholds, the defaults of `atman diff`
err = Console(stderr=True)


def fail(message: str, code: int = BadInput.exit_code) -> NoReturn:
    """End the command: ``message`` on stderr as one line (paths stay whole), exit ``code``."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


def message(error: BaseException) -> str:
    """An error's one line: pydantic's names each invalid field (``describe``), any other its own text."""
    return describe(error) if isinstance(error, ValidationError) else str(error)


Say = Mapping[type[BaseException], Callable[[BaseException], str]]


@contextmanager
def reported(*kinds: type[BaseException], say: Say | None = None) -> Iterator[None]:
    """An error of ``kinds`` raised inside ends the command through ``fail``: its message (``say[type](error)`` for
    the first type it is an instance of, where the command words it itself; else ``message(error)``) and the exit
    code pipeline/errors.py gives it. A ``fail`` inside passes through as it is."""
    try:
        yield
    except typer.Exit:  # a RuntimeError too: a fail() inside must not be reported twice
        raise
    except kinds as error:
        words = next((words for kind, words in (say or {}).items() if isinstance(error, kind)), message)
        fail(words(error), exit_code(error))


def method_option(name: str, values: str = "", flag: str | None = None) -> typer.models.OptionInfo:
    """A command-line option for AtManConfig's field ``name``: its help is the field's own documentation (the
    choices and the default come from the field's type and AtManConfig's default, so the CLI cannot drift)."""
    help_text = AtManConfig.model_fields[name].description or ""
    if values:
        help_text = f"{help_text} Give {values}."
    return typer.Option(*([flag] if flag else []), help=help_text)


def audit_option(name: str) -> typer.models.OptionInfo:
    """An option of `atman diff` for the job spec's audit threshold ``name`` (same help, same default)."""
    return typer.Option(help=AuditSpec.model_fields[name].description)


def kappa_text(value: float | None) -> str:
    return "none" if value is None else str(value)


def threshold(value: str) -> float | None:
    """A conceptual threshold as the options take it: a number or 'none' (also 'off')."""
    if value.strip().lower() in {"none", "off"}:
        return None
    try:
        return float(value)
    except ValueError:
        fail(f"conceptual-threshold: {value!r} is not a number or 'none'")


def quiet_libraries() -> None:
    import transformers

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# --- options several commands declare alike ------------------------------------------------------------------------

ModelName = Annotated[str, typer.Option(help="Embedded alias, Hugging Face id or local directory.")]
WeightsDType = Annotated[
    DType,
    typer.Option(
        help="How the weights are stored: auto = bfloat16 on GPU, float32 on CPU. How the sweep computes on them is "
        "--precision (auto keeps the scores float32-grade on bf16 weights).",
    ),
]
SweepPrecision = Annotated[Precision, method_option("precision")]
SuppressionMode = Annotated[Mode, method_option("mode")]
