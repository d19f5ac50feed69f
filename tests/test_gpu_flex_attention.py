"""On a CUDA GPU (marked `gpu`; `python -m pytest -m gpu tests/test_gpu_tf32_attention.py` on
the GPU machine): the Stage C prior's attention block, compiled by regional compile with
TF32 allowed, runs its fp32 attention through flex_attention, and its output and gradients
stay within TF32's rounding of fp32 (SDPA with TF32 off), with and without the recompute
inside the compiled block; under bf16 autocast the processor's result is SDPA's."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.unets.unet_stable_cascade import SDCascadeAttnBlock

from job.speedups.attention import FlexFp32AttnProcessor
from job.speedups.compile import apply_regional_compile

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def relative_error(value, exact) -> float:
    return ((value.float() - exact.float()).norm() / exact.float().norm()).item()


class Prior(torch.nn.Module):  # regional compile looks for blocks inside a denoiser
    def __init__(self) -> None:
        super().__init__()
        self.block = SDCascadeAttnBlock(c=256, c_cond=128, nhead=4, self_attn=True)  # head 64

    def forward(self, x, kv):
        return self.block(x, kv)


def run(model, x, kv, grad):
    x = x.clone().requires_grad_(True)
    out = model(x, kv)
    out.backward(grad)
    return out.detach(), x.grad, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("recompute_inside", [0.0, 1.0])
def test_fp32_attention_through_flex_within_tf32_rounding(recompute_inside: float) -> None:
    torch.manual_seed(0)
    exact_model = Prior().cuda()
    model = copy.deepcopy(exact_model)
    x = torch.randn(4, 256, 24, 24, device="cuda")  # 576 image tokens + 85 conditioning
    kv = torch.randn(4, 85, 128, device="cuda")
    grad = torch.randn(4, 256, 24, 24, device="cuda")
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        exact = run(exact_model, x, kv, grad)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        apply_regional_compile(model, recompute_inside=recompute_inside, flex_fp32_attention=True)
        assert isinstance(model.block.attention.processor, FlexFp32AttnProcessor)
        ours = run(model, x, kv, grad)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    assert relative_error(ours[0], exact[0]) < 2e-3
    assert relative_error(ours[1], exact[1]) < 5e-3
    for a, b in zip(ours[2], exact[2]):
        assert relative_error(a, b) < 5e-3


def test_bf16_autocast_result_unchanged() -> None:
    torch.manual_seed(0)
    exact_model = Prior().cuda()
    model = copy.deepcopy(exact_model)
    apply_regional_compile(model, flex_fp32_attention=True)
    x, kv = torch.randn(2, 256, 24, 24, device="cuda"), torch.randn(2, 85, 128, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ours, exact = model(x, kv), exact_model(x, kv)
    assert relative_error(ours, exact) < 1e-2
