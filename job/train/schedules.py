"""Learning-rate schedules (diffusers' LambdaLR schedules, whose state round-trips)."""

from __future__ import annotations

import torch

NAMES = ("constant", "constant_with_warmup", "cosine", "linear", "polynomial")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int,
                       total_steps: int, num_cycles: int = 1,
                       power: float = 1.0) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule `[optimizer] lr_scheduler` names, over `total_steps` optimizer steps."""
    from diffusers.optimization import get_scheduler

    if name not in NAMES:
        raise ValueError(f"unknown lr_scheduler {name!r}; expected one of {', '.join(NAMES)}")
    if num_cycles < 1:
        raise ValueError(f"lr_num_cycles must be at least 1, got {num_cycles}")
    if name == "constant":
        # No warmup by definition; check_rules warns when lr_warmup_steps is set with it.
        warmup_steps = 0
    if name == "cosine" and num_cycles > 1:
        # diffusers' "cosine" ignores num_cycles (one half-wave to 0); several cycles are
        # its hard-restart schedule, of which one cycle is exactly plain "cosine".
        name = "cosine_with_restarts"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps,
                         num_training_steps=total_steps, num_cycles=num_cycles, power=power)
