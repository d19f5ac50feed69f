"""Shared pieces of the Stage C tests: tiny prior and decoder folders, configs, batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from helpers import tiny_job_config
from job.models.stable_cascade import StableCascadeFamily
from job.models.stable_cascade_tiny import ensure_tiny_decoder, ensure_tiny_prior

CAPTIONS = ["a photo of the red circle", "a yellow square on a black background, " * 12]


def small_prior(width: int, conditioning_dim: int, clip_dim: int,
                dropout: float) -> torch.nn.Module:
    """A StableCascadeUNet built in code with the release's block types (one of each per
    level, two levels, two heads: head dim width / 2), seeded; its other sizes given."""
    from diffusers import StableCascadeUNet

    torch.manual_seed(0)
    return StableCascadeUNet(
        in_channels=16, out_channels=16, conditioning_dim=conditioning_dim,
        block_out_channels=(width, width), num_attention_heads=(2, 2),
        down_num_layers_per_block=(1, 1), up_num_layers_per_block=(1, 1), switch_level=(False,),
        clip_text_in_channels=clip_dim, clip_text_pooled_in_channels=clip_dim,
        clip_image_in_channels=clip_dim, clip_seq=4, dropout=(dropout, dropout))


def prior_folder(models_dir: Path) -> Path:
    """Where the `tiny` flavour builds (and finds) its prior under hub_cache_dir."""
    return ensure_tiny_prior(models_dir / "tunejob-tiny" / "stable_cascade")


def decoder_folder(models_dir: Path) -> Path:
    """The tiny decoder (released layout, effnet file at its root) the tiny flavour uses."""
    return ensure_tiny_decoder(models_dir / "tunejob-tiny" / "stable_cascade_decoder")


def stage_c_config(tmp_path: Path, models_dir: Path, **overrides: Any):
    """tiny_job_config for family stable_cascade, flavour tiny, weights under models_dir."""
    model = {"family": "stable_cascade", "flavour": "tiny", "hub_cache_dir": str(models_dir),
             **overrides.pop("model", {})}
    return tiny_job_config(tmp_path, model=model, **overrides)


def load_family(tmp_path: Path, models_dir: Path, dtype: torch.dtype = torch.float32,
                **overrides: Any) -> StableCascadeFamily:
    family = StableCascadeFamily(stage_c_config(tmp_path, models_dir, **overrides),
                                 torch.device("cpu"), dtype)
    family.load()
    return family


def make_batch(family: StableCascadeFamily, count: int = 2, size: int = 64,
               seed: int = 3) -> dict[str, torch.Tensor]:
    """A batch as job/data/batches.py builds it from the caches."""
    pixels = torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    texts = family.encode_text([CAPTIONS[i % len(CAPTIONS)] for i in range(count)])
    return {"latents": family.encode_images(pixels),
            "text.prompt_embeds": torch.stack([t["prompt_embeds"] for t in texts]),
            "text.prompt_embeds_pooled": torch.stack([t["prompt_embeds_pooled"] for t in texts])}
