"""Optimizers: fused AdamW, AdamW for bf16 weights with Kahan compensation, and Lion.

bf16 has 8 mantissa bits: near 1.0 one ulp is 2**-7, so an update of 1e-4 rounds away and
plain AdamW on bf16 weights stops learning. The compensated optimizers keep, per weight,
the rounding error of the last write and add it back into the next update.
"""

from __future__ import annotations

from typing import Iterable

import torch

NAMES = ("adamw", "adamw_bf16", "optimi-lion")


def build_optimizer(params: Iterable[torch.nn.Parameter], name: str, lr: float, beta1: float,
                    beta2: float, weight_decay: float, epsilon: float) -> torch.optim.Optimizer:
    """The optimizer `[optimizer] name` asks for."""
    params = list(params)
    if name == "adamw":
        on_cuda = bool(params) and all(p.is_cuda for p in params)
        return torch.optim.AdamW(params, lr=lr, betas=(beta1, beta2), eps=epsilon,
                                 weight_decay=weight_decay, fused=on_cuda or None)
    if name == "adamw_bf16":
        return AdamWBF16(params, lr=lr, betas=(beta1, beta2), eps=epsilon,
                         weight_decay=weight_decay)
    if name == "optimi-lion":
        return Lion(params, lr=lr, betas=(beta1, beta2), weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(NAMES)}")


def _write_compensated(param: torch.Tensor, update: torch.Tensor, state: dict) -> None:
    """param += update in fp32; for bf16 params, carry the rounding error to the next step."""
    if param.dtype == torch.float32:
        param.add_(update)
        return
    if "compensation" not in state:
        state["compensation"] = torch.zeros_like(param, dtype=torch.float32)
    exact = param.float() + state["compensation"] + update
    param.copy_(exact)  # rounds to the param's dtype
    state["compensation"].copy_(exact - param.float())


class _CompensatedOptimizer(torch.optim.Optimizer):
    """Walks the parameters with gradients; subclasses compute each fp32 update."""

    @torch.no_grad()
    def step(self, closure=None):
        """One step over every parameter that has a gradient."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    state = self.state[p]
                    update = self._update(p, p.grad.float(), state, group)
                    _write_compensated(p, update, state)
        return loss

    def _update(self, p: torch.Tensor, grad: torch.Tensor, state: dict,
                group: dict) -> torch.Tensor:
        raise NotImplementedError


class AdamWBF16(_CompensatedOptimizer):
    """AdamW with fp32 moments and Kahan-compensated writes into bf16 weights."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay})

    def _update(self, p: torch.Tensor, grad: torch.Tensor, state: dict,
                group: dict) -> torch.Tensor:
        """AdamW's step (decoupled weight decay, bias-corrected moments) in fp32."""
        beta1, beta2 = group["betas"]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        state["step"] += 1
        step = float(state["step"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
        update = -group["lr"] * (state["exp_avg"] / (1 - beta1 ** step)) / denom
        return update - group["lr"] * group["weight_decay"] * p.float()


class Lion(_CompensatedOptimizer):
    """Lion (Chen et al. 2023): sign of interpolated momentum, decoupled weight decay."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    def _update(self, p: torch.Tensor, grad: torch.Tensor, state: dict,
                group: dict) -> torch.Tensor:
        """update = sign(b1*m + (1-b1)*g); p -= lr*(update + wd*p); m = b2*m + (1-b2)*g."""
        beta1, beta2 = group["betas"]
        if not state:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
        m = state["exp_avg"]
        direction = (m * beta1 + grad * (1 - beta1)).sign_()
        m.lerp_(grad, 1 - beta2)
        return -group["lr"] * (direction + group["weight_decay"] * p.float())
