"""Regional torch.compile: each repeated block of the denoiser compiled on its own.

Compiling the blocks rather than the whole model keeps compile time to one graph per block
kind and shape (blocks of a kind share their code, so a compiled graph is reused by every
block of the same shapes), leaves the family's Python around the blocks (conditioning, LoRA
toggles, checkpoint saving) as it is, and keeps a graph break in one place from costing the
whole model. Off by default (`[speedups] compile_blocks`): bench/RESULTS.md records what it
measures per family.

The UNets' blocks (SDXL, the Stage C prior) are compiled for static shapes. Their blocks
come in many shapes (SDXL's ResnetBlock2D runs at three resolutions with a dozen channel
counts), torch's default turns a block dynamic at the second shape it sees, and inductor's
dynamic-shape kernels for convolutions and group norms are slower than static ones (SDXL:
1.12x with the default, 1.43-1.59x static; bench/RESULTS.md). Each shape gets its own
graph, compiled the first time it runs: SDXL has about 12 ResnetBlock2D shapes per
(resolution, batch, grad mode), so every aspect bucket, validation size and the eval-loss
batch add a dozen graphs, and their first steps are slower. The recompile limit is raised
to fit many buckets; past it a block runs eagerly, with torch's warning. The transformers' blocks
(SD3, Kandinsky 5) keep torch's default: their token counts vary with the bucket and, for
Kandinsky 5, the caption length, where dynamic graphs avoid a recompile per length.
"""

from __future__ import annotations

import torch
from torch import nn

from job.errors import ConfigError
from job.log import get_logger

# The repeated blocks of the families' denoisers (diffusers class names).
BLOCK_CLASSES = frozenset({
    "BasicTransformerBlock", "ResnetBlock2D",                            # SDXL UNet
    "JointTransformerBlock",                                             # SD3 transformer
    "SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock",  # Stage C prior
    "Kandinsky5TransformerEncoderBlock", "Kandinsky5TransformerDecoderBlock",  # Kandinsky 5
})
# A UNet's stages (its down, middle and up blocks): larger regions than its resnet and
# transformer blocks, so less of its Python runs eagerly between compiled graphs.
UNET_STAGE_CLASSES = frozenset({
    "CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn", "CrossAttnUpBlock2D",
    "UpBlock2D",
})
# The UNets' blocks, compiled for static shapes (see above).
STATIC_SHAPE_CLASSES = frozenset({
    "BasicTransformerBlock", "ResnetBlock2D", "SDCascadeResBlock", "SDCascadeTimestepBlock",
    "SDCascadeAttnBlock",
}) | UNET_STAGE_CLASSES
# Graphs per block kind: about 12 per bucket for SDXL's resnets, so room for about 20
# training buckets and validation sizes (each graph compiles only if its shape runs).
RECOMPILE_LIMIT = 256


def check_compiler(device: torch.device, backend: str = "inductor") -> None:
    """The compiler inductor needs on `device`, or exit 2 now rather than at the first
    compiled step: on a GPU, Triton builds its kernel launcher with a C compiler; on the
    CPU, inductor writes C++ kernels."""
    import shutil

    if backend != "inductor":
        return
    if device.type == "cuda":
        names, what = ("cc", "gcc", "clang"), "a C compiler (Triton builds its kernel launcher " \
            "with one)"
        fix = ("install gcc and the Python headers (Debian: apt-get install gcc libc6-dev "
               "python3-dev; the tunejob image has them)")
    else:
        names, what = ("c++", "g++", "clang++"), "a C++ compiler (inductor's CPU kernels are C++)"
        fix = "install g++ (Debian: apt-get install g++ python3-dev)"
    if not any(shutil.which(name) for name in names):
        raise ConfigError(f"speedups.compile_blocks = true on {device.type} needs {what}, and "
                          "none is on PATH",
                          f"{fix}, or set compile_blocks = false")


def apply_regional_compile(denoiser: nn.Module, backend: str = "inductor",
                           classes: frozenset[str] = BLOCK_CLASSES, mode: str | None = None) -> int:
    """Compile every module of `denoiser` whose class is in `classes` (the repeated blocks by
    default) in place, the UNets' for static shapes; returns how many. `mode` is
    torch.compile's (inductor: "reduce-overhead" replays each graph as a CUDA graph)."""
    blocks = [m for m in denoiser.modules() if type(m).__name__ in classes]
    dynamo = torch._dynamo.config
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, limit, max(getattr(dynamo, limit), RECOMPILE_LIMIT))
    for block in blocks:
        static = type(block).__name__ in STATIC_SHAPE_CLASSES
        block.compile(backend=backend, dynamic=False if static else None, mode=mode)
    kinds = sorted({type(m).__name__ for m in blocks})
    get_logger().info("speedup_active", speedup="regional_compile", blocks=len(blocks),
                      kinds=kinds, backend=backend, mode=mode or "default",
                      static_shapes=sorted(set(kinds) & STATIC_SHAPE_CLASSES))
    return len(blocks)
