"""On a CUDA GPU (marked `gpu`; `python -m pytest -m gpu tests/test_gpu_flex_attention.py` on
the GPU machine): a Stage C prior (the released block types, head dim 64, 24x24 latents:
576 image tokens) compiled by regional compile with `apply_flex_fp32_attention` and TF32 allowed
runs its fp32 attention through flex_attention, and its output and gradients stay within
TF32's rounding of fp32 (the same prior with SDPA and TF32 off), with and without the
recompute inside the compiled blocks; under bf16 autocast the processor's result is SDPA's."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import StableCascadeUNet

from job.speedups.attention import FlexFp32AttnProcessor, apply_flex_fp32_attention
from job.speedups.compile import apply_regional_compile

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def relative_error(value, exact) -> float:
    return ((value.float() - exact.float()).norm() / exact.float().norm()).item()


def make_prior() -> StableCascadeUNet:
    torch.manual_seed(0)
    return StableCascadeUNet(
        in_channels=16, out_channels=16, conditioning_dim=64, block_out_channels=(128, 128),
        num_attention_heads=(2, 2), down_num_layers_per_block=(1, 1),
        up_num_layers_per_block=(1, 1), switch_level=(False,), clip_text_in_channels=32,
        clip_text_pooled_in_channels=32, clip_image_in_channels=32, clip_seq=4,
        dropout=(0.0, 0.0)).cuda()


def inputs(batch: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(1)
    return {"sample": torch.randn(batch, 16, 24, 24, device="cuda", generator=g),
            "timestep_ratio": torch.rand(batch, device="cuda", generator=g),
            "clip_text_pooled": torch.randn(batch, 1, 32, device="cuda", generator=g),
            "clip_text": torch.randn(batch, 77, 32, device="cuda", generator=g),
            "clip_img": torch.randn(batch, 1, 32, device="cuda", generator=g)}


def run(prior, batch: dict):
    sample = batch["sample"].clone().requires_grad_(True)
    out = prior(**{**batch, "sample": sample}).sample
    out.square().mean().backward()
    return out.detach(), sample.grad, [p.grad for p in prior.parameters()]


@pytest.mark.parametrize("recompute_inside", [0.0, 1.0])
def test_fp32_attention_through_flex_within_tf32_rounding(recompute_inside: float) -> None:
    exact_prior = make_prior()
    prior = copy.deepcopy(exact_prior)
    batch = inputs(4)
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        exact = run(exact_prior, batch)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch._dynamo.reset()
        if recompute_inside:
            prior.enable_gradient_checkpointing()
        apply_regional_compile(prior, recompute_inside=recompute_inside)
        assert apply_flex_fp32_attention(prior) == 4  # each attention block's
        processors = [m.processor for m in prior.modules() if hasattr(m, "set_processor")]
        assert processors and all(isinstance(p, FlexFp32AttnProcessor) for p in processors)
        ours = run(prior, batch)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    assert relative_error(ours[0], exact[0]) < 5e-3
    assert relative_error(ours[1], exact[1]) < 1e-2
    for a, b in zip(ours[2], exact[2]):
        assert relative_error(a, b) < 1e-2


def test_bf16_autocast_result_unchanged() -> None:
    exact_prior = make_prior()
    prior = copy.deepcopy(exact_prior)
    torch._dynamo.reset()
    apply_regional_compile(prior)
    apply_flex_fp32_attention(prior)
    batch = inputs(2)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ours, exact = prior(**batch).sample, exact_prior(**batch).sample
    assert relative_error(ours, exact) < 2e-2
