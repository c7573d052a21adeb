"""Data the project ships: the SQuAD dev subset that `atman eval` runs on by default (CC BY-SA 4.0, squad/README.md)."""

from pathlib import Path

SQUAD_DEV = Path(__file__).parent / "squad" / "dev.jsonl"
"""76 SQuAD v1.1 dev examples from two Wikipedia articles; the shape and the selection are in squad/README.md."""
