"""The methods by name: one vocabulary for `atman eval`, a job's ``method.name`` and ``atman explain --method``, their
help and the evaluation.

Light on purpose (no torch): the CLI and the job spec check names and build their help before any model is loaded.
"""

from __future__ import annotations

import inspect

from pipeline.atman.config import MODES, AtManConfig
from pipeline.atman.variants import VARIANTS as ESTIMATORS

BASELINES = ("ixg", "ig", "rollout", "random")
"""Captum's InputXGradient and IntegratedGradients, attention rollout, and uniform random scores."""
PEERS = ("attnlrp", "occlusion", "contextcite")
"""The methods users pick instead of AtMan (``pipeline.peers``): AttnLRP (lxt), Captum's occlusion
(FeatureAblation), ContextCite."""
VARIANTS = tuple(ESTIMATORS)
"""AtMan-family estimators with fewer passes (``pipeline.atman.variants``), named ``atman:<variant>``."""
DEFAULT_METHODS = ("atman", *BASELINES)
PAPER_KAPPA = 0.7
"""The paper's conceptual-suppression threshold, used by the ``+conceptual`` names."""
GRAMMAR = "atman, atman:<mode>[+conceptual][+squares], atman+squares, atman:paper, " + ", ".join(
    [f"atman:{v}" for v in VARIANTS] + list(PEERS + BASELINES)
)
"""How the names are built, for help texts; ``<mode>`` is one of AtManConfig's modes."""


EXPLAIN_METHODS = ("atman", *(f"atman:{v}" for v in VARIANTS), *PEERS, *(b for b in BASELINES if b != "random"))
"""The methods a job (``method.name``) and ``atman explain --method`` run (``pipeline.methods``): AtMan (the
default, batched sweeps), its estimators, the peers and the baselines. ``random`` is the evaluation's yardstick
only, and ``atman:<mode>`` names are the evaluation's: a job sets ``method.mode``."""
UNIT_FIELDS = ("granularity", "delimiter", "generate_max_tokens")
"""The AtManConfig fields every method uses: the units (granularity, delimiter; the explain span is the row's) and
the generated target's length. A peer or a baseline uses no other."""


def check_method(name: str) -> str:
    """``name`` if a job or ``atman explain`` runs it, else ValueError listing the names (the caller names its
    field: ``method.name``, ``--method``)."""
    if name not in EXPLAIN_METHODS:
        raise ValueError(f"{name!r} is not a method; the names are {', '.join(EXPLAIN_METHODS)}")
    return name


def atman_family(name: str) -> bool:
    """``atman`` and its estimators ``atman:<variant>``: they use AtMan's config (mode, factor, precision, ...)."""
    return name == "atman" or name.startswith("atman:")


VARIANT_UNUSED = (
    "conceptual_threshold",
    "conceptual_candidates",
    "target_units",
    "aggregate",
    "postprocess",
    "normalize",
)
"""The AtManConfig fields no ``atman:<variant>`` uses: each scores the prompt's units by the rise of the whole
target's CE, without conceptual neighbours, target units or postprocessing."""


def variant_of(name: str) -> str | None:
    """``atman:<variant>`` -> the variant (a key of ``VARIANTS``); None for any other name."""
    variant = name.removeprefix("atman:")
    return variant if name.startswith("atman:") and variant in ESTIMATORS else None


def variant_settings(variant: str) -> dict:
    """An estimator's own settings: the defaults of its keyword parameters after ``(explainer, planned)`` (e.g.
    ``coarse``'s ``refine_share``), read from its signature, so a new variant needs no entry here."""
    parameters = list(inspect.signature(ESTIMATORS[variant]).parameters.values())[2:]
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def unused_settings(name: str, values: dict) -> list[str]:
    """The AtManConfig fields in ``values`` that ``name`` does not use but that differ from their defaults, so that
    nothing asked for is silently ignored: a peer uses ``UNIT_FIELDS`` only; an ``atman:<variant>`` none of
    ``VARIANT_UNUSED`` and none of the fields its own settings fix (``joint-knockout``'s ``factor``)."""
    fields, variant = AtManConfig.model_fields, variant_of(name)
    if variant is not None:
        fixed = {k for k, v in variant_settings(variant).items() if k in fields and v is not None}  # None: the run's
        ignored = {*VARIANT_UNUSED, *fixed}
    elif atman_family(name):
        return []
    else:
        ignored = {k for k in fields if k not in UNIT_FIELDS}
    return [k for k, v in values.items() if k in ignored and v != fields[k].default]


def unused_message(name: str, unused: list[str], spelled: list[str]) -> str:
    """Why ``name`` refuses the ``unused`` fields (as the caller ``spelled`` them: ``method.factor``, ``--factor``)
    and what to do, for the job spec's and the CLI's error."""
    variant, fix = variant_of(name), ", ".join(spelled)
    if variant is not None:
        own = ", ".join(f"{k} {v}" for k, v in variant_settings(variant).items())
        return (
            f"{name} does not use {', '.join(unused)}: it scores units by the whole target's CE rise with its own "
            f"settings ({own}), without conceptual neighbours, target units or postprocessing; remove {fix}, or "
            "choose method atman"
        )
    fields, names = ", ".join(UNIT_FIELDS), ", ".join(unused)
    return f"{name} uses only {fields} of the method's fields, not {names}: remove {fix}, or choose an AtMan method"


LDS_MASKS = 32
"""Random ablations per example for the evaluation's LDS (ContextCite's: each unit kept with probability 1/2)."""


def check_lds_masks(n: int) -> int:
    """``n`` ablations, checked: 0 (no LDS) or at least 2 (one ablation ranks nothing); ValueError naming it."""
    if n < 0 or n == 1:
        raise ValueError(f"lds_masks: {n} ablations rank nothing; give 0 (no LDS) or at least 2")
    return n


def method_names() -> set[str]:
    """Every valid name: the AtMan variants over AtManConfig's modes, each optionally ``+squares``, and the
    baselines."""
    atman = {"atman"} | {f"atman:{m}" for m in MODES} | {f"atman:{m}+conceptual" for m in MODES}
    variants = {f"atman:{v}" for v in VARIANTS}
    return {"atman:paper", *PEERS, *BASELINES} | atman | {f"{a}+squares" for a in atman} | variants


def parse_methods(text: str) -> list[str]:
    """Comma-separated names, in the order given; an unknown name raises ValueError naming ``methods``."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    valid = method_names()
    for name in names:
        if name not in valid:
            raise ValueError(f"methods: {name!r} is not a method; the names are {GRAMMAR} (<mode>: {', '.join(MODES)})")
    if not names:
        raise ValueError(f"methods: no method given; the names are {GRAMMAR}")
    return names


def method_config(name: str, granularity: str) -> AtManConfig:
    """``atman`` = library defaults; ``atman:<mode>`` = that mode without conceptual suppression; ``+conceptual``
    adds it with the paper's kappa 0.7; ``+squares`` aggregates per-target-token ΔCE as the paper's evaluation."""
    if name == "atman:paper":  # the authors' code on the evaluation's units; target units do not score context
        return AtManConfig.paper(granularity=granularity, target_units=False)
    base, *extras = name.split("+")
    aggregate = "sum_of_squares" if "squares" in extras else "sum"
    if base == "atman":
        return AtManConfig(granularity=granularity, aggregate=aggregate)
    return AtManConfig(
        granularity=granularity,
        mode=base.removeprefix("atman:"),
        conceptual_threshold=PAPER_KAPPA if "conceptual" in extras else None,
        aggregate=aggregate,
    )
