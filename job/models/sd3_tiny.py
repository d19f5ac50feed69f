"""A tiny random SD3 in the hub's folder layout, built locally from the real classes.

Shaped like SD3.5 Medium at toy sizes: an MMDiT-X transformer (qk RMS norm, a dual
attention block) of 4 layers, a 16-channel VAE with SD3's scaling and shift factors,
CLIP-L and CLIP-G with projections, and a T5 encoder whose width the CLIP features are
padded to. The tokenizers are built here: byte-level BPE CLIP tokenizers (as for the tiny
SDXL) and a T5-style unigram tokenizer over a small vocabulary.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from job.models.sdxl_tiny import (MERGED_WORDS, build_tokenizer, ensure_model_folder,
                                   write_vocab_files)

NUM_LAYERS = 4
CLIP_L_HIDDEN, CLIP_G_HIDDEN = 16, 24
T5_WIDTH = 48  # >= CLIP_L_HIDDEN + CLIP_G_HIDDEN, as 4096 >= 768 + 1280 in the real model
T5_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789,.!?-'"
# SD3's VAE latent statistics (its vae/config.json).
SCALING_FACTOR, SHIFT_FACTOR = 1.5305, 0.0609


def build_t5_tokenizer(folder: Path):
    """A T5-style tokenizer (unigram, "</s>" appended, pad 0 / eos 1 / unk 2) saved in
    `folder` and read back with T5TokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + word, -2.0) for word in MERGED_WORDS]
    pieces += [("\u2581", -3.0)] + [(c, -5.0) for c in T5_CHARS]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581",
                                                       prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>",
              "unk_token": "<unk>", "model_max_length": 512, "extra_ids": 0,
              "additional_special_tokens": []}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return T5TokenizerFast.from_pretrained(str(folder))


def _clip(vocab: dict[str, int], hidden: int, activation: str):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=1000, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden,
        hidden_act=activation, layer_norm_eps=1e-5, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]))


def _t5(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
        dense_act_fn="gelu_new", is_gated_act=True, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0))


def _transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=NUM_LAYERS,
        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=T5_WIDTH,
        caption_projection_dim=32, pooled_projection_dim=CLIP_L_HIDDEN + CLIP_G_HIDDEN,
        pos_embed_max_size=32, qk_norm="rms_norm", dual_attention_layers=(0,))


def sixteen_channel_vae(scaling_factor: float = SCALING_FACTOR,
                        shift_factor: float = SHIFT_FACTOR):
    """The 16-channel VAE of SD3 and Flux (also Kandinsky 5's) at toy width, with the given
    latent statistics."""
    from diffusers import AutoencoderKL

    # Four blocks give the 8x downsampling of the real VAEs; no quant convs, as in theirs.
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1,
        block_out_channels=(16, 16, 16, 16), norm_num_groups=8, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=False,
        use_post_quant_conv=False, force_upcast=True)


def build_tiny_sd3(path: Path, seed: int = 0) -> Path:
    """Write a tiny random StableDiffusion3Pipeline folder at `path` (deterministic)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    path = Path(path)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_tokenizer(Path(scratch) / "tokenizer", "<|endoftext|>")
        tokenizer_2 = build_tokenizer(Path(scratch) / "tokenizer_2", "!")
        tokenizer_3 = build_t5_tokenizer(Path(scratch) / "tokenizer_3")
    vocab = tokenizer.get_vocab()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = _transformer()
        torch.manual_seed(seed + 1)
        vae = sixteen_channel_vae()
        torch.manual_seed(seed + 2)
        text_encoder = _clip(vocab, CLIP_L_HIDDEN, "quick_gelu")
        torch.manual_seed(seed + 3)
        text_encoder_2 = _clip(vocab, CLIP_G_HIDDEN, "gelu")
        torch.manual_seed(seed + 4)
        text_encoder_3 = _t5(len(tokenizer_3))
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    pipeline.save_pretrained(str(path), safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        write_vocab_files(path / name)
    return path


def ensure_tiny_sd3(folder: Path, seed: int = 0) -> Path:
    """Build the tiny model at `folder` unless a complete one is there (atomic rename)."""
    return ensure_model_folder(Path(folder), build_tiny_sd3, seed)
