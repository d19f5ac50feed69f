"""SageAttention for validation sampling (attention_mechanism = "sageattention").

SageAttention quantises Q and K to int8 in its forward kernel and has no backward pass,
so it never touches training: the family swaps its processors in around sampling only,
and training keeps PyTorch's SDPA.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

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
        q = self._heads(attn, attn.to_q(hidden_states), attn.norm_q)
        k = self._heads(attn, attn.to_k(hidden_states), attn.norm_k)
        v = self._heads(attn, attn.to_v(hidden_states), None)
        if encoder_hidden_states is not None:
            q = torch.cat([q, self._heads(attn, attn.add_q_proj(encoder_hidden_states),
                                          attn.norm_added_q)], dim=2)
            k = torch.cat([k, self._heads(attn, attn.add_k_proj(encoder_hidden_states),
                                          attn.norm_added_k)], dim=2)
            v = torch.cat([v, self._heads(attn, attn.add_v_proj(encoder_hidden_states), None)],
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

    @staticmethod
    def _heads(attn, x: torch.Tensor, norm) -> torch.Tensor:
        """[B, S, H*D] -> [B, H, S, D], with the per-head norm when the block has one."""
        x = x.view(x.shape[0], -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
        return norm(x) if norm is not None else x
