"""A tiny random Kandinsky 5.0 Image Lite (t2i or i2i) in the hub's diffusers layout, built
locally from the real classes.

Shaped like kandinskylab/Kandinsky-5.0-{T2I,I2I}-Lite-sft-Diffusers at toy sizes: a
Kandinsky5Transformer3DModel (one text block, four visual blocks; the i2i one also reads the
conditioning latents and their mask), a 16-channel VAE with the Flux VAE's latent statistics,
a Qwen2.5-VL with a one-block vision tower, CLIP-L's pooled text features and a flow-matching
Euler scheduler. The `tiny` flavours load it through the same `from_pretrained` path as the
real weights.

The pipelines drop a fixed number of leading Qwen tokens (prompt_template_encode_start_idx)
as their prompt template. The Qwen tokenizer built here is a byte-level BPE whose vocabulary
holds the template words whole, as Qwen2.5's does, so that cut falls where it would with the
real tokenizer (40 tokens for t2i). For i2i, the real tokenizer splits the template prefix
into 49 tokens while the pipelines cut 54 (as the original Kandinsky code does, see
kandinskylab/kandinsky-5 issue #92), dropping the first five prompt tokens; five i2i template
words are held as two tokens each here, so that the i2i cut also lands on the prompt's first
token and short test captions still reach the embeddings.
"""

from __future__ import annotations

import functools
import math
import re
import tempfile
from pathlib import Path

import torch

from job.models.sd3_tiny import sixteen_channel_vae
from job.models.sdxl_tiny import (MERGED_WORDS, build_tokenizer, byte_unicode_table,
                                   ensure_model_folder, write_vocab_files)

KINDS = ("t2i", "i2i")
QWEN_HIDDEN, CLIP_HIDDEN = 32, 16
# The Flux VAE's latent statistics (its vae/config.json).
SCALING_FACTOR, SHIFT_FACTOR = 0.3611, 0.1159
# Qwen2.5-VL's special tokens that the pipelines and the processor use, in Qwen's order.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# Caption words beyond sdxl_tiny's, so typical test prompts are a handful of tokens.
PROMPT_WORDS = MERGED_WORDS + ("cube", "table", "image", "and", "in", "with", "small", "large",
                               "house", "tree", "sky", "man", "woman", "car")
# I2I template words kept as two tokens, which brings its prefix from 49 tokens to the 54
# that the pipeline cuts ("Ġ" is the byte-level space).
I2I_SPLITS = {"ĠBased": ("ĠBas", "ed"), "Ġprovided": ("Ġprovid", "ed"),
              "Ġinteresting": ("Ġinterest", "ing"), "Ġused": ("Ġuse", "d"),
              "Ġtogether": ("Ġto", "gether")}
# Qwen2.5-VL's image processing at a smaller cap: a 32x32 image (the i2i pipeline halves
# its 64x64 input) is scaled up to 56x56, 4x4 patches of 14, 4 image tokens after the 2x2
# merge; no image gets more than 16 tokens.
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112
# Modulation weights' spread: the text, the pooled text and the timestep then change the
# output by about 20%, 50% and 5% (0.02 leaves the text's share near 4%).
MODULATION_STD = 0.1


def _prompt_templates() -> list[str]:
    """The t2i and i2i pipelines' Qwen prompt templates (they are set in __init__)."""
    from diffusers import Kandinsky5I2IPipeline, Kandinsky5T2IPipeline

    return [cls(*[None] * 7).prompt_template
            for cls in (Kandinsky5T2IPipeline, Kandinsky5I2IPipeline)]


def _vocabulary_words(pre_tokenizer) -> list[str]:
    """Byte-level words to hold whole: the templates' text before the prompt, split as
    Qwen's pre-tokenizer splits it, then the caption words bare (a caption's first word)
    and after a space."""
    specials = "(" + "|".join(re.escape(token) for token in SPECIAL_TOKENS) + ")"
    words: list[str] = []
    for template in _prompt_templates():
        for part in re.split(specials, template.split("{}")[0]):
            if part and part not in SPECIAL_TOKENS:
                words += [word for word, _ in pre_tokenizer.pre_tokenize_str(part)]
    words = [piece for word in words for piece in I2I_SPLITS.get(word, (word,))]
    words += [prefix + word for word in PROMPT_WORDS for prefix in ("", "Ġ")]
    return list(dict.fromkeys(words))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """`word` split by BPE as the tokenizers library applies it: the lowest-ranked pair,
    leftmost first, until no pair is a merge."""
    symbols = list(word)
    while len(symbols) > 1:
        rank, i = min((ranks.get(pair, math.inf), i)
                      for i, pair in enumerate(zip(symbols, symbols[1:])))
        if rank == math.inf:
            break
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def _merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges that make every word one token. Each word's merges rank after all earlier
    ones, so a later word never changes how an earlier word splits."""
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = _bpe(word, ranks)
        while len(symbols) > 1:
            ranks[(symbols[0], symbols[1])] = len(ranks)
            symbols = _bpe(word, ranks)
    return list(ranks)


def build_qwen_tokenizer():
    """A Qwen2-style byte-level BPE tokenizer over a small vocabulary: the 256 byte symbols,
    the merged words, then the special tokens."""
    from transformers import Qwen2Tokenizer

    symbols = list(byte_unicode_table().values())
    bytes_only = Qwen2Tokenizer(vocab={s: i for i, s in enumerate(symbols)}, merges=[])
    merges = _merges(_vocabulary_words(bytes_only.backend_tokenizer.pre_tokenizer))
    tokens = symbols + [left + right for left, right in merges] + list(SPECIAL_TOKENS)
    return Qwen2Tokenizer(
        vocab={token: i for i, token in enumerate(tokens)}, merges=merges,
        eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        extra_special_tokens=list(SPECIAL_TOKENS[1:]), model_max_length=32768)


def _processor(tokenizer):
    """Qwen2.5-VL's processor (patch 14, temporal patch 2, merge 2) around `tokenizer`."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=14, merge_size=2,
                                              temporal_patch_size=2),
        video_processor=Qwen2VLVideoProcessor(size=size, patch_size=14, merge_size=2,
                                              temporal_patch_size=2),
        tokenizer=tokenizer)


