"""The ``atman`` command line, one module per group of commands: explaining (``explain``), jobs (``run``, ``plan``,
``audit``, ``schedule``), cluster (``submit``, ``status``, ``logs``, ``stop``), results (``query``, ``show``,
``report``, ``diff``) and evaluation (``eval ...``); common holds what they share.

Exit codes are pipeline/errors.py's, one mapping for every command: 0 ok, 2 bad input or config (stderr names the
field), 1 any other failure, 3 an answer withheld (``query --strict``, ``audit`` past its thresholds), 128 + N a
run stopped by signal N. A command reports an error through ``common.reported`` / ``common.fail``, which take the
code from ``pipeline.errors.exit_code``.
"""

from __future__ import annotations

import typer

from pipeline.cli import cluster, evaluation, explaining, jobs, results

app = typer.Typer(
    help="AtMan explanations of causal LMs: which parts of the prompt the prediction relies on.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """AtMan explanations of causal LMs: which parts of the prompt the prediction relies on."""


COMMANDS = (
    explaining.explain,
    jobs.run,
    jobs.plan,
    results.query,
    results.show,
    results.report,
    results.diff,
    jobs.audit,
    cluster.submit,
    cluster.status,
    cluster.logs,
    cluster.stop,
    jobs.schedule,
)
"""The commands in the order ``atman --help`` lists them (each named after its function)."""

for _command in COMMANDS:
    app.command()(_command)
app.add_typer(evaluation.app, name="eval")


def main() -> None:
    app()
