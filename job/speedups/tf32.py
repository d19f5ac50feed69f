"""TF32 matmuls and convolutions on Ampere and newer GPUs."""

from __future__ import annotations

import torch

from job.config import SpeedupsTable
from job.log import get_logger


def apply_tf32(family, settings: SpeedupsTable) -> bool:
    """Allow TF32 where the GPU has it; returns whether it is active."""
    if not settings.allow_tf32 or not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability()[0] < 8:
        get_logger().info("speedup_skipped", speedup="tf32", reason="GPU older than Ampere")
        return False
    # fp32 matmuls keep 10 mantissa bits; training losses are insensitive to it and
    # the fp32 parts (LoRA weights, optimizer math) get tensor-core speed.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    get_logger().info("speedup_active", speedup="tf32")
    return True
