"""Stage C's forward process and loss weights against DDPMWuerstchenScheduler."""

from __future__ import annotations

import torch
from diffusers import DDPMWuerstchenScheduler

from job.models import stable_cascade_diffusion as diffusion
from job.train import distributed


def test_alpha_bar_equals_the_wuerstchen_scheduler_at_the_same_times() -> None:
    scheduler = DDPMWuerstchenScheduler()
    t = torch.cat([torch.linspace(0, 1, 101), torch.tensor([1e-6, 0.999999])])
    torch.testing.assert_close(diffusion.alpha_bar(t), scheduler._alpha_cumprod(t, "cpu"))
    ends = diffusion.alpha_bar(torch.tensor([0.0, 1.0]))  # clamped at both ends
    torch.testing.assert_close(ends, torch.tensor([0.9999, 1e-4]))


def test_noisy_latents_equal_the_schedulers_add_noise() -> None:
    scheduler = DDPMWuerstchenScheduler()
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(5, 16, 24, 24, generator=generator)
    noise = torch.randn(5, 16, 24, 24, generator=generator)
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    torch.testing.assert_close(diffusion.noisy_latents(latents, noise, t),
                               scheduler.add_noise(latents, noise, t))


def test_p2_weight_is_one_over_one_plus_snr() -> None:
    t = torch.linspace(0, 1, 11)
    snr = diffusion.log_snr(t).exp()
    torch.testing.assert_close(diffusion.p2_weight(t), 1 / (1 + snr))
    assert (diffusion.p2_weight(t)[1:] > diffusion.p2_weight(t)[:-1]).all()


def test_adaptive_weight_learns_inverse_loss_per_noise_level_and_round_trips() -> None:
    weight = diffusion.AdaptiveLossWeight()
    t = torch.tensor([0.1, 0.9])
    torch.testing.assert_close(weight.weight(t), torch.ones(2))
    for _ in range(2000):
        weight.update(t, torch.tensor([4.0, 0.25]))
    torch.testing.assert_close(weight.weight(t), torch.tensor([0.25, 4.0]), rtol=1e-3, atol=0)
    weight.update(t, torch.tensor([float("nan"), 0.25]))  # a non-finite loss is not folded in
    assert torch.isfinite(weight.bucket_losses).all()
    restored = diffusion.AdaptiveLossWeight()
    restored.load_state_dict(weight.state_dict())
    torch.testing.assert_close(restored.weight(t), weight.weight(t))


def test_training_draws_equal_one_process_whatever_the_world_size() -> None:
    """t and noise are drawn for the global batch and sliced per rank."""
    one = torch.Generator().manual_seed(5)
    full_t, full_noise = distributed.rand(4, one), distributed.randn((4, 16, 2, 2), one)
    parts = []
    for rank in range(2):
        distributed.set_topology(distributed.Topology(rank, 2))
        try:
            generator = torch.Generator().manual_seed(5)
            parts.append((distributed.rand(2, generator), distributed.randn((2, 16, 2, 2), generator)))
        finally:
            distributed.set_topology(distributed.Topology())
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), full_t)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), full_noise)
