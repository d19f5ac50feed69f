"""Optimizers: fused AdamW, AdamW for bf16 weights with Kahan compensation, and Lion.

bf16 has 8 mantissa bits: near 1.0 one ulp is 2**-7, so an update of 1e-4 rounds away and
plain AdamW on bf16 weights stops learning. The compensated optimizers keep, per weight,
the rounding error of the last write and add it back into the next update.
"""

from __future__ import annotations

import math
from itertools import chain
from typing import Any, Callable, Iterable

import torch

NAMES = ("adamw", "adamw_bf16", "optimi-lion")

# Weights narrower than fp32 get a compensation buffer; fp32 and fp64 are written directly.
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def build_optimizer(params: Iterable[torch.nn.Parameter], name: str, lr: float, beta1: float,
                    beta2: float, weight_decay: float, epsilon: float) -> torch.optim.Optimizer:
    """The optimizer `[optimizer] name` asks for."""
    params = list(params)
    if name == "adamw":
        # The fused kernel is CUDA-only on the oldest torch we support; elsewhere torch
        # picks its foreach path by itself.
        fused = bool(params) and all(p.is_cuda for p in params)
        return torch.optim.AdamW(params, lr=lr, betas=(beta1, beta2), eps=epsilon,
                                 weight_decay=weight_decay, fused=fused or None)
    if name == "adamw_bf16":
        return AdamWBF16(params, lr=lr, betas=(beta1, beta2), eps=epsilon,
                         weight_decay=weight_decay)
    if name == "optimi-lion":
        # Lion has no epsilon: the sign of the momentum needs no denominator.
        return Lion(params, lr=lr, betas=(beta1, beta2), weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(NAMES)}")


class _CompensatedOptimizer(torch.optim.Optimizer):
    """Walks the parameters with gradients; subclasses compute each fp32 update."""

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._step_param(p, p.grad.float(), self.state[p], group)
        return loss

    def _step_param(self, p: torch.Tensor, grad: torch.Tensor, state: dict,
                    group: dict) -> None:
        """Apply one update; a bf16 weight keeps the rounding error of its write."""
        if p.dtype not in _LOW_PRECISION:
            p.add_(self._update(p, grad, state, group))
            return
        if "compensation" not in state:
            state["compensation"] = torch.zeros_like(p, dtype=torch.float32)
        compensation = state["compensation"]
        # The weight the optimizer means is bf16 value + carried error, at fp32 precision;
        # weight decay and the update both act on that, not on the rounded bf16 value.
        exact = p.float().add_(compensation)
        exact.add_(self._update(exact, grad, state, group))
        p.copy_(exact)  # rounds to the parameter's dtype
        # An fp32 minus its bf16 rounding is exact in fp32, so no error is lost here.
        torch.sub(exact, p.float(), out=compensation)

    def _update(self, weight: torch.Tensor, grad: torch.Tensor, state: dict,
                group: dict) -> torch.Tensor:
        """The fp32 step to add to `weight` (which must not be changed in place)."""
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load saved state, keeping moments and compensation in the dtype they were saved in."""
        # torch casts floating state to the parameter's dtype on load, which would round
        # the fp32 moments and compensation of bf16 weights to bf16 on every resume.
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if key != "step" and torch.is_tensor(value) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, copy=True)


class AdamWBF16(_CompensatedOptimizer):
    """AdamW with fp32 moments and Kahan-compensated writes into bf16 weights."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay})

    def _update(self, weight: torch.Tensor, grad: torch.Tensor, state: dict,
                group: dict) -> torch.Tensor:
        """AdamW's step (decoupled weight decay, bias-corrected moments) in fp32."""
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        if "exp_avg" not in state:
            # A CPU step counter, as torch's AdamW keeps it: reading it needs no GPU sync.
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(weight, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(weight, dtype=torch.float32)
        state["step"] += 1
        step = float(state["step"])
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = exp_avg_sq.sqrt().div_(math.sqrt(1 - beta2 ** step)).add_(eps)
        update = exp_avg.div(denom).mul_(-lr / (1 - beta1 ** step))
        if weight_decay:
            update.sub_(weight, alpha=lr * weight_decay)
        return update


class Lion(_CompensatedOptimizer):
    """Lion (Chen et al. 2023): sign of interpolated momentum, decoupled weight decay."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    def _update(self, weight: torch.Tensor, grad: torch.Tensor, state: dict,
                group: dict) -> torch.Tensor:
        """-lr * (sign(b1*m + (1-b1)*g) + wd*p), then m = b2*m + (1-b2)*g."""
        beta1, beta2 = group["betas"]
        lr, weight_decay = group["lr"], group["weight_decay"]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(weight, dtype=torch.float32)
        exp_avg = state["exp_avg"]
        update = exp_avg.lerp(grad, 1 - beta1).sign_().mul_(-lr)
        exp_avg.lerp_(grad, 1 - beta2)
        if weight_decay:
            update.sub_(weight, alpha=lr * weight_decay)
        return update
