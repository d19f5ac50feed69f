"""Shared test helpers: a minimal job config for the tiny SDXL, built in code, and checks."""

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


def assert_trained_state_round_trips(family: Any, batch: dict, timesteps: Any,
                                     load: Any) -> None:
    """`family`'s trained state, loaded into a fresh family (`load(lora=...)` builds one),
    gives the same eval loss where the fresh one's differs; a rank-8 LoRA refuses it."""
    import pytest
    import torch

    from job.errors import ConfigError

    noise = torch.randn(batch["latents"].shape)
    state = {k: v.detach().clone() for k, v in family.trainable_state_dict().items()}
    fresh = load(lora=family.cfg.lora.model_dump(exclude_unset=True))
    fresh.add_lora()
    with torch.no_grad():
        before = fresh.eval_loss(batch, timesteps, noise)
        fresh.load_trainable_state_dict(state)
        trained = family.eval_loss(batch, timesteps, noise)
        torch.testing.assert_close(fresh.eval_loss(batch, timesteps, noise), trained)
    assert not torch.allclose(before, trained)
    other = load(lora={"rank": 8})
    other.add_lora()
    with pytest.raises(ConfigError, match="do not fit"):
        other.load_trainable_state_dict(state)


def assert_exported_lora_acts_in_the_stock_pipeline(family: Any, out_dir: Path, ours: Any,
                                                    pipe: Any, stock_image: Any) -> None:
    """`family`'s LoRA (rank 4, alpha 8) saved to `out_dir`: diffusers' format with its
    alpha; loaded by the stock `pipe`, `stock_image(pipe)` changes and matches `ours()` (the
    family's own sample, run after the export) within 1 level; at half the weight (what a
    lost alpha gives) it does not."""
    import json

    import numpy as np
    from safetensors import safe_open

    [path] = family.save_final(out_dir)
    with safe_open(str(path), "pt") as handle:
        meta = json.loads(handle.metadata()["lora_adapter_metadata"])
        assert meta["transformer.lora_alpha"] == 8
        assert all(k.startswith("transformer.") for k in handle.keys())
    family.unload_encoders()
    own = np.asarray(ours()).astype(int)
    plain = stock_image(pipe)
    pipe.load_lora_weights(str(out_dir))
    with_lora = stock_image(pipe).astype(int)
    assert np.abs(with_lora - plain).max() > 2  # the LoRA acts
    assert np.abs(with_lora - own).max() <= 1
    pipe.set_adapters(pipe.get_active_adapters(), adapter_weights=[0.5])
    assert np.abs(stock_image(pipe).astype(int) - own).max() > 2


def assert_an_unsharded_copy_exports_in_place(family: Any, out_dir: Path,
                                              exported: Any) -> None:
    """What an fsdp2 run's export does (run.py, job/train/fsdp.py): a plain copy of the
    denoiser built from its config with the trained weights, saved by `family.save_final` in
    the live denoiser's place. `exported(out_dir)` loads the saved denoiser, which must hold
    the copy's weights, not the live module's; the live one is back afterwards."""
    import torch

    from job.train.fsdp import unsharded_copy

    live = family.denoiser()
    first = next(live.parameters())
    with torch.no_grad():
        first.add_(0.5)  # stands in for training
    weights = {k: v.detach().clone() for k, v in live.state_dict().items()}
    copy = unsharded_copy(live, weights)
    with torch.no_grad():
        first.add_(1.0)  # the live module moves on: what is saved must be the copy
    with family.swapped_denoiser(copy):
        assert family.denoiser() is copy
        family.save_final(out_dir)
    assert family.denoiser() is live
    saved = exported(out_dir).state_dict()
    assert saved.keys() == weights.keys()
    for key, value in weights.items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=0, msg=key)


def relative_error(value: Any, exact: Any) -> float:
    """||value - exact|| / ||exact||, in fp32."""
    return ((value.float() - exact.float()).norm() / exact.float().norm()).item()
