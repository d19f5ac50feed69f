"""Shared pieces of the SD3 tests: the tiny model's folder, configs and batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline

from helpers import tiny_job_config
from job.models.sd3 import SD3Family
from job.models.sd3_tiny import ensure_tiny_sd3

CAPTIONS = ["a photo of the red circle", "a yellow square on a black background, " * 12]


def tiny_folder(models_dir: Path) -> Path:
    """Where the `tiny` flavour builds (and finds) its weights under hub_cache_dir."""
    return ensure_tiny_sd3(models_dir / "tunejob-tiny" / "sd3")


def sd3_config(tmp_path: Path, models_dir: Path, **overrides: Any):
    """tiny_job_config for family sd3, flavour tiny, weights under models_dir."""
    model = {"family": "sd3", "flavour": "tiny", "hub_cache_dir": str(models_dir),
             **overrides.pop("model", {})}
    return tiny_job_config(tmp_path, model=model, **overrides)


def load_family(tmp_path: Path, models_dir: Path, dtype: torch.dtype = torch.float32,
                **overrides: Any) -> SD3Family:
    family = SD3Family(sd3_config(tmp_path, models_dir, **overrides), torch.device("cpu"), dtype)
    family.load()
    return family


def stock_pipeline(folder: Path) -> StableDiffusion3Pipeline:
    pipeline = StableDiffusion3Pipeline.from_pretrained(str(folder))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def make_batch(family: SD3Family, count: int = 2, size: int = 64,
               seed: int = 3) -> dict[str, torch.Tensor]:
    """A batch as job/data/batches.py builds it from the caches."""
    pixels = torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    texts = family.encode_text([CAPTIONS[i % len(CAPTIONS)] for i in range(count)])
    return {"latents": family.encode_images(pixels),
            "text.prompt_embeds": torch.stack([t["prompt_embeds"] for t in texts]),
            "text.pooled_prompt_embeds": torch.stack([t["pooled_prompt_embeds"] for t in texts])}


def record_transformer_inputs(family: SD3Family) -> list[dict[str, torch.Tensor]]:
    """Every transformer call's keyword inputs, appended as the calls happen."""
    seen: list[dict[str, torch.Tensor]] = []
    family.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(dict(kwargs)), with_kwargs=True)
    return seen
