"""Attention kernels other than PyTorch's SDPA defaults.

SageAttention for validation sampling (attention_mechanism = "sageattention"): it quantises
Q and K to int8 in its forward kernel and has no backward pass, so it never touches
training: the family swaps its processors in around sampling only, and training keeps
PyTorch's SDPA.

fp32 attention through FlashAttention with fp16 inputs (`[speedups] fp32_attention =
"fp16_flash"`, `fp16_flash_attention`): SDPA has no TF32 kernel, so an fp32 attention
(mixed_precision = "no") runs the memory-efficient kernel on the CUDA cores, 44% of a Stage
C lite fp32 step (bench/RESULTS.md, session 8). fp16 inputs with fp32 sums are the rounding
TF32 gives every other fp32 matmul of the step (10 mantissa bits); fp16's narrower range is
covered by exact power-of-two scaling (`fp16_flash_attention` says how). torch's flex_attention, which
keeps TF32 itself, was measured first and dropped: its Triton backward in TF32 is slower
than SDPA's fp32 one (Stage C lite fp32: 1.26x the TF32 reference with it, 1.24x without,
bench/RESULTS.md session 9). Measured on an H200 (session 10): Stage C lite fp32 1.68x the
TF32 reference step (SDPA: 1.24x), 1.76x with checkpointing; `fp32_attention = "auto"` turns
it on for the Stage C prior's fp32 jobs (sdxl's fp32 is not measured: opt-in there). The
kernels' GPU test is tests/test_gpu_fp16_flash_attention.py; the CPU tests run the same ops
through torch's CPU flash kernels.
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


# Where the processor's fp32 attention goes to the fp16 flash kernels: CUDA GPUs of compute
# capability 8.0 or newer, where FlashAttention trains (tests add "cpu", whose flash kernels
# take fp16 too, to run the same custom ops there).
FP16_FLASH_DEVICES = ("cuda",)


def _pow2_scale(x: torch.Tensor) -> torch.Tensor:
    """Per batch item and head ([B, H, 1, 1], fp32), the power of two that brings x's largest
    magnitude into [1, 2): exact to apply and to undo, and computed on the device (no host
    sync). An all-zero slice gets 2**126 (its zeros stay zeros)."""
    largest = x.detach().abs().amax(dim=(-2, -1), keepdim=True).float()
    return torch.exp2(-torch.floor(torch.log2(largest.clamp_min(2.0 ** -126))))


def _flash_forward(q, k, v):
    """FlashAttention's forward on fp16 [B, H, S, D] inputs: (out, logsumexp, and the RNG
    seed and offset its backward takes; on the CPU, whose kernels take none, two empty
    placeholders). The CUDA op serves every device but the CPU: "meta" and fake tensors too,
    which run its shape function (the custom op's fake kernel, the tests without a GPU)."""
    if q.device.type != "cpu":
        # cum_seq_q and cum_seq_k are undefined (None) for dense inputs.
        out, lse, _, _, _, _, seed, offset, _ = \
            torch.ops.aten._scaled_dot_product_flash_attention.default(q, k, v, 0.0, False,
                                                                      False)
        return out, lse, seed, offset
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(
        q, k, v, 0.0, False)
    return out, lse, q.new_empty(0), q.new_empty(0)


def _flash_backward(grad, q, k, v, out, lse, seed, offset):
    if q.device.type != "cpu":
        # Dense inputs: the longest sequences are the sequence lengths.
        return torch.ops.aten._scaled_dot_product_flash_attention_backward.default(
            grad, q, k, v, out, lse, None, None, q.shape[2], k.shape[2], 0.0, False, seed,
            offset)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default(
        grad, q, k, v, out, lse, 0.0, False)


Tensor = torch.Tensor


def _attention_forward(q: Tensor, k: Tensor, v: Tensor) -> tuple[
        Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    v_scale = _pow2_scale(v)
    q16, k16, v16 = q.half(), k.half(), (v * v_scale).half()
    out16, lse, seed, offset = _flash_forward(q16, k16, v16)
    return out16.float() / v_scale, q16, k16, v16, out16, lse, v_scale, seed, offset


def _attention_backward(grad: Tensor, q16: Tensor, k16: Tensor, v16: Tensor, out16: Tensor,
                        lse: Tensor, v_scale: Tensor, seed: Tensor,
                        offset: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    grad_scale = _pow2_scale(grad)
    dq, dk, dv = _flash_backward((grad * grad_scale).half(), q16, k16, v16, out16, lse, seed,
                                 offset)
    # The kernel's gradients are those of (grad * grad_scale) through q, k and v * v_scale
    # (two divisions: their product can exceed fp32's range where both are large).
    return dq.float() / grad_scale / v_scale, dk.float() / grad_scale / v_scale, \
        dv.float() / grad_scale


# Two custom ops (one node each in a compiled graph) rather than an autograd.Function: inside
# a block that recomputes (gradient checkpointing in its compiled graph), torch 2.11's
# partitioner kept an autograd.Function's saved fp16 tensors instead of recomputing them
# (3.2x a block input per attention block, bench/RESULTS.md session 10), and recomputes a
# custom op like any other. Their fake kernels are the same functions, which run the flash
# ops' shape functions on fake tensors. The forward returns what its backward needs after
# the attention (non-differentiable).
_forward_op = torch.library.custom_op("tunejob::fp16_flash_attention", _attention_forward,
                                      mutates_args=())
_forward_op.register_fake(_attention_forward)
_backward_op = torch.library.custom_op("tunejob::fp16_flash_attention_backward",
                                       _attention_backward, mutates_args=())
_backward_op.register_fake(_attention_backward)


def _setup_context(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[1:])


def _backward(ctx, grad: Tensor, *_) -> tuple[Tensor, Tensor, Tensor]:
    return _backward_op(grad, *ctx.saved_tensors)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def fp16_flash_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v for fp32 [B, H, S, D] tensors, through FlashAttention with
    fp16 inputs: the tensor-core matmuls see 10 mantissa bits, as TF32's do, and sum in
    fp32 (scores, softmax and the output's and gradients' accumulators); the output and the
    gradients are rounded to fp16 once (11 significant bits) before they return to fp32.

    fp16's range is the difference from TF32, so what can be scaled exactly is: v and the
    output's gradient are multiplied, per batch item and head, by the power of two that
    puts their largest magnitude in [1, 2), and the results divided by it again (the
    attention is linear in each; an fp32 step has no loss scale, and its attention
    gradients can be 1e-8 and smaller, which fp16 alone would flush to zero). q and k go in
    as they are (their product sets the softmax; the blocks' projected activations are far
    inside fp16's 6e-5 to 65504); a value beyond 65504 becomes inf, and the step is skipped
    as non-finite like any other (train.max_nonfinite_steps, whose error then names this
    kernel)."""
    return _forward_op(q, k, v)[0]


def fp16_flash_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the flash kernels take these heads: a head dim that is a multiple of 8, the
    same for q, k and v, at most 128 (every GPU that runs FlashAttention trains those; its
    backward above 192 needs compute capability 8.0 or 9.0; sdxl and Stage C have 64); a
    batch."""
    d = q.shape[-1]
    return d == k.shape[-1] == v.shape[-1] and d % 8 == 0 and d <= 128 and q.shape[0] > 0


class Fp32AttnProcessor:
    """diffusers' AttnProcessor2_0 (self- and cross-attention of `Attention`: SDXL's
    transformer blocks, the Stage C prior's attention blocks) with fp32 attention through
    fp16_flash_attention; other dtypes (bf16 autocast) keep SDPA, whose flash and cuDNN
    kernels take them. Masks, spatial and group norms (unused by those blocks) go to
    AttnProcessor2_0."""

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
        if q.dtype == k.dtype == v.dtype == torch.float32 \
                and q.device.type in FP16_FLASH_DEVICES and fp16_flash_fits(q, k, v):
            out = fp16_flash_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).flatten(2).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        if image:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def fp16_flash_applies(cfg) -> bool:
    """Whether `[speedups] fp32_attention = "fp16_flash"` can act: fp32 training of a family
    whose blocks run diffusers' Attention (sdxl, the Stage C prior). Where it cannot,
    config.check_rules notes that it is ignored."""
    from job.models.registry import spec_for

    return cfg.train.mixed_precision == "no" \
        and "fp32_attention" in spec_for(cfg.model.family).features


def fp16_flash_auto_off_because(cfg, device: torch.device) -> str | None:
    """Why `fp32_attention = "auto"` keeps SDPA for this job on `device` (None: fp16_flash;
    "": the choice cannot matter, the job has no fp32 attention in those blocks). On where
    GPU runs measured it: the Stage C prior in fp32 (bench/RESULTS.md, session 10)."""
    if not fp16_flash_applies(cfg):
        return ""
    unavailable = fp16_flash_unavailable_because(device)
    if unavailable is not None:
        return unavailable
    if cfg.model.family != "stable_cascade":
        return (f"family {cfg.model.family!r}: not measured on a GPU (fp32_attention = "
                '"fp16_flash" to try)')
    if not cfg.speedups.allow_tf32:
        return "allow_tf32 = false asks for full fp32 matmuls"
    return None


def fp16_flash_unavailable_because(device: torch.device | None = None) -> str | None:
    """Why this machine (or `device` on it) cannot run the fp16 flash kernels (None: it
    can)."""
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return "no CUDA GPU (the fp16 flash training kernels are CUDA-only)"
    if torch.version.hip is not None:
        return "a ROCm GPU (the fp16 flash path is run and tested on CUDA only)"
    if torch.cuda.get_device_capability() < (8, 0):
        return (f"FlashAttention needs compute capability 8.0 or newer (this GPU: "
                f"{'.'.join(map(str, torch.cuda.get_device_capability()))})")
    return None


def apply_fp16_flash_attention(*models: torch.nn.Module) -> int:
    """`Fp32AttnProcessor` on the CUDA `Attention` modules of the models' repeated blocks
    (regional compile's block classes, compiled or not) that run diffusers' default
    AttnProcessor2_0; returns how many (0, with a warning, where none or no capable GPU)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from job.speedups.compile import BLOCK_CLASSES

    log = get_logger()
    off = fp16_flash_unavailable_because()
    if off is not None:
        log.warning("speedup_skipped", speedup="fp32_attention", reason=off,
                    using="PyTorch SDPA in fp32")
        return 0
    modules = [m for model in models for block in model.modules()
               if type(block).__name__ in BLOCK_CLASSES
               for m in block.modules() if isinstance(m, Attention)
               and type(m.processor) is AttnProcessor2_0 and next(m.parameters()).is_cuda]
    if not modules:
        log.warning("speedup_skipped", speedup="fp32_attention", using="PyTorch SDPA in fp32",
                    reason="no CUDA Attention module with diffusers' default processor in the "
                    "repeated blocks")
        return 0
    for module in modules:
        module.set_processor(Fp32AttnProcessor())
    log.info("speedup_active", speedup="fp16_flash_attention", models=len(models),
             attention_modules=len(modules),
             inputs="fp16 (per-head power-of-two scaling of v and the output gradient)",
             sums="fp32")
    return len(modules)
