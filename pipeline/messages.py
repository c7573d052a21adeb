"""How errors reach the user: one line that names the field (or the cause), whatever raised it.

Every entry point (job specs, configs, command-line options, Ray task failures, model loading) formats through
these two functions, so the same mistake reads the same everywhere.
"""

from __future__ import annotations

import re

from pydantic import ValidationError


def describe(error: ValidationError, extra_hint: str = "check the spelling") -> str:
    """``field: what is wrong`` per invalid field, joined by '; '. A model-level check (no field in its location)
    already starts its message with the field it names (``delimiter: ...``)."""
    parts = []
    for e in error.errors():
        field = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown key ({extra_hint})"
        parts.append(f"{field}: {msg}" if field else msg)
    return "; ".join(parts)


def first_line(err: BaseException) -> str:
    """The line of an exception that names its cause: for a Ray task error, the user's exception inside it (no
    colour codes, not Ray's own wrapper lines); otherwise the message's first line, or the exception's type."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).strip().splitlines()]
    lines = [line for line in lines if line]
    cause = [
        line for line in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception)\b", line) and not line.startswith("ray.")
    ]
    return (cause[-1] if cause else lines[0] if lines else type(err).__name__)[:500]
