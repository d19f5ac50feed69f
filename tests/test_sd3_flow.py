"""SD3's flow-matching math against diffusers' scheduler and pipeline, and in the family."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

from job.models import sd3_flow as flow
from sd3_helpers import load_family, make_batch, record_transformer_inputs, tiny_folder

GRID = torch.linspace(1.0, 0.001, 1000)  # the scheduler's training sigmas, before shifting


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    tiny_folder(folder)
    return folder


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_static_shift_matches_the_scheduler(shift: float) -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    torch.testing.assert_close(flow.static_shift(GRID, shift), scheduler.sigmas, atol=1e-6, rtol=0)
    # Sigmas given to set_timesteps go through the same static shift.
    unshifted = torch.linspace(1.0, 0.02, 20)
    scheduler.set_timesteps(sigmas=unshifted.tolist())
    torch.testing.assert_close(flow.static_shift(unshifted, shift), scheduler.sigmas[:-1],
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [(64, 64), (128, 96), (32, 32)])
def test_dynamic_shift_matches_the_scheduler_at_the_same_seq_len(size: tuple[int, int]) -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    seq_len = flow.image_seq_len(*size, patch_size=2)  # 1024x1024 px -> 128x128 latents -> 4096
    c = scheduler.config
    mu = flow.dynamic_shift_mu(seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift,
                               c.max_shift)
    assert mu == pytest.approx(calculate_shift(seq_len, 256, 4096, 0.5, 1.15), abs=1e-12)
    sigmas = torch.linspace(1.0, 0.02, 25)
    scheduler.set_timesteps(sigmas=sigmas.tolist(), mu=mu)
    torch.testing.assert_close(flow.dynamic_shift(sigmas, mu), scheduler.sigmas[:-1],
                               atol=1e-6, rtol=0)
    # The form: e^mu / (e^mu + 1/sigma - 1).
    expected = math.exp(mu) / (math.exp(mu) + 1 / sigmas - 1)
    torch.testing.assert_close(flow.dynamic_shift(sigmas, mu), expected, atol=1e-6, rtol=0)


def test_noisy_latents_match_scale_noise_and_the_target_is_the_velocity() -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 16, 4, 4, generator=g), torch.randn(3, 16, 4, 4, generator=g)
    timesteps = scheduler.timesteps[torch.tensor([10, 500, 990])]
    sigmas = timesteps / 1000
    torch.testing.assert_close(flow.noisy_latents(x0, noise, sigmas),
                               scheduler.scale_noise(x0, timesteps, noise))
    torch.testing.assert_close(flow.timesteps_of(sigmas), timesteps)
    # d/dsigma of (1 - sigma) x0 + sigma noise.
    eps = 1e-3
    finite = (flow.noisy_latents(x0, noise, sigmas + eps) - flow.noisy_latents(x0, noise, sigmas)) / eps
    torch.testing.assert_close(flow.flow_target(x0, noise), finite, atol=1e-3, rtol=1e-3)


def test_sigma_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    logit = flow.sample_sigmas(20000, g, uniform=False)
    uniform = flow.sample_sigmas(20000, g, uniform=True)
    assert 0 < logit.min() and logit.max() < 1
    # Logit-normal(0, 1) piles up in the middle; uniform fills the ends.
    assert abs(float(logit.median()) - 0.5) < 0.02 and float(logit.std()) < 0.22
    assert abs(float(uniform.mean()) - 0.5) < 0.01 and float(uniform.std()) > 0.28
    shifted = flow.sample_sigmas(20000, g, uniform=False, logit_mean=1.0)
    assert float(shifted.median()) == pytest.approx(1 / (1 + math.exp(-1)), abs=0.02)


def test_loss_weightings() -> None:
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(flow.loss_weights("none", sigmas), torch.ones(3))
    torch.testing.assert_close(flow.loss_weights("sigma_sqrt", sigmas), sigmas**-2)
    torch.testing.assert_close(flow.loss_weights("cosmap", sigmas),
                               2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2)))
    with pytest.raises(ValueError):
        flow.loss_weights("snr", sigmas)


def zero_velocity(family) -> list[dict]:
    """The transformer predicts zeros, so each loss is its target's mean square."""
    seen = record_transformer_inputs(family)
    family.transformer.register_forward_hook(
        lambda module, args, kwargs, output: (torch.zeros_like(output[0]),), with_kwargs=True)
    return seen


@pytest.mark.parametrize("sd3", [
    {}, {"flow_use_uniform_schedule": True, "flow_schedule_shift": 1.0},
    {"flow_schedule_auto_shift": True, "logit_mean": 0.5, "logit_std": 0.7}],
    ids=["logit-normal-shift-3", "uniform-shift-1", "auto-shift"])
def test_family_loss_uses_the_configured_sigmas(tmp_path: Path, models_dir: Path,
                                                sd3: dict) -> None:
    family = load_family(tmp_path, models_dir, sd3=sd3)
    seen = zero_velocity(family)
    batch = make_batch(family, count=4)
    losses = family.training_loss(batch, torch.Generator().manual_seed(7))
    # The same draws, in the documented order: sigmas, then noise.
    g = torch.Generator().manual_seed(7)
    s = family.settings
    raw = flow.sample_sigmas(4, g, s.flow_use_uniform_schedule, s.logit_mean, s.logit_std)
    noise = torch.randn(batch["latents"].shape, generator=g)
    if s.flow_schedule_auto_shift:
        c = family.scheduler.config
        mu = calculate_shift(16, c.base_image_seq_len, c.max_image_seq_len, c.base_shift,
                             c.max_shift)  # 64 px -> 8x8 latents -> 4x4 patches
        sigmas = math.exp(mu) / (math.exp(mu) + 1 / raw - 1)
    else:
        shift = s.flow_schedule_shift
        sigmas = shift * raw / (1 + (shift - 1) * raw)
    torch.testing.assert_close(seen[0]["timestep"], sigmas * 1000)
    sigma = sigmas.view(-1, 1, 1, 1)
    torch.testing.assert_close(seen[0]["hidden_states"],
                               (1 - sigma) * batch["latents"] + sigma * noise)
    torch.testing.assert_close(losses, (noise - batch["latents"]).pow(2).mean(dim=(1, 2, 3)))


def test_auto_shift_depends_on_the_image_size(tmp_path: Path, models_dir: Path) -> None:
    family = load_family(tmp_path, models_dir, sd3={"flow_schedule_auto_shift": True})
    small = family.training_sigmas(4, (8, 8), torch.Generator().manual_seed(0))
    large = family.training_sigmas(4, (128, 128), torch.Generator().manual_seed(0))
    assert (large > small).all()  # more tokens: more time at high noise
    c = family.scheduler.config
    assert family.auto_shift_mu(128, 128) == pytest.approx(c.max_shift)  # 4096 tokens


def test_loss_weighting_scales_each_sample(tmp_path: Path, models_dir: Path) -> None:
    losses, seen = {}, []
    for scheme in ("none", "cosmap"):
        family = load_family(tmp_path, models_dir, sd3={"loss_weighting": scheme})
        seen.append(record_transformer_inputs(family))
        losses[scheme] = family.training_loss(make_batch(family, count=4),
                                              torch.Generator().manual_seed(1))
    sigmas = seen[0][0]["timestep"] / 1000
    torch.testing.assert_close(losses["cosmap"] / losses["none"],
                               flow.loss_weights("cosmap", sigmas))


def test_eval_loss_is_unshifted_at_fixed_timesteps(tmp_path: Path, models_dir: Path) -> None:
    family = load_family(tmp_path, models_dir)
    seen = zero_velocity(family)
    batch = make_batch(family)
    noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(2))
    losses = family.eval_loss(batch, torch.tensor([100, 900]), noise)
    torch.testing.assert_close(seen[0]["timestep"], torch.tensor([100.0, 900.0]))
    torch.testing.assert_close(losses, (noise - batch["latents"]).pow(2).mean(dim=(1, 2, 3)))
