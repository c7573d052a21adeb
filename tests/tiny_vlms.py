"""Tiny random vision-language models (2 text layers, d=64; a 1-layer vision tower) of every family we claim, built
offline from transformers configs, with inputs as each family's processor lays them out (image tokens inside the
text, the family's extra inputs).

``VLMS``: family -> builder returning (model, inputs for one request of prompt + target, the image token id).
"""

from __future__ import annotations

import torch
import transformers as tf

INIT = 0.25  # as tiny_models: peaked attention, so suppression moves the CE measurably
VOCAB = 300
IMAGE, START, END = 299, 297, 298  # image token, begin / end of image
_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=512,
    initializer_range=INIT,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32)


IMAGE_PROCESSORS = {
    "llava": lambda: tf.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    "idefics3": lambda: tf.Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}),
    "qwen2_vl": lambda: tf.Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=32 * 32
    ),
    "gemma3": lambda: tf.Gemma3ImageProcessorPil(size={"height": 32, "width": 32}),
}
"""Each family's real image processor, sized for the tiny vision towers (the processors below use these)."""


def _ids(*parts) -> torch.Tensor:
    out = []
    for part in parts:
        out += part if isinstance(part, list) else [part]
    return torch.tensor([out])


def llava_model(seed: int = 0, vocab_size: int = VOCAB, image_token_id: int = IMAGE):
    config = tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(**_VISION, patch_size=8),
        text_config=tf.LlamaConfig(**dict(_TEXT, vocab_size=vocab_size)),
        image_token_id=image_token_id,
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    return tf.LlavaForConditionalGeneration(config).eval()


