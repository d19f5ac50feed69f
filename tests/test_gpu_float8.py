"""On a CUDA GPU with float8 (marked `gpu`; `python -m pytest -m gpu tests/test_gpu_float8.py`
on the GPU machine): [speedups] fp8_base_matmuls' layer through CUDA's row-wise scaled
matmul, eager and compiled, against the bf16 linear, and in an SD3.5 Medium-width block."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from helpers import relative_error
from job.speedups.float8 import Float8FrozenLinear, apply_float8_base

pytestmark = pytest.mark.gpu
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))


def fp8_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not fp8_gpu(), reason="needs a GPU of compute capability 8.9+")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "inductor"])
def test_layer_on_cuda_matches_bf16_within_fp8_precision(compiled: bool) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(1536, 6144, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    layer = Float8FrozenLinear(linear)
    run = torch.compile(layer) if compiled else layer
    x = torch.randn(4, 4096, 1536, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, exact = run(x), linear(x)
    assert y.dtype == exact.dtype == torch.bfloat16
    assert relative_error(y, exact) < 0.06
    grad = torch.randn_like(exact)
    (gx,) = torch.autograd.grad(y, x, grad)
    (gx_exact,) = torch.autograd.grad(exact, x, grad)
    assert relative_error(gx, gx_exact) < 0.06


@pytest.mark.skipif(not fp8_gpu(), reason="needs a GPU of compute capability 8.9+")
def test_sd3_medium_width_blocks_train_a_lora_in_fp8() -> None:
    from peft import LoraConfig
    import sd3_step

    config = dict(sd3_step.SD35_MEDIUM, num_layers=2, dual_attention_layers=(0,))
    model = sd3_step.make_transformer(config, torch.device("cuda"), torch.bfloat16)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=sd3_step.TARGETS))
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
            if "lora_B" in name:
                param.data.normal_(0, 0.01)
    batch = sd3_step.make_batch(config, 2, 1024, torch.device("cuda"))

    def loss_and_grads():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(hidden_states=batch["latents"], timestep=torch.tensor([300.0, 700.0],
                                                                              device="cuda"),
                        encoder_hidden_states=batch["text.prompt_embeds"],
                        pooled_projections=batch["text.pooled_prompt_embeds"],
                        return_dict=False)[0]
        loss = (out.float() - batch["latents"]).square().mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    exact_loss, exact_grads = loss_and_grads()
    assert apply_float8_base(model, "sd3") > 0
    loss, grads = loss_and_grads()
    assert abs(loss - exact_loss) / exact_loss < 0.05
    assert grads.keys() == exact_grads.keys()
    for name in grads:
        if not exact_grads[name].any():
            # The last block's text-stream projections feed only the text tokens' outputs,
            # which that block drops (context_pre_only): exactly zero either way.
            assert not grads[name].any(), name
            continue
        cosine = torch.nn.functional.cosine_similarity(grads[name].flatten(),
                                                       exact_grads[name].flatten(), dim=0)
        assert cosine > 0.97, name
