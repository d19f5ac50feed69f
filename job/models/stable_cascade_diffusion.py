"""Stage C's diffusion math, as the Stable Cascade release trains it.

A cosine schedule in continuous time t in [0, 1] (s = 0.008, alpha-bar clamped to
[1e-4, 0.9999]); x_t = sqrt(ab) x0 + sqrt(1 - ab) eps; the prior gets t as its
timestep_ratio and predicts eps. Loss weights: P2, 1 / (1 + SNR), or the release's
adaptive weight (per log-SNR bucket, the inverse of a running mean of the loss there).

Plain functions and one small stateful class, so the tests can hold them against
DDPMWuerstchenScheduler.
"""

from __future__ import annotations

import math

import torch

COSINE_S = 0.008
ALPHA_BAR_RANGE = (1e-4, 0.9999)


def alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """cos((t+s)/(1+s) pi/2)^2 / cos(s/(1+s) pi/2)^2, clamped (fp32)."""
    t = t.float()
    start = math.cos(COSINE_S / (1 + COSINE_S) * math.pi / 2) ** 2
    value = torch.cos((t + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2 / start
    return value.clamp(*ALPHA_BAR_RANGE)


def log_snr(t: torch.Tensor) -> torch.Tensor:
    """log(ab / (1 - ab)) of the clamped schedule."""
    ab = alpha_bar(t)
    return torch.log(ab / (1 - ab))


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """sqrt(ab) x0 + sqrt(1 - ab) eps, per sample."""
    ab = alpha_bar(t).to(latents.device).view(-1, *([1] * (latents.ndim - 1)))
    return ab.sqrt() * latents + (1 - ab).sqrt() * noise


def p2_weight(t: torch.Tensor) -> torch.Tensor:
    """1 / (1 + SNR) = 1 - ab: the release's P2 weight with k = gamma = 1."""
    return 1 - alpha_bar(t)


class AdaptiveLossWeight:
    """Per log-SNR bucket, 1 / (a running mean of the loss seen there), clamped.

    The Stable Cascade release's default weight: it flattens the loss over noise levels as
    training goes. Its state (the running means) lives in checkpoints, so a resumed run
    weights its losses as the uninterrupted one would.
    """

    def __init__(self, buckets: int = 300, log_snr_range: tuple[float, float] = (-10.0, 10.0),
                 weight_range: tuple[float, float] = (1e-7, 1e7), beta: float = 0.99) -> None:
        self.edges = torch.linspace(*log_snr_range, buckets - 1)
        self.bucket_losses = torch.ones(buckets, dtype=torch.float64)
        self.weight_range, self.beta = weight_range, beta

    def _bucket(self, t: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(self.edges, log_snr(t).cpu().contiguous())

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """Loss weight per sample [B] (fp32, CPU)."""
        return (1 / self.bucket_losses[self._bucket(t)]).clamp(*self.weight_range).float()

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Fold per-sample unweighted losses at times t into their buckets (in sample
        order, so a batch with two samples in a bucket updates it twice)."""
        for index, loss in zip(self._bucket(t).tolist(), losses.detach().double().cpu().tolist()):
            if math.isfinite(loss):
                old = self.bucket_losses[index]
                self.bucket_losses[index] = old * self.beta + loss * (1 - self.beta)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"adaptive_loss_weight.bucket_losses": self.bucket_losses.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        saved = state["adaptive_loss_weight.bucket_losses"]
        if saved.shape != self.bucket_losses.shape:
            raise ValueError(f"adaptive loss weight state has {saved.numel()} buckets, "
                             f"expected {self.bucket_losses.numel()}")
        self.bucket_losses = saved.detach().to("cpu", torch.float64).clone()
