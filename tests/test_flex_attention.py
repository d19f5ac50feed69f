"""FlexFp32AttnProcessor (job/speedups/attention.py): the same attention as diffusers'
AttnProcessor2_0 for the blocks it is put on, and flex_attention's call computes SDPA's
attention. The TF32 kernels themselves and their backward (flex_attention has no CPU
backward) are checked on a GPU by tests/test_gpu_flex_attention.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.unets.unet_stable_cascade import SDCascadeAttnBlock
from torch.nn.attention.flex_attention import flex_attention

from job.speedups.attention import FlexFp32AttnProcessor, apply_flex_fp32_attention


def _processors(block: torch.nn.Module, processor) -> None:
    for module in block.modules():
        if hasattr(module, "set_processor"):
            module.set_processor(processor)


@pytest.mark.parametrize("kind", ["stage_c", "sdxl"])
def test_processor_gives_attnprocessor2_0s_output_and_gradients(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "stage_c":  # 4-D input, self-attention over the image and the conditioning
        block = SDCascadeAttnBlock(c=64, c_cond=32, nhead=2, self_attn=True)
        inputs = (torch.randn(2, 64, 5, 7), torch.randn(2, 9, 32))
        call = lambda b, x, kv: b(x, kv)  # noqa: E731
    else:  # self-attention then cross-attention, with the norm and feed-forward around them
        block = BasicTransformerBlock(64, 2, 32, cross_attention_dim=48)
        inputs = (torch.randn(2, 35, 64), torch.randn(2, 11, 48))
        call = lambda b, x, c: b(x, encoder_hidden_states=c)  # noqa: E731
    grads = []
    for processor in (AttnProcessor2_0(), FlexFp32AttnProcessor()):
        _processors(block, processor)
        block.zero_grad()
        x = inputs[0].clone().requires_grad_(True)
        out = call(block, x, inputs[1])
        out.square().mean().backward()
        grads.append((out.detach(), x.grad, [p.grad.clone() for p in block.parameters()]))
    (out_a, gx_a, gp_a), (out_b, gx_b, gp_b) = grads
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=1e-6)
    torch.testing.assert_close(gx_b, gx_a, rtol=0, atol=1e-6)
    for a, b in zip(gp_a, gp_b):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_call_is_sdpas_attention() -> None:
    """The processor's kernel call (no mask, default 1/sqrt(head dim) scale) on lengths that
    are not multiples of the kernel's tiles, as the Stage C prior's are (576 image tokens,
    661 with the conditioning)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 37, 64), torch.randn(2, 3, 51, 64), torch.randn(2, 3, 51, 64)
    with torch.no_grad():
        torch.testing.assert_close(flex_attention(q, k, v), F.scaled_dot_product_attention(q, k, v),
                                   rtol=1e-5, atol=1e-5)


def test_nothing_is_swapped_without_cuda() -> None:
    prior = torch.nn.Sequential(SDCascadeAttnBlock(c=64, c_cond=32, nhead=2))
    assert apply_flex_fp32_attention(prior) == 0
    assert type(prior[0].attention.processor) is AttnProcessor2_0


def test_flex_needs_compiled_blocks_where_it_applies(tmp_path) -> None:
    """fp32_attention = "flex" on an fp32 sdxl or Stage C job needs compiled blocks (exit 2
    without them); where it cannot act (another family, bf16, the CPU) it is ignored, said
    in a note or a warning, and never an error."""
    from helpers import tiny_job_config

    from job.config import check_rules
    from job.errors import ConfigError
    from job.speedups.compile import resolve_auto

    flex = {"fp32_attention": "flex"}
    no_compile = {**flex, "compile_blocks": False}
    with pytest.raises(ConfigError, match="compile_blocks = false.*\n.*set compile_blocks"):
        check_rules(tiny_job_config(tmp_path, speedups=no_compile))
    cfg = tiny_job_config(tmp_path, speedups=flex)
    assert not any("fp32_attention" in note for note in check_rules(cfg))
    resolve_auto(cfg, torch.device("cpu"))  # a CPU run of a GPU job file: SDPA, a warning
    assert cfg.speedups.fp32_attention == "sdpa"
    # On a GPU, where auto leaves compile off (here a quantised base, or no compiler): exit 2.
    quantised = {**flex, "base_model_precision": "int8-torchao"}
    with pytest.raises(ConfigError, match="needs compile_blocks, which auto turned off here"):
        resolve_auto(tiny_job_config(tmp_path, speedups=quantised), torch.device("cuda"))
    # Ignored, with a note, whatever compile does.
    sd3 = {"model": {"family": "sd3", "flavour": "medium"}}
    bf16 = {"model": {"family": "stable_cascade", "flavour": "tiny"},
            "train": {"mixed_precision": "bf16"}, "job": {"i_know_what_i_am_doing": True}}
    for other, said in ((sd3, "is ignored: family 'sd3'"),
                        (bf16, 'is ignored with mixed_precision = "bf16"')):
        for speedups in (flex, no_compile, quantised):
            cfg = tiny_job_config(tmp_path, speedups=speedups, **other)
            assert any(said in note for note in check_rules(cfg)), check_rules(cfg)
            resolve_auto(cfg, torch.device("cuda"))
            assert cfg.speedups.fp32_attention == "sdpa"


def test_compiled_block_traces_the_flex_branch(monkeypatch) -> None:
    """The processor's flex branch traced into one graph with a Stage C attention block (no
    graph break), as regional compile does on a GPU, gives SDPA's output. aot_eager runs
    the traced graph with flex's reference kernel: inductor's CPU flex template does not
    take a call without a block mask, and the Triton kernel is the GPU test's."""
    import job.speedups.attention as attention

    monkeypatch.setattr(attention, "FLEX_DEVICES", ("cuda", "cpu"))
    torch.manual_seed(0)
    block = SDCascadeAttnBlock(c=128, c_cond=32, nhead=2, self_attn=True).eval()  # head 64
    x, kv = torch.randn(2, 128, 6, 6), torch.randn(2, 9, 32)
    with torch.no_grad():
        exact = block(x, kv)
        _processors(block, FlexFp32AttnProcessor())
        import torch.nn.attention.flex_attention as flex_module

        calls, flex = [], flex_module.flex_attention

        def counted(*args, **kwargs):  # traced once by dynamo
            calls.append(args[0].shape)
            return flex(*args, **kwargs)

        monkeypatch.setattr(flex_module, "flex_attention", counted)
        torch._dynamo.reset()
        out = torch.compile(block, backend="aot_eager", fullgraph=True)(x, kv)
    assert calls == [torch.Size([2, 2, 36, 64])], calls  # batch, heads, 6x6 tokens, head dim
    torch.testing.assert_close(out, exact, rtol=1e-4, atol=1e-5)
