"""Write a full-size random-init SDXL pipeline folder (SDXL base 1.0's UNet and VAE shapes,
CLIP-L / bigG-shaped text encoders over the tiny tokenizers' vocabulary), for benchmarks of
the whole job on a GPU machine without the hub.

    python bench/build_random_sdxl.py FOLDER
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from job.models.sdxl_tiny import _scheduler, build_tokenizer, write_vocab_files  # noqa: E402
from bench.lcm_step import SDXL_UNET  # noqa: E402


def text_config(vocab: dict, hidden: int, layers: int, heads: int, act: str, proj: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(vocab) + 10, hidden_size=hidden,
                          intermediate_size=hidden * 4, num_hidden_layers=layers,
                          num_attention_heads=heads, max_position_embeddings=77,
                          hidden_act=act, projection_dim=proj,
                          bos_token_id=vocab["<|startoftext|>"],
                          eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])


def main(folder: Path) -> None:
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_tokenizer(Path(scratch) / "t1", "<|endoftext|>")
        tokenizer_2 = build_tokenizer(Path(scratch) / "t2", "!")
    vocab = tokenizer.get_vocab()
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        unet = UNet2DConditionModel(**SDXL_UNET).to(torch.bfloat16)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512), sample_size=1024,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            scaling_factor=0.13025, force_upcast=True)
        te1 = CLIPTextModel(text_config(vocab, 768, 12, 12, "quick_gelu", 768)).to(torch.bfloat16)
        te2 = CLIPTextModelWithProjection(
            text_config(vocab, 1280, 32, 20, "gelu", 1280)).to(torch.bfloat16)
    pipeline = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipeline.save_pretrained(str(folder), safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        write_vocab_files(folder / name)
    print("wrote", folder)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