def llava_processor(tokenizer):
    """A real LlavaProcessor over ``tokenizer`` (given an ``<image>`` token here) and a CLIP image processor sized
    for the tiny vision tower (32 px, 8 px patches: 16 image tokens)."""
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.chat_template = None  # SmolLM2's template is text-only; a base VLM without one
    image_processor = IMAGE_PROCESSORS["llava"]()
    return tf.LlavaProcessor(  # CLIP adds a class token (num_additional_image_tokens), the default strategy drops it
        image_processor,
        tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def llava(seed: int = 0):
    model = llava_model(seed)
    ids = _ids(1, 11, 12, [IMAGE] * 16, 13, 14, 15, 16, 17, 18)  # 4 x 4 patches of 8 px, then text + target
    return model, {"input_ids": ids, "pixel_values": torch.randn(1, 3, 32, 32)}


def idefics3_model(seed: int = 0, vocab_size: int = VOCAB, image_token_id: int = IMAGE):
    config = tf.Idefics3Config(
        vision_config=dict(_VISION, patch_size=8),
        text_config=tf.LlamaConfig(**dict(_TEXT, vocab_size=vocab_size)),
        scale_factor=2,
        image_token_id=image_token_id,
    )
    torch.manual_seed(seed)
    return tf.Idefics3ForConditionalGeneration(config).eval()


def idefics3_processor(tokenizer):
    """A real Idefics3Processor (it adds its own special tokens): 32 px tiles of images resized to 64 px on the
    longer edge, 4 tokens per tile and for the global view."""
    import copy

    image_processor = IMAGE_PROCESSORS["idefics3"]()
    return tf.Idefics3Processor(image_processor=image_processor, tokenizer=copy.deepcopy(tokenizer), image_seq_len=4)


def idefics3(seed: int = 0):
    model = idefics3_model(seed)
    ids = _ids(1, 11, START, [IMAGE] * 4, END, 12, 13, 14, 15, 16, 17)  # 16 patches, pixel shuffle 2 -> 4 tokens
    return model, {"input_ids": ids, "pixel_values": torch.randn(1, 1, 3, 32, 32)}


def qwen_processor(tokenizer, workdir):
    """Qwen2-VL's real processor (its own text expansion and mm_token_type_ids) over ``tokenizer`` given Qwen's
    vision tokens, with images resized to at most 32 x 32 px (4 px patches, 2 x 2 merged). Only its constructor is
    bypassed: the stock one also builds the video half, which needs torchvision (absent from this CPU install)."""
    tokenizer.save_pretrained(workdir)
    extra = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
             "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}  # fmt: skip
    tokenizer = tf.AutoTokenizer.from_pretrained(workdir, extra_special_tokens=extra)
    tokenizer.chat_template = None

    class ImageOnlyQwen2VLProcessor(tf.Qwen2VLProcessor):
        def __init__(self, image_processor, tokenizer):
            tf.ProcessorMixin.__init__(self, image_processor, tokenizer)
            self.image_token, self.video_token = tokenizer.image_token, tokenizer.video_token
            self.image_token_id, self.video_token_id = tokenizer.image_token_id, tokenizer.video_token_id

    image_processor = IMAGE_PROCESSORS["qwen2_vl"]()
    return ImageOnlyQwen2VLProcessor(image_processor, tokenizer)


def _qwen(config_cls, model_cls, vision: dict, seed: int, vocab_size: int = VOCAB,
          tokens: tuple[int, int, int] = (IMAGE, START, END)):  # fmt: skip
    text = dict(_TEXT, vocab_size=vocab_size, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    config = config_cls(
        text_config=text,
        vision_config=dict(vision, patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
        image_token_id=tokens[0],
        vision_start_token_id=tokens[1],
        vision_end_token_id=tokens[2],
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # one 16 x 16 px image: 4 x 4 patches of 4 px (two frames each), merged 2 x 2 -> 4 tokens
    grid = torch.tensor([[1, 4, 4]])
    ids = _ids(1, 11, START, [IMAGE] * 4, END, 12, 13, 14, 15, 16, 17)
    pixels = torch.randn(16, 3 * 2 * 4 * 4)
    return model, {
        "input_ids": ids,
        "pixel_values": pixels,
        "image_grid_thw": grid,
        "mm_token_type_ids": (ids == IMAGE).int(),
    }


def qwen2_vl(seed: int = 0, **kwargs):
    vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2)
    return _qwen(tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration, vision, seed, **kwargs)


def qwen2_5_vl(seed: int = 0, **kwargs):
    vision = dict(
        depth=1, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2, window_size=8,
        fullatt_block_indexes=[0],
    )  # fmt: skip
    return _qwen(tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration, vision, seed, **kwargs)


def gemma3_processor(tokenizer, workdir):
    """A real Gemma3Processor over ``tokenizer`` given Gemma's image tokens (saved and reloaded with them as its
    extra special tokens, as Gemma's own tokenizer has them): 32 px images, 4 tokens each."""
    tokenizer.save_pretrained(workdir)
    extra = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}
    tokenizer = tf.AutoTokenizer.from_pretrained(workdir, extra_special_tokens=extra)
    image_processor = IMAGE_PROCESSORS["gemma3"]()
    return tf.Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4)


def gemma3(seed: int = 0, vocab_size: int = VOCAB, tokens: tuple[int, int, int] = (IMAGE, START, END)):
    text = dict(
        _TEXT,
        vocab_size=vocab_size,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=5,
        query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"],
    )
    config = tf.Gemma3Config(
        text_config=text,
        vision_config=dict(_VISION, patch_size=8),
        mm_tokens_per_image=4,
        image_token_index=tokens[0],
        boi_token_index=tokens[1],
        eoi_token_index=tokens[2],
    )
    torch.manual_seed(seed)
    model = tf.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # Gemma 3 initialises its projector to zeros: every image token would embed as 0
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=INIT)
    ids = _ids(1, 11, START, [IMAGE] * 4, END, 12, 13, 14, 15, 16, 17)  # 4 x 4 patches pooled to 2 x 2 tokens
    return model, {"input_ids": ids, "pixel_values": torch.randn(1, 3, 32, 32), "token_type_ids": (ids == IMAGE).long()}


VLMS = {
    "llava": llava,
    "idefics3": idefics3,
    "qwen2_vl": qwen2_vl,
    "qwen2_5_vl": qwen2_5_vl,
    "gemma3": gemma3,
}


def save_tiny_llava(path, tokenizer):
    """A tiny LLaVA and its processor saved as a model directory (what a job's model.id or --model names)."""
    processor = llava_processor(tokenizer)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    llava_model(vocab_size=len(processor.tokenizer), image_token_id=image_id).save_pretrained(path)
    processor.save_pretrained(path)
    return path
