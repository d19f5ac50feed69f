"""Float8 matmuls for the frozen base of a LoRA ([speedups] fp8_base_matmuls).

The DiTs' linear layers in their blocks (attention projections and MLPs) see thousands of
tokens per sample at 1024 px, where an fp8 GEMM runs at twice the bf16 rate on Hopper.
torchao's float8 training (Float8Linear) also computes each weight's gradient, which a
LoRA's frozen base throws away: a third of the GEMM work for nothing. This layer does the
two GEMMs a frozen weight needs, both with torch._scaled_mm in float8 e4m3 and row-wise
scales (the "rowwise" recipe: every row of an operand scaled by its own absmax):

  forward   y  = (x_q * s_x) (W_q * s_w)^T          W_q per output row, x_q per token
  backward  dx = (g_q * s_g) (Wt_q * s_wt)^T        Wt = W^T quantised per input column

The weight is quantised once, in both layouts (2 bytes per weight, what bf16 took); the
bf16 weight is dropped. Activations and gradients are quantised per call. The result is an
approximation of the bf16 matmul (e4m3 keeps 3 mantissa bits; a test bounds the error) and
validation sampling uses it too. GPUs of compute capability 8.9+ only (the config rules
refuse others); the CPU runs the same math through torch's CPU _scaled_mm, for the tests.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from job.errors import ConfigError
from job.log import get_logger

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max
# Block linears of the DiTs that see every image token (family name -> module name pattern).
TARGETS = {
    "sd3": re.compile(r"transformer_blocks\.\d+\.(attn|attn2|ff|ff_context)\."),
    "kandinsky5-image": re.compile(
        r"visual_transformer_blocks\.\d+\.(self_attention|cross_attention|feed_forward)\."),
}


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, C] as e4m3 values and fp32 per-row scales [R, 1] (x ~= values * scales)."""
    amax = x.detach().abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


class _Float8FrozenMatmul(torch.autograd.Function):
    """x @ W^T with W frozen: float8 forward and input gradient, no weight gradient."""

    @staticmethod
    def forward(ctx, x, w_q, w_scale, wt_q, wt_scale, out_dtype):
        ctx.save_for_backward(wt_q, wt_scale)
        ctx.out_dtype = out_dtype
        x_q, x_scale = quantize_rows(x)
        return torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale.t(),
                                out_dtype=out_dtype)

    @staticmethod
    def backward(ctx, grad):
        wt_q, wt_scale = ctx.saved_tensors
        g_q, g_scale = quantize_rows(grad.contiguous())
        grad_x = torch._scaled_mm(g_q, wt_q.t(), scale_a=g_scale, scale_b=wt_scale.t(),
                                  out_dtype=ctx.out_dtype)
        return grad_x, None, None, None, None, None


class Float8FrozenLinear(nn.Module):
    """A frozen nn.Linear whose matmuls run in float8 (see the module docstring)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        w_q, w_scale = quantize_rows(weight)
        wt_q, wt_scale = quantize_rows(weight.t().contiguous())
        self.register_buffer("w_q", w_q)
        self.register_buffer("w_scale", w_scale)
        self.register_buffer("wt_q", wt_q)
        self.register_buffer("wt_scale", wt_scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(),
                                                                  requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The dtype an nn.Linear would return here: autocast's, else the input's.
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) \
            else x.dtype
        rows = x.reshape(-1, self.in_features).contiguous()  # _scaled_mm takes row-major
        y = _Float8FrozenMatmul.apply(rows, self.w_q, self.w_scale, self.wt_q, self.wt_scale,
                                      out_dtype)
        if self.bias is not None:
            y = y + self.bias.to(out_dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float8 e4m3"


def check_device(device: torch.device) -> None:
    """A CUDA GPU with float8 matmuls (compute capability 8.9+), or the CPU (slow, for
    checks); otherwise exit 2 naming the fix."""
    if device.type == "cpu":
        get_logger().warning("fp8_on_cpu", note="fp8_base_matmuls runs on the CPU through "
                             "torch's reference float8 matmul: the same numbers, no speed-up")
        return
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    if capability is None or capability < (8, 9):
        raise ConfigError("speedups.fp8_base_matmuls = true needs a GPU with float8 matmuls "
                          f"(compute capability 8.9+: Ada, Hopper, Blackwell); this one is "
                          f"{capability}", "set fp8_base_matmuls = false")


def suitable(linear: nn.Module) -> bool:
    """A frozen nn.Linear whose sides _scaled_mm takes (multiples of 16)."""
    return type(linear) is nn.Linear and not linear.weight.requires_grad \
        and linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def apply_float8_base(denoiser: nn.Module, family: str) -> int:
    """Replace the frozen block linears of `denoiser` (the LoRA's base layers and the
    untargeted ones) by Float8FrozenLinear; returns how many. Call after the LoRA exists."""
    pattern = TARGETS[family]
    replaced = 0
    for name, module in list(denoiser.named_modules()):
        if not pattern.search(name + "."):
            continue
        base = getattr(module, "base_layer", None)
        if isinstance(base, nn.Module) and suitable(base):
            module.base_layer = Float8FrozenLinear(base)
            replaced += 1
        elif suitable(module) and not name.endswith(".base_layer"):
            parent_name, _, child = name.rpartition(".")
            parent = denoiser.get_submodule(parent_name)
            if not hasattr(parent, "base_layer") or parent.base_layer is not module:
                setattr(parent, child, Float8FrozenLinear(module))
                replaced += 1
    get_logger().info("speedup_active", speedup="fp8_base_matmuls", layers=replaced,
                      recipe="e4m3 rowwise, torch._scaled_mm; frozen weights, no weight grad")
    return replaced
