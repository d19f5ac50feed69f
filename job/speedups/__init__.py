"""Optimizations, each an `apply_*` function, applied by `apply_speedups` in one order."""

from __future__ import annotations

from job.config import JobConfig
from job.speedups.tf32 import apply_tf32


def apply_speedups(cfg: JobConfig, family) -> None:
    """Apply the enabled speedups in their documented order.

    Order: numeric modes first (TF32), since later steps (compile, in later versions)
    specialise on them.
    """
    apply_tf32(family, cfg.speedups)
