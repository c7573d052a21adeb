"""The errors a command reports, and the one mapping from an error to the command's exit code.

Exit codes: 0 ok; 2 bad input or config (the message names the field or file and the fix); 1 any other failure;
3 an answer withheld (``atman query --strict``, ``atman diff`` past its thresholds); 128 + N a run stopped by
signal N. Every error type here pickles by its arguments, so it crosses a Ray task boundary as itself: the driver
tests types, never message text. Light on purpose (no torch, no Ray): the driver and the CLI import it.
"""

from __future__ import annotations


class AtmanError(Exception):
    """An error this project raises on purpose; ``exit_code`` is what the command line exits with."""

    exit_code = 1


class BadInput(AtmanError, ValueError):
    """A config, job spec, option or input that cannot run; the message names the field (or file) and the fix."""

    exit_code = 2


class UnsupportedModel(BadInput):
    """The engine cannot explain this model exactly; the message says why (it never guesses)."""


class MethodUnsupported(UnsupportedModel):
    """The chosen method (not AtMan) cannot explain this model; the message names the method, the model's class and
    what the method supports. The caller names its field (``method.name``, ``--method``)."""


class RunLocked(BadInput):
    """Another driver holds the run's lease; the message names it and says what to do."""


class LeaseLost(AtmanError, RuntimeError):
    """Another driver took this driver's lease (it was taken over after expiring)."""


class RunIncomplete(AtmanError, RuntimeError):
    """The run stopped before every input row was written (it is not marked _SUCCESS); the message says how to
    resume it. ``exit_code``: 1, or 128 + the signal that stopped it."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message, exit_code)
        self.exit_code = exit_code

    def __str__(self) -> str:
        return str(self.args[0])


class AnswerWithheld(AtmanError):
    """A command gives no answer on purpose: the answer would be partial or past the thresholds it was asked to hold
    (``atman query --strict`` with parts left out, ``atman audit`` with prompts drifted); exit 3, for alerting."""

    exit_code = 3


EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (ValueError, 2),  # a bad value from a library: pydantic's ValidationError, float('x'), a bad run id
    (FileNotFoundError, 2),  # a path the user gave
    (FileExistsError, 2),  # something the user asked to create exists already (a submission id)
)
"""Exit codes of errors raised by libraries, first match wins; AtmanError carries its own; anything else is 1."""


def exit_code(err: BaseException) -> int:
    """The exit code for ``err`` (see the module's docstring)."""
    if isinstance(err, AtmanError):
        return err.exit_code
    return next((code for kind, code in EXIT_CODES if isinstance(err, kind)), 1)
