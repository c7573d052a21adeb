"""The engine's refusal, in a module of its own: the attention routes (``attention.py``) and the family adapters
(``families.py``) both raise it, and neither may import the other for it (that was an import loop). It imports
nothing, so a light module can raise it without loading torch."""

from __future__ import annotations


class UnsupportedModelError(ValueError):
    """The model's attention cannot be suppressed exactly; the message names the model class and the reason."""
