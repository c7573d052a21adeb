"""Data the project ships: the SQuAD dev subset that `atman eval squad` runs on by default (CC BY-SA 4.0,
squad/README.md), and the synthetic box set of `atman eval boxes` (boxes/make.py writes it)."""

from pathlib import Path

SQUAD_DEV = Path(__file__).parent / "squad" / "dev.jsonl"
"""76 SQuAD v1.1 dev examples from two Wikipedia articles; the shape and the selection are in squad/README.md."""

BOXES = Path(__file__).parent / "boxes" / "boxes.jsonl"
"""8 synthetic images (a red, green or blue 16 px square on grey, 64 x 48), "What colour is the square?", its box."""
