"""Attention kernels other than PyTorch's SDPA defaults.

SageAttention for validation sampling (attention_mechanism = "sageattention"): it quantises
Q and K to int8 in its forward kernel and has no backward pass, so it never touches
training: the family swaps its processors in around sampling only, and training keeps
PyTorch's SDPA.

fp32 attention through flex_attention (`[speedups] fp32_attention = "flex"`,
`FlexFp32AttnProcessor`): SDPA has no TF32 kernel, so an fp32 attention (mixed_precision =
"no") runs the memory-efficient kernel on the CUDA cores, 44% of a Stage C lite fp32 step
(bench/RESULTS.md, session 8). torch's flex_attention, compiled inside the regional-compile
graphs, is a flash-style Triton kernel whose matmuls follow torch's fp32 matmul precision:
with `[speedups] allow_tf32` they run on the tensor cores with TF32 inputs (10 mantissa
bits, fp32 sums), the rounding TF32 already gives every other fp32 matmul of the step.
Opt-in until it is measured on a GPU (tests/test_gpu_flex_attention.py, bench/issue9_call4.sh);
the CPU tests check its reshaping and gradients (through its SDPA branch), the flex call's
attention and the flex branch's one-graph trace.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from job.config import SpeedupsTable
from job.log import get_logger

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def apply_sageattention(family, settings: SpeedupsTable) -> bool:
    """Give the family a SageAttention processor for sampling; False (with a warning, SDPA
    stays) when the package or a CUDA GPU is missing."""
    if settings.attention_mechanism != "sageattention":
        return False
    log = get_logger()
    reason = None
    if not torch.cuda.is_available() or family.device.type != "cuda":
        reason = "no CUDA GPU (SageAttention's kernels are CUDA-only)"
    else:
        try:
            from sageattention import sageattn
        except ImportError:
            reason = "the sageattention package is not installed (pip install 'tunejob[sage]')"
    if reason is not None:
        log.warning("speedup_fallback", speedup="sageattention", reason=reason,
                    using="PyTorch SDPA for validation sampling")
        return False

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # Its kernels take fp16/bf16 only; an fp32 job (mixed_precision = "no") samples in bf16.
        half = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        out = sageattn(q.to(half), k.to(half), v.to(half), tensor_layout="HND", is_causal=False)
        return out.to(q.dtype)

    family.sampling_attention = JointAttentionProcessor(attention)
    log.info("speedup_active", speedup="sageattention", scope="validation sampling only")
    return True


@contextmanager
def swapped_processors(model: torch.nn.Module, processor) -> Iterator[None]:
    """`processor` on every attention module of `model` for the block, then the old ones."""
    if processor is None:
        yield
        return
    saved = dict(model.attn_processors)
    model.set_attn_processor(processor)
    try:
        yield
    finally:
        model.set_attn_processor(saved)


class JointAttentionProcessor:
    """SD3's joint attention (image tokens, then context tokens, one attention) with the
    attention kernel as a parameter; diffusers' JointAttnProcessor2_0 uses SDPA."""

    def __init__(self, attention: AttentionFn) -> None:
        self.attention = attention

    def __call__(self, attn, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs):
        batch, image_tokens = hidden_states.shape[0], hidden_states.shape[1]
        q = _heads(attn, attn.to_q(hidden_states), attn.norm_q)
        k = _heads(attn, attn.to_k(hidden_states), attn.norm_k)
        v = _heads(attn, attn.to_v(hidden_states), None)
        if encoder_hidden_states is not None:
            q = torch.cat([q, _heads(attn, attn.add_q_proj(encoder_hidden_states),
                                          attn.norm_added_q)], dim=2)
            k = torch.cat([k, _heads(attn, attn.add_k_proj(encoder_hidden_states),
                                          attn.norm_added_k)], dim=2)
            v = torch.cat([v, _heads(attn, attn.add_v_proj(encoder_hidden_states), None)],
                          dim=2)
        out = self.attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[3]).to(q.dtype)
        image, context = out[:, :image_tokens], out[:, image_tokens:]
        image = attn.to_out[1](attn.to_out[0](image))
        if encoder_hidden_states is None:
            return image
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return image, context


def _heads(attn, x: torch.Tensor, norm) -> torch.Tensor:
    """[B, S, H*D] -> [B, H, S, D], with the per-head norm when the block has one."""
    x = x.view(x.shape[0], -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
    return norm(x) if norm is not None else x


# Where the processor's fp32 attention goes to flex_attention: CUDA, where it trains (flex's
# CPU kernels have no backward; tests add "cpu" to check the compiled forward).
FLEX_DEVICES = ("cuda",)
FLEX_SKIPPED = dict(speedup="fp32_attention", reason="flex_attention's training kernels are "
                    "CUDA-only", using="PyTorch SDPA")


class FlexFp32AttnProcessor:
    """diffusers' AttnProcessor2_0 (self- and cross-attention of `Attention`: SDXL's
    transformer blocks, the Stage C prior's attention blocks) with fp32 attention through
    flex_attention; other dtypes (bf16 autocast) keep SDPA, whose flash and cuDNN kernels
    take them. Only for compiled blocks: eager flex_attention is an unfused reference.
    Masks, spatial and group norms (unused by those blocks) go to AttnProcessor2_0."""

    def __init__(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.fallback = AttnProcessor2_0()

    def __call__(self, attn, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        if attention_mask is not None or attn.spatial_norm is not None \
                or attn.group_norm is not None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask,
                                 temb, *args, **kwargs)
        residual = hidden_states
        image = hidden_states.ndim == 4
        if image:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q = _heads(attn, attn.to_q(hidden_states), attn.norm_q)
        k = _heads(attn, attn.to_k(context), attn.norm_k)
        v = _heads(attn, attn.to_v(context), None)
        if q.dtype == k.dtype == v.dtype == torch.float32 and q.device.type in FLEX_DEVICES:
            from torch.nn.attention.flex_attention import flex_attention

            out = flex_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).flatten(2).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        if image:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def apply_flex_fp32_attention(denoiser: torch.nn.Module) -> int:
    """`FlexFp32AttnProcessor` on the CUDA `Attention` modules of the denoiser's compiled
    blocks (regional compile's block classes) that run diffusers' default AttnProcessor2_0;
    returns how many. Their fp32 attention's precision follows torch's fp32 matmul setting
    (TF32 with allow_tf32). Called with compile_blocks on (the config rules see to it):
    dynamo traces the processor when a block first runs, so the order does not matter."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from job.speedups.compile import BLOCK_CLASSES

    log = get_logger()
    if not torch.cuda.is_available():
        log.warning("speedup_skipped", **FLEX_SKIPPED)
        return 0
    modules = [m for block in denoiser.modules() if type(block).__name__ in BLOCK_CLASSES
               for m in block.modules() if isinstance(m, Attention)
               and type(m.processor) is AttnProcessor2_0 and next(m.parameters()).is_cuda]
    if not modules:
        log.warning("speedup_skipped", speedup="fp32_attention", using="PyTorch SDPA",
                    reason="no CUDA Attention module with diffusers' default processor in the "
                    "compiled blocks")
        return 0
    for module in modules:
        module.set_processor(FlexFp32AttnProcessor())
    precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    log.info("speedup_active", speedup="flex_fp32_attention", attention_modules=len(modules),
             matmul_precision=precision)
    return len(modules)
