"""``atman explain``: one prediction explained in the terminal (or as JSON), the library's Explainer behind it.

The method options are AtManConfig's fields (common.method_option), the inputs one ExplainRequest: what the
command reads from its options is what the Python API and a job's worker take. ``--method`` picks another method
by the job's names (``method.name``): it runs through ``pipeline.methods`` as a job's worker runs it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from typing import Annotated, Literal

import typer
from pydantic import ValidationError
from rich.console import Console

from pipeline.atman.config import Aggregate, AtManConfig, Granularity, Kernel, Postprocess
from pipeline.atman.request import ExplainRequest
from pipeline.cli.common import (
    ENGINE,
    ModelName,
    SuppressionMode,
    SweepPrecision,
    WeightsDType,
    err,
    fail,
    kappa_text,
    method_option,
    quiet_libraries,
    reported,
    threshold,
)
from pipeline.errors import MethodUnsupported
from pipeline.eval_methods import EXPLAIN_METHODS, atman_family, check_method, unused_message, unused_settings
from pipeline.messages import first_line
from pipeline.models import DEFAULT_MODEL

Prompt = Annotated[str, typer.Option(help="The prompt text.")]
Target = Annotated[str | None, typer.Option(help="Target text to explain (default: generate one).")]
Generate = Annotated[int | None, typer.Option(help="Generate N tokens greedily and explain them.")]
UnitGranularity = Annotated[Granularity, method_option("granularity")]
Delimiter = Annotated[str | None, method_option("delimiter")]
Factor = Annotated[float, method_option("factor")]
Kappa = Annotated[str, method_option("conceptual_threshold", "a number in [0, 1] or 'none'")]
KAPPA = kappa_text(ENGINE.conceptual_threshold)
Aggregation = Annotated[Aggregate, method_option("aggregate")]
Postprocessing = Annotated[Postprocess, method_option("postprocess")]
Normalize = Annotated[bool, method_option("normalize", flag="--normalize/--no-normalize")]
Preset = Annotated[
    Literal["none", "paper"],
    typer.Option(
        help="'paper': the AtMan authors' research code (AtManConfig.paper(): mode, factor, conceptual "
        "suppression, target units, aggregation); --granularity still applies. 'none': the options above."
    ),
]
Method = Annotated[
    str,
    typer.Option(
        help=f"The method: {', '.join(EXPLAIN_METHODS)}. Every one scores the same units (--granularity, "
        "--delimiter, --explain-span); a peer or a baseline uses no AtMan option (they keep their defaults)."
    ),
]
ExplainSpan = Annotated[str | None, typer.Option(help="Only explain prompt characters START:END.")]
Chat = Annotated[
    bool | None,
    typer.Option(
        "--chat/--no-chat",
        help="Wrap in the chat template / raw text (default: the template when the prompt ends in '?').",
    ),
]
AttentionKernel = Annotated[Kernel, method_option("attention_kernel")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
Images = Annotated[
    list[str] | None,
    typer.Option(help="An image shown before the prompt (vision-language models; repeat for several)."),
]
ImageGrid = Annotated[str | None, typer.Option(help="Group image tokens into ROWSxCOLS cells per image (e.g. 8x8).")]
Overlay = Annotated[
    str | None,
    typer.Option(help="PNG to write the image heatmap to (default with --image: atman-overlay.png)."),
]


def explain(
    prompt: Prompt,
    target: Target = None,
    generate: Generate = None,
    model: ModelName = DEFAULT_MODEL,
    granularity: UnitGranularity = ENGINE.granularity,
    delimiter: Delimiter = ENGINE.delimiter,
    mode: SuppressionMode = ENGINE.mode,
    factor: Factor = ENGINE.factor,
    conceptual_threshold: Kappa = KAPPA,
    aggregate: Aggregation = ENGINE.aggregate,
    postprocess: Postprocessing = ENGINE.postprocess,
    normalize: Normalize = ENGINE.normalize,
    preset: Preset = "none",
    method: Method = "atman",
    explain_span: ExplainSpan = None,
    chat: Chat = None,
    dtype: WeightsDType = "auto",
    precision: SweepPrecision = ENGINE.precision,
    attention_kernel: AttentionKernel = ENGINE.attention_kernel,
    device: Device = "auto",
    as_json: AsJson = False,
    image: Images = None,
    image_grid: ImageGrid = None,
    overlay: Overlay = None,
) -> None:
    """Explain one prediction: score every unit of the prompt by how much suppressing it hurts the target."""
    quiet_libraries()
    _check_method(
        method, preset, mode=mode, factor=factor, conceptual_threshold=threshold(conceptual_threshold),
        aggregate=aggregate, postprocess=postprocess, normalize=normalize, precision=precision,
        attention_kernel=attention_kernel,
    )  # fmt: skip
    config = _config(
        preset, granularity=granularity, delimiter=delimiter, precision=precision, attention_kernel=attention_kernel,
        mode=mode, factor=factor, conceptual_threshold=conceptual_threshold, aggregate=aggregate,
        postprocess=postprocess, normalize=normalize,
    )  # fmt: skip
    if (image_grid is not None or overlay is not None) and not image:
        fail(f"{'--image-grid' if image_grid is not None else '--overlay'}: needs --image")
    request = ExplainRequest(
        prompt, target, generate=generate, chat=chat, image_grid=image_grid, explain_span=_span(explain_span)
    )
    with reported(ValueError):
        request.check()  # before the model loads: a bad request exits 2 at once
    explanation, pictures = _explained(model, dtype, device, config, request, image, method)
    _print(explanation, as_json, method)
    if image:
        from pipeline.overlay import write_overlay

        path = write_overlay(explanation, pictures, overlay or "atman-overlay.png")
        (err if as_json else Console()).print(f"wrote {path}", highlight=False, soft_wrap=True)


def _check_method(name: str, preset: str, **atman_options) -> None:
    """Before any model loads: ``--method`` is a method, and a method other than AtMan's is given no AtMan option
    it would ignore (exit 2 naming the option)."""
    with reported(ValueError):
        try:
            check_method(name)
        except ValueError as error:
            raise ValueError(f"--method: {error}") from None
    if preset != "none" and not atman_family(name):
        fail(f"--preset: {preset} is an AtMan configuration; {name} does not use it (drop --preset or --method)")
    unused = unused_settings(name, atman_options)
    if unused:
        options = ["--" + k.replace("_", "-") for k in unused]
        fail(f"{', '.join(options)}: {unused_message(name, unused, options)}")


def _config(preset: str, *, granularity, delimiter, precision, attention_kernel, conceptual_threshold, **method):
    """The method the options describe: the paper's preset (which keeps only the unit and compute options), or
    AtManConfig of every method option; an invalid value exits 2 naming the field."""
    with reported(ValidationError):
        if preset == "paper":
            return AtManConfig.paper(
                granularity=granularity, delimiter=delimiter, precision=precision, attention_kernel=attention_kernel
            )
        return AtManConfig(
            granularity=granularity,
            delimiter=delimiter,
            conceptual_threshold=threshold(conceptual_threshold),
            precision=precision,
            attention_kernel=attention_kernel,
            **method,
        )


def _explained(model: str, dtype: str, device: str, config: AtManConfig, request: ExplainRequest, image, method):
    """Load the model and explain ``request`` (with the ``image`` files) under ``config`` by ``method``; the
    explanation and the images it was given. Bad input exits 2 naming it (a method that cannot explain the model
    or the request, naming ``--method``), a device out of memory 1 with what to change."""
    import torch

    from pipeline import Explainer, UnsupportedModelError, load_model

    say = {
        MethodUnsupported: lambda e: f"--method: {e}",
        UnsupportedModelError: lambda e: (
            f"model: {model!r} cannot be explained exactly: {str(e).removeprefix('model: ')}"
        ),
        torch.OutOfMemoryError: lambda e: (
            f"device: out of memory while explaining ({first_line(e)}); lower "
            "AtManConfig's batch_size / max_batch_tokens from Python, pick --dtype bfloat16, a smaller --model, or "
            "--device cpu"
        ),
    }
    with reported(ValueError, FileNotFoundError, torch.OutOfMemoryError, say=say):
        lm = load_model(model, dtype=dtype, device=device)
        if image and lm.processor is None:
            from pipeline.atman.images import FAMILIES

            fail(
                f"--image: {model!r} is a text-only model (it has no image processor); images need a "
                f"vision-language model of a supported family ({', '.join(FAMILIES)}) given to --model"
            )
        pictures = None
        if image:
            from pipeline.atman.multimodal import load_images

            pictures = load_images(image)
        request = replace(request, images=pictures)
        if method == "atman":
            return Explainer(lm, config).explain(request), pictures
        from pipeline.methods import MethodRunner

        runner = MethodRunner(lm, method, config)
        return runner.explain(runner.plan(request)), pictures


def _span(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        start, end = (int(x) for x in value.split(":"))
    except ValueError:
        fail(f"explain-span: {value!r} is not START:END character offsets, e.g. 0:42")
    return start, end


def _print(explanation, as_json: bool, method: str = "atman") -> None:
    """The explanation on stdout: a table, or pure JSON (whose "chat" object says what the note on stderr says, and
    "method" which method ran)."""
    from pipeline.render import chat_note, render_explanation

    if as_json:
        sys.stdout.write(json.dumps(explanation.to_dict() | {"method": method}, ensure_ascii=False) + "\n")
        note = chat_note(explanation, raw_text_hint="--no-chat")
        if note:
            err.print(note, highlight=False, markup=False, soft_wrap=True)
    else:
        render_explanation(explanation, Console(), raw_text_hint="--no-chat")