def _qwen(tokenizer):
    """Qwen2.5-VL at toy size; its token ids are the tokenizer's."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        vocab_size=len(tokenizer), hidden_size=QWEN_HIDDEN, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=4096, bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        # Multimodal RoPE over (time, height, width): the sections fill half the head dim
        # (16) in the real model's proportions (16, 24, 24 of 64).
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                  out_hidden_size=QWEN_HIDDEN, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=112, fullatt_block_indexes=[0])
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>")))


def _clip(vocab: dict[str, int]):
    """CLIP-L's text model at toy size (the pipelines read its pooler_output)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=1000, hidden_size=CLIP_HIDDEN, intermediate_size=2 * CLIP_HIDDEN,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        hidden_act="quick_gelu", layer_norm_eps=1e-5,
        # The pooled output is read at the first eos position, so the ids must be the real ones.
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"]))


def _transformer(i2i: bool):
    """The DiT at toy size, its modulations made non-zero."""
    from diffusers import Kandinsky5Transformer3DModel
    from diffusers.models.transformers.transformer_kandinsky import Kandinsky5Modulation

    transformer = Kandinsky5Transformer3DModel(
        in_visual_dim=16, out_visual_dim=16, in_text_dim=QWEN_HIDDEN, in_text_dim2=CLIP_HIDDEN,
        time_dim=16, patch_size=(1, 2, 2), model_dim=32, ff_dim=64, num_text_blocks=1,
        num_visual_blocks=4, axes_dims=(4, 6, 6), visual_cond=i2i)
    # The class zero-initialises the modulations (training starts from identity blocks):
    # random weights elsewhere would then still pass every block through unchanged.
    for module in transformer.modules():
        if isinstance(module, Kandinsky5Modulation):
            torch.nn.init.normal_(module.out_layer.weight, std=MODULATION_STD)
            torch.nn.init.normal_(module.out_layer.bias, std=MODULATION_STD)
    return transformer


def build_tiny_kandinsky5(path: Path, seed: int = 0, kind: str = "t2i") -> Path:
    """Write a tiny random Kandinsky 5 pipeline folder (`kind` t2i or i2i) at `path`
    (deterministic given seed)."""
    from diffusers import (FlowMatchEulerDiscreteScheduler, Kandinsky5I2IPipeline,
                           Kandinsky5T2IPipeline)

    path = Path(path)
    processor = _processor(build_qwen_tokenizer())
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_2 = build_tokenizer(Path(scratch) / "tokenizer_2", "<|endoftext|>")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = _transformer(kind == "i2i")
        torch.manual_seed(seed + 1)
        vae = sixteen_channel_vae(SCALING_FACTOR, SHIFT_FACTOR)
        torch.manual_seed(seed + 2)
        text_encoder = _qwen(processor.tokenizer)
        torch.manual_seed(seed + 3)
        text_encoder_2 = _clip(tokenizer_2.get_vocab())
    pipeline_class = Kandinsky5I2IPipeline if kind == "i2i" else Kandinsky5T2IPipeline
    pipeline = pipeline_class(
        transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=processor,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0))
    pipeline.save_pretrained(str(path), safe_serialization=True)
    # As for the tiny SDXL: the vocabulary files keep CLIP's folder readable by
    # transformers 4's slow CLIPTokenizer, as the hub's folders are.
    write_vocab_files(path / "tokenizer_2")
    return path


def ensure_tiny_kandinsky5(folder: Path, kind: str = "t2i") -> Path:
    """Build the tiny t2i or i2i model at `folder` unless a complete one is there (atomic
    rename)."""
    if kind not in KINDS:
        raise ValueError(f"unknown tiny Kandinsky 5 kind {kind!r}; expected one of {KINDS}")
    return ensure_model_folder(Path(folder), functools.partial(build_tiny_kandinsky5, kind=kind))
