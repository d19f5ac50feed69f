"""Rectified-flow math of SD3 (Esser et al. 2024, arXiv 2403.03206): sigma sampling,
static and resolution-dependent shift, the noisy input, the target and loss weights.

Plain functions of tensors, so the tests can hold each against diffusers'
FlowMatchEulerDiscreteScheduler and the pipeline's calculate_shift.
"""

from __future__ import annotations

import math

import torch

NUM_TRAIN_TIMESTEPS = 1000


def sample_sigmas(batch_size: int, generator: torch.Generator, uniform: bool,
                  logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """Unshifted sigmas [B] in (0, 1): logit-normal (the paper's default) or uniform; drawn
    for the global batch and sliced per rank (job/train/distributed.py)."""
    from job.train import distributed

    if uniform:
        return distributed.rand(batch_size, generator)
    normal = distributed.randn((batch_size,), generator)
    return torch.sigmoid(normal * logit_std + logit_mean)


def static_shift(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """s*sigma / (1 + (s-1)*sigma): more time at high noise for s > 1, identity at s = 1."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def image_seq_len(latent_height: int, latent_width: int, patch_size: int) -> int:
    """Image tokens the transformer sees: (H/16)(W/16) in pixels for SD3's 8x VAE and 2x2 patches."""
    return (latent_height // patch_size) * (latent_width // patch_size)


def dynamic_shift_mu(seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float,
                     max_shift: float) -> float:
    """mu, linear in the image sequence length between (base_seq_len, base_shift) and
    (max_seq_len, max_shift); the same line as the SD3 pipeline's calculate_shift."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (seq_len - base_seq_len)


def dynamic_shift(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """e^mu / (e^mu + 1/sigma - 1): the exponential time shift, i.e. a static shift of e^mu."""
    # Written as the static shift with s = e^mu: algebraically the same and, unlike 1/sigma,
    # finite at sigma = 0.
    return static_shift(sigmas, math.exp(mu))


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) x0 + sigma * noise (sigma broadcast per sample)."""
    s = _per_sample(sigmas, latents)
    return (1 - s) * latents + s * noise


def flow_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity d x_sigma / d sigma = noise - x0 that the transformer predicts."""
    return noise - latents


def timesteps_of(sigmas: torch.Tensor) -> torch.Tensor:
    """The transformer's timestep input: sigma * 1000 (float), as the scheduler feeds it."""
    return sigmas * NUM_TRAIN_TIMESTEPS


def loss_weights(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights [B]: none (1), sigma_sqrt (sigma^-2) or cosmap
    (2 / (pi (1 - 2 sigma + 2 sigma^2))), the SD3 paper's weightings as diffusers names them."""
    if scheme == "none":
        return torch.ones_like(sigmas)
    if scheme == "sigma_sqrt":
        # Clamped: sigma^-2 is unbounded near the clean end and one sample would own the batch.
        return sigmas.clamp(min=1e-3) ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    raise ValueError(f"unknown loss weighting {scheme!r}; expected none, sigma_sqrt or cosmap")


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, like.dtype).view(-1, *([1] * (like.ndim - 1)))
