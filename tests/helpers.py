"""Shared test helpers: a minimal job config for the tiny SDXL, built in code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from job.config import JobConfig


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base`: tables (dicts) merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def tiny_job_config(tmp_path: Path, **overrides: Any) -> JobConfig:
    """A minimal JobConfig for family sdxl, flavour tiny, with every folder under tmp_path.

    Overrides are per table and merge into it, e.g.
    `tiny_job_config(tmp_path, lora={"rank": 4, "alpha": 8.0}, train={"snr_gamma": 5.0})`;
    a list (`datasets=[...]`) replaces the default. CPU, fp32 ("no" mixed precision) and
    small sizes, so results are exact and fast.
    """
    base = {
        "job": {"name": "tiny", "output_dir": str(tmp_path / "output"), "device": "cpu"},
        "model": {"family": "sdxl", "flavour": "tiny",
                  "hub_cache_dir": str(tmp_path / "models")},
        "train": {"max_train_steps": 4, "batch_size": 2, "mixed_precision": "no", "seed": 0,
                  "log_every": 1},
        "datasets": [{"id": "tiny", "instance_data_dir": str(tmp_path / "data"),
                      "synthetic_images": 4, "caption_strategy": "textfile", "resolution": 64,
                      "crop": True, "aspect_bucket_alignment": 32}],
        "cache": {"dir": str(tmp_path / "cache")},
        "validation": {"resolution": "64x64", "num_inference_steps": 2},
        "checkpoint": {"step_interval": 2},
    }
    return JobConfig.model_validate(_merge(base, overrides))


def fit_fixed_batch(family: Any, module: Any, batch: dict, steps: int, lr: float) -> list[float]:
    """`steps` AdamW steps of `family`'s training loss on one batch and noise (the
    trainable parameters of `module`); returns the losses."""
    import torch

    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = family.training_loss(batch, torch.Generator().manual_seed(0)).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses
