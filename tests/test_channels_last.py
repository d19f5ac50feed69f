"""[speedups] channels_last: the convolutional denoisers (SDXL's UNet, the Stage C prior)
converted to channels_last give the same loss and LoRA gradients; other families say the
setting is ignored."""

from __future__ import annotations

from pathlib import Path

import torch

import stage_c_helpers
import test_sdxl_family
from helpers import tiny_job_config
from job.config import check_rules
from job.speedups import apply_speedups
from test_sdxl_family import models_dir  # noqa: F401 (fixture)


def loss_and_grads(family, batch) -> tuple[torch.Tensor, dict]:
    denoiser = family.denoiser()
    timesteps = torch.tensor([10, 700])
    noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(0))
    loss = family.eval_loss(batch, timesteps, noise).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in denoiser.named_parameters() if p.grad is not None}
    denoiser.zero_grad(set_to_none=True)
    return loss.detach(), grads


def check_same(load, make_batch) -> None:
    """The same LoRA on a plain and on a channels_last denoiser: same loss and gradients."""
    plain = load(speedups={"channels_last": False})
    plain.add_lora()
    batch = make_batch(plain)
    expected_loss, expected = loss_and_grads(plain, batch)
    converted = load(speedups={"channels_last": True})
    apply_speedups(converted.cfg, converted)
    convs = [p for p in converted.denoiser().parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    converted.add_lora()
    converted.load_trainable_state_dict(
        {k: v.detach().clone() for k, v in plain.trainable_state_dict().items()})
    loss, grads = loss_and_grads(converted, batch)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-4, atol=1e-6)


def test_sdxl_unet_in_channels_last_gives_the_same_loss_and_gradients(
        tmp_path: Path, models_dir: Path) -> None:  # noqa: F811 (fixture)
    check_same(lambda **o: test_sdxl_family.load_family(tmp_path, models_dir, **o),
               lambda family: test_sdxl_family.make_batch(family, test_sdxl_family.SIZES))


def test_stage_c_prior_in_channels_last_gives_the_same_loss_and_gradients(
        tmp_path: Path) -> None:
    models = tmp_path / "models"
    stage_c_helpers.prior_folder(models)
    stage_c_helpers.decoder_folder(models)
    check_same(lambda **o: stage_c_helpers.load_family(tmp_path, models, **o),
               stage_c_helpers.make_batch)


def test_channels_last_on_a_transformer_family_is_ignored_with_a_note(tmp_path: Path) -> None:
    notes = check_rules(tiny_job_config(tmp_path, model={"family": "sd3", "flavour": "tiny"},
                                        speedups={"channels_last": True}))
    assert any("channels_last is ignored" in n for n in notes)
