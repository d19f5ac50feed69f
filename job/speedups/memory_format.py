"""channels_last memory format for convolutional denoisers ([speedups] channels_last).

cuDNN runs convolutions on tensor cores in NHWC; with NCHW weights each convolution pays
for layout transposes. The 4-D weights are converted once; activations follow the weights'
format through the convolutions. The numbers are the same (a test compares the loss and
gradients); whether it is faster is measured per family (bench/RESULTS.md). It is applied
before the LoRA exists: a LoRA on convolutions (not the default targets) keeps the default
layout for its own small weights.
"""

from __future__ import annotations

import torch
from torch import nn

from job.log import get_logger


def apply_channels_last(denoiser: nn.Module) -> int:
    """Convert `denoiser`'s 4-D parameters to channels_last in place; returns how many."""
    count = sum(1 for p in denoiser.parameters() if p.dim() == 4)
    denoiser.to(memory_format=torch.channels_last)
    get_logger().info("speedup_active", speedup="channels_last", conv_weights=count)
    return count
