"""An exponential moving average of the trained weights, kept in fp32."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch


class EMA:
    """shadow = decay * shadow + (1 - decay) * weight, every `update_interval` steps."""

    def __init__(self, named_params: dict[str, torch.Tensor], decay: float = 0.9999,
                 update_interval: int = 1) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        if update_interval < 1:
            raise ValueError(f"EMA update_interval must be at least 1, got {update_interval}")
        self.decay, self.update_interval = decay, update_interval
        # fp32 even for bf16 weights: (1 - 0.9999) * delta is far below a bf16 ulp.
        self.shadow = {n: p.detach().to(torch.float32, copy=True)
                       for n, p in named_params.items()}

    @torch.no_grad()
    def update(self, named_params: dict[str, torch.Tensor], step: int) -> None:
        """Fold the current weights in, on optimizer steps that are multiples of the interval."""
        if step % self.update_interval:
            return
        fp32 = [(self.shadow[n], p.detach()) for n, p in named_params.items()
                if p.dtype == torch.float32]
        if fp32:
            # One multi-tensor launch instead of one per tensor: full fine-tunes have
            # thousands of tensors. Only for fp32 weights, which need no upcast copy.
            shadows, weights = zip(*fp32)
            torch._foreach_lerp_(list(shadows), list(weights), 1 - self.decay)
        for name, param in named_params.items():
            if param.dtype != torch.float32:
                self.shadow[name].lerp_(param.detach().float(), 1 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        """The shadow weights; decay and interval come from the job file, not the checkpoint."""
        return {"shadow": self.shadow}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the shadow weights in place, on the device they already live on."""
        saved = state["shadow"]
        if saved.keys() != self.shadow.keys():
            differ = sorted(saved.keys() ^ self.shadow.keys())
            raise ValueError(f"EMA state does not match the trained weights; names that "
                             f"differ: {differ[:5]}{' ...' if len(differ) > 5 else ''}")
        for name, shadow in self.shadow.items():
            if saved[name].shape != shadow.shape:
                raise ValueError(f"EMA state for {name!r} has shape {tuple(saved[name].shape)}, "
                                 f"the weight has {tuple(shadow.shape)}")
            # A checkpoint is loaded to CPU; the shadow stays where the weights train.
            shadow.copy_(saved[name])

    @torch.no_grad()
    def copy_to(self, named_params: dict[str, torch.Tensor]) -> None:
        """Write the EMA weights into the live parameters."""
        for name, param in named_params.items():
            param.copy_(self.shadow[name])

    @contextmanager
    def swapped_in(self, named_params: dict[str, torch.Tensor]) -> Iterator[None]:
        """The EMA weights in the live parameters for the block, the originals after."""
        with torch.no_grad():
            saved = {n: p.detach().clone() for n, p in named_params.items()}
        self.copy_to(named_params)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in named_params.items():
                    param.copy_(saved[name])
