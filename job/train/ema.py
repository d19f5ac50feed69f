"""An exponential moving average of the trained weights, kept in fp32."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


class EMA:
    """shadow = decay * shadow + (1 - decay) * weight, every `update_interval` steps."""

    def __init__(self, named_params: dict[str, torch.Tensor], decay: float = 0.9999,
                 update_interval: int = 1) -> None:
        self.decay, self.update_interval = decay, update_interval
        self.shadow = {n: p.detach().float().clone() for n, p in named_params.items()}

    @torch.no_grad()
    def update(self, named_params: dict[str, torch.Tensor], step: int) -> None:
        """Fold the current weights in, on steps that are multiples of the interval."""
        if step % self.update_interval:
            return
        for name, param in named_params.items():
            self.shadow[name].lerp_(param.detach().float(), 1 - self.decay)

    def state_dict(self) -> dict:
        """Shadow weights and settings."""
        return {"shadow": self.shadow, "decay": self.decay,
                "update_interval": self.update_interval}

    def load_state_dict(self, state: dict) -> None:
        """Restore the shadow weights."""
        self.shadow = {n: t.float().clone() for n, t in state["shadow"].items()}
        self.decay, self.update_interval = state["decay"], state["update_interval"]

    @torch.no_grad()
    def copy_to(self, named_params: dict[str, torch.Tensor]) -> None:
        """Write the EMA weights into the live parameters."""
        for name, param in named_params.items():
            param.copy_(self.shadow[name].to(param.device, param.dtype))

    @contextmanager
    def swapped_in(self, named_params: dict[str, torch.Tensor]) -> Iterator[None]:
        """The EMA weights in the live parameters for the block, the originals after."""
        saved = {n: p.detach().clone() for n, p in named_params.items()}
        self.copy_to(named_params)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in named_params.items():
                    param.copy_(saved[name])
