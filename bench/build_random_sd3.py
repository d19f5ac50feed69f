"""Write an SD3.5 Medium- (or Large-) shaped random-init pipeline folder for whole-job
benchmarks on a GPU machine without the hub: the full-size transformer (its
transformer/config.json dims) and an
SD3-shaped 16-channel VAE; the text encoders keep their output widths (CLIP-L 768, CLIP-G
1280, T5 4096) but only 2 layers each, since training reads their outputs from the cache.

    python bench/build_random_sd3.py FOLDER [medium|large]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sd3_step import SD35_LARGE, SD35_MEDIUM  # noqa: E402
from job.models.sd3_tiny import (SCALING_FACTOR, SHIFT_FACTOR,  # noqa: E402
                                 build_t5_tokenizer)
from job.models.sdxl_tiny import build_tokenizer, write_vocab_files  # noqa: E402


def main(folder: Path, model: str = "medium") -> None:
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, T5Config,
                              T5EncoderModel)

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_tokenizer(Path(scratch) / "t1", "<|endoftext|>")
        tokenizer_2 = build_tokenizer(Path(scratch) / "t2", "!")
        tokenizer_3 = build_t5_tokenizer(Path(scratch) / "t3")
    vocab = tokenizer.get_vocab()

    def clip(hidden: int, act: str) -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(vocab) + 10, hidden_size=hidden, intermediate_size=4 * hidden,
            num_hidden_layers=2, num_attention_heads=hidden // 64, max_position_embeddings=77,
            projection_dim=hidden, hidden_act=act, bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]))

    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        dims = {"medium": SD35_MEDIUM, "large": SD35_LARGE}[model]
        transformer = SD3Transformer2DModel(**dims).to(torch.bfloat16)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512), sample_size=1024,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=SCALING_FACTOR,
            shift_factor=SHIFT_FACTOR, use_quant_conv=False, use_post_quant_conv=False,
            force_upcast=True)
        te1, te2 = clip(768, "quick_gelu"), clip(1280, "gelu")
        te3 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_3), d_model=4096, d_kv=64, d_ff=1024, num_layers=2,
            num_heads=64, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
            is_gated_act=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=te1, tokenizer=tokenizer, text_encoder_2=te2, tokenizer_2=tokenizer_2,
        text_encoder_3=te3, tokenizer_3=tokenizer_3)
    pipeline.save_pretrained(str(folder), safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        write_vocab_files(folder / name)
    print("wrote", folder)


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:3])
