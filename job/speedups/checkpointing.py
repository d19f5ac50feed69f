"""Selective gradient checkpointing: a share of the denoiser's blocks recompute, the rest
keep their activations ([train] gradient_checkpointing_ratio).

All-or-nothing checkpointing trades the most memory for the most recompute: every block
reruns its forward in the backward pass (about a third more compute). With a ratio r, the
blocks that diffusers would checkpoint are checkpointed at an even spacing in call order
(call i is checkpointed when floor((i + 1) * r) > floor(i * r): r = 0.5 is every other
block, r = 1 every block), so memory and recompute fall between the two ends roughly in
proportion. The numbers do not change: a block computes the same whether or not it is
checkpointed (a test compares the loss and gradients).

It goes through diffusers' own hook: `enable_gradient_checkpointing(func)` makes every block
call `func(block, *args)` in training, and the call order restarts at each forward of the
denoiser (a forward pre-hook resets the count).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint

from job.log import get_logger


class SelectiveCheckpointing:
    """diffusers' gradient_checkpointing_func that checkpoints a share `ratio` of the calls."""

    def __init__(self, ratio: float) -> None:
        if not 0 < ratio <= 1:
            raise ValueError(f"gradient checkpointing ratio must be in (0, 1], got {ratio}")
        self.ratio = ratio
        self.calls = 0
        self.checkpointed = 0

    def restart(self, *_: Any) -> None:
        """A new forward of the denoiser: call order starts again (a forward pre-hook)."""
        self.calls = 0
        self.checkpointed = 0

    def chosen(self, index: int) -> bool:
        """Whether the block call at `index` (0-based, in call order) recomputes."""
        return math.floor((index + 1) * self.ratio) > math.floor(index * self.ratio)

    def __call__(self, block: nn.Module, *args: Any) -> Any:
        index = self.calls
        self.calls += 1
        if not self.chosen(index):
            return block(*args)
        self.checkpointed += 1
        return checkpoint(block.__call__, *args, use_reentrant=False)


def enable_checkpointing(denoiser: nn.Module, ratio: float) -> SelectiveCheckpointing | None:
    """Turn on diffusers' gradient checkpointing for `denoiser`, every block (ratio 1) or an
    evenly spaced share of them; returns the selector (None for every block)."""
    if ratio >= 1:
        denoiser.enable_gradient_checkpointing()
        return None
    selector = SelectiveCheckpointing(ratio)
    denoiser.enable_gradient_checkpointing(gradient_checkpointing_func=selector)
    denoiser.register_forward_pre_hook(selector.restart)
    get_logger().info("speedup_active", speedup="selective_checkpointing", ratio=ratio,
                      note="an evenly spaced share of the blocks recompute in the backward pass")
    return selector

