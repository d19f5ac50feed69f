"""A tiny random SDXL in the hub's folder layout, built locally from the real classes.

The `tiny` flavour and the tests load it through the same `from_pretrained` path that
real weights take, so nothing here is special-cased downstream. The tokenizers are real
byte-level BPE CLIP tokenizers over a small vocabulary written here (no download).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from job.atomic import temp_name

MAX_LENGTH = 77
HIDDEN = 32
PROJECTION = 32
TIME_EMBED = 8
# Words that become single tokens through merges, so tokenization is not all single bytes.
MERGED_WORDS = ("a", "photo", "of", "the", "red", "blue", "green", "yellow", "black", "white",
                "circle", "square", "on", "background", "cat", "dog", "shape")


def byte_unicode_table() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            # Unprintable bytes are shifted past 255 so every token stays visible text.
            table[byte] = chr(256 + extra)
            extra += 1
    # CLIP's vocabulary lists the printable bytes first, then the shifted ones.
    return dict(sorted(table.items(), key=lambda kv: (kv[0] not in printable, kv[0])))


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """A CLIP-style vocabulary: bytes, bytes + '</w>', merged words, then the two specials."""
    chars = list(byte_unicode_table().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in MERGED_WORDS:
        # Merge left to right: "r e", "re d</w>"; each result is a vocabulary entry.
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        left = parts[0]
        for right in parts[1:]:
            merge = f"{left} {right}"
            if merge not in merges:
                merges.append(merge)
                tokens.append(left + right)
            left = left + right
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}, merges


def write_vocab_files(folder: Path) -> None:
    """vocab.json + merges.txt, the files a CLIP tokenizer folder on the hub holds."""
    vocab, merges = clip_vocab_and_merges()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n",
                                       encoding="utf-8")


def build_tokenizer(folder: Path, pad_token: str):
    """A CLIPTokenizer read back from the vocabulary files written into `folder`."""
    from transformers import CLIPTokenizer

    write_vocab_files(folder)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_LENGTH,
                                         pad_token=pad_token)


def _text_config(vocab: dict[str, int], activation: str):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=1000, hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, projection_dim=PROJECTION,
        hidden_act=activation, layer_norm_eps=1e-5,
        # The pooled output is read at the first eos position, so the ids must be the real ones.
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"])


def _unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        # SDXL's extra conditioning: 6 micro-conditioning ids and text_encoder_2's pooled output.
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=TIME_EMBED * 6 + PROJECTION,
        cross_attention_dim=HIDDEN + HIDDEN)


def _vae():
    from diffusers import AutoencoderKL

    # Four blocks give SDXL's 8x downsampling, so pixel/latent sizes relate as in the real
    # model; 16 channels keep it small.
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(16, 16, 16, 16), norm_num_groups=8, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.13025, force_upcast=True)


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", prediction_type="epsilon",
        timestep_spacing="leading", steps_offset=1, interpolation_type="linear",
        use_karras_sigmas=False)


def build_tiny_sdxl(path: Path, seed: int = 0) -> Path:
    """Write a tiny random SDXL pipeline folder at `path` (deterministic given seed)."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_tokenizer(Path(scratch) / "tokenizer", "<|endoftext|>")
        # SDXL's second tokenizer pads with "!" instead of the end token; mirrored here.
        tokenizer_2 = build_tokenizer(Path(scratch) / "tokenizer_2", "!")
    vocab = tokenizer.get_vocab()
    # fork_rng: the caller's global RNG is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _unet()
        torch.manual_seed(seed + 1)
        vae = _vae()
        torch.manual_seed(seed + 2)
        # Like SDXL: quick_gelu in the OpenAI CLIP encoder, gelu in the OpenCLIP bigG one.
        text_encoder = CLIPTextModel(_text_config(vocab, "quick_gelu"))
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(vocab, "gelu"))
    pipeline = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipeline.save_pretrained(str(path), safe_serialization=True)
    # transformers 5 saves tokenizer.json only; the vocabulary files keep the folders
    # readable by transformers 4's slow CLIPTokenizer, as the hub's SDXL folders are.
    for name in ("tokenizer", "tokenizer_2"):
        write_vocab_files(path / name)
    return path


def ensure_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    """Build the tiny model at `folder` unless a complete one is there (atomic rename)."""
    return ensure_model_folder(Path(folder), build_tiny_sdxl, seed)


def ensure_model_folder(folder: Path, build, seed: int = 0) -> Path:
    """`build(scratch, seed)` a pipeline folder and rename it to `folder`, unless a complete
    one (with model_index.json) is there already."""
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = temp_name(folder)
    build(scratch, seed)
    try:
        os.rename(scratch, folder)
    except OSError:
        # Another process finished first (rename onto a non-empty folder fails): use its copy.
        shutil.rmtree(scratch, ignore_errors=True)
        if not (folder / "model_index.json").is_file():
            raise
    return folder
