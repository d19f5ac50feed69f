"""Regional torch.compile: each repeated block of the denoiser compiled on its own.

Compiling the blocks rather than the whole model keeps compile time to one graph per block
kind (the blocks of a kind share their code, so the compiled graph is reused), leaves the
family's Python around the blocks (conditioning, LoRA toggles, checkpoint saving) as it is,
and keeps a graph break in one place from costing the whole model. Off by default
(`[speedups] compile_blocks`): bench/RESULTS.md records what it measures per family.
"""

from __future__ import annotations

from torch import nn

from job.log import get_logger

# The repeated blocks of the families' denoisers (diffusers class names).
BLOCK_CLASSES = frozenset({
    "BasicTransformerBlock", "ResnetBlock2D",                            # SDXL UNet
    "JointTransformerBlock",                                             # SD3 transformer
    "SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock",  # Stage C prior
    "Kandinsky5TransformerEncoderBlock", "Kandinsky5TransformerDecoderBlock",  # Kandinsky 5
})


def apply_regional_compile(denoiser: nn.Module, backend: str = "inductor") -> int:
    """Compile every repeated block of `denoiser` in place; returns how many."""
    blocks = [m for m in denoiser.modules() if type(m).__name__ in BLOCK_CLASSES]
    for block in blocks:
        block.compile(backend=backend)
    kinds = sorted({type(m).__name__ for m in blocks})
    get_logger().info("speedup_active", speedup="regional_compile", blocks=len(blocks),
                      kinds=kinds, backend=backend)
    return len(blocks)
