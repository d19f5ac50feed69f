"""Regional torch.compile: each repeated block of the denoiser compiled on its own.

Compiling the blocks rather than the whole model keeps compile time to one graph per block
kind and shape (blocks of a kind share their code, so a compiled graph is reused by every
block of the same shapes), leaves the family's Python around the blocks (conditioning, LoRA
toggles, checkpoint saving) as it is, and keeps a graph break in one place from costing the
whole model. Off by default (`[speedups] compile_blocks`): bench/RESULTS.md records what it
measures per family. `compile_blocks = "auto"`, the default, turns it on with a CUDA GPU
and a C compiler (`resolve_auto`).

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

With `[speedups] cuda_graphs` on a CUDA GPU the static-shape blocks replay as CUDA graphs
(inductor's "reduce-overhead" mode): SDXL's compiled step launches about 10k kernels, and
without graphs it waits on the CPU launching them (264 ms per step for 179 ms of kernels,
and its speed followed the host's: 1.13-1.59x; with graphs 2.18x, bench/RESULTS.md).
`cuda_graphs = "auto"` turns it on where GPU runs showed it: SDXL fine-tuning, and the Stage
C prior in bf16 without checkpointing (lite 2.14x the plain step with graphs, 1.42x without,
in one call); with gradient checkpointing the blocks that recompute do it inside their
graphs, which replay too.
torch's CUDA graph trees keep one recording per block, shape and grad mode, and reuse a
graph's output memory at the next "generation": the trainer starts one per optimizer step
(`begin_step`) and, in eval mode, every denoiser call starts one (validation sampling).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import MethodType
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

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
# The [speedups] settings that default to "auto" (resolve_auto decides them; summary.json
# records the decisions).
AUTO_SETTINGS = ("compile_blocks", "channels_last", "cuda_graphs", "fp32_attention")
# Set once any denoiser's blocks replay as CUDA graphs (begin_step marks then).
_graphs = False
# The TORCHINDUCTOR_CACHE_DIR use_compile_cache last set (a later job of the process resets it).
_cache_set: str | None = None


def _compiler_missing(device: torch.device) -> tuple[str | None, str]:
    """What inductor needs on `device` and this machine lacks (None: nothing), and the fix.
    On a GPU, Triton builds its kernel launcher with a C compiler and the Python headers;
    on the CPU, inductor writes C++ kernels against the same headers."""
    import shutil
    import sysconfig
    from pathlib import Path

    if device.type == "cuda":
        compilers = ("cc", "gcc", "clang")
        what = "a C compiler (Triton builds its kernel launcher with one)"
        fix = ("install gcc and the Python headers (Debian: apt-get install gcc libc6-dev "
               "python3-dev; the tunejob image has them)")
    else:
        compilers = ("c++", "g++", "clang++")
        what = "a C++ compiler (inductor's CPU kernels are C++)"
        fix = "install g++ and the Python headers (Debian: apt-get install g++ python3-dev)"
    if not any(shutil.which(name) for name in compilers):
        return f"{what}, and none is on PATH", fix
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not header.is_file():
        return f"the Python headers, and {header} is missing", fix
    return None, fix


def use_compile_cache(cfg) -> str | None:
    """Point inductor's cache (its FX graphs, and Triton's kernels under it) at the job's
    cache volume, <cache.dir>/compile, when compile_blocks is on; returns the folder in use
    (None: torch's default, under /tmp, which a new container starts without).

    A preempted job's retry, or the next job of the same model, then finds the kernels an
    earlier run compiled: the tiny smoke job's training phase took 143-153 s with an empty
    cache and 9.2 s with the first run's, on a 2-core CPU. Inductor writes its graphs and
    Triton's kernels under temp names and renames them (its CPU C++ builds write their
    library in place), and its keys hold the torch version, the device and the graph, so
    nothing stale is taken. A TORCHINDUCTOR_CACHE_DIR the user set wins; torch reads the
    variable at each compile, and every compile comes after this call."""
    global _cache_set
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    log = get_logger()
    if not cfg.speedups.compile_blocks:
        return None
    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # Set by the user, not by torch (its default) or by an earlier job of this process.
    if given and given not in (_cache_set, os.path.abspath(default_cache_dir())):
        log.info("compile_cache", path=given, source="TORCHINDUCTOR_CACHE_DIR")
        return given
    if given and given == _cache_set:
        del os.environ["TORCHINDUCTOR_CACHE_DIR"]  # an earlier job's folder is not this one's
    if not cfg.cache.compile_kernels:
        return None
    folder = Path(cfg.cache.dir) / "compile"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _check_folder(folder)
    except OSError as err:
        log.warning("compile_cache_off", path=str(folder), reason=str(err),
                    note="kernels are compiled into /tmp and lost with the container")
        return None
    _cache_set = os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder.resolve())
    log.info("compile_cache", path=_cache_set, source="cache.compile_kernels",
             note="kernels compiled by earlier runs of this torch on this device are reused")
    return _cache_set


def _check_folder(folder: Path) -> None:
    """Raise OSError unless inductor's cache can work in `folder`: it loads compiled
    libraries from it (Triton's launchers, the CPU kernels), which a noexec mount refuses,
    and it locks its entries with flock, which some FUSE mounts of object stores refuse.
    Each process probes a file of its own, so ranks starting together do not collide."""
    import fcntl

    from job.atomic import temp_name

    if os.statvfs(folder).f_flag & os.ST_NOEXEC:
        raise OSError(f"{folder} is on a noexec mount, and compiled kernels are loaded from it")
    probe = temp_name(folder / "lock-probe")
    try:
        with open(probe, "w") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    finally:
        probe.unlink(missing_ok=True)


def check_compiler(device: torch.device, backend: str = "inductor") -> None:
    """The compiler inductor needs on `device`, or exit 2 now rather than at the first
    compiled step."""
    if backend != "inductor":
        return
    missing, fix = _compiler_missing(device)
    if missing:
        raise ConfigError(f"speedups.compile_blocks = true on {device.type} needs {missing}",
                          f"{fix}, or set compile_blocks = false")


def resolve_auto(cfg, device: torch.device) -> None:
    """Decide `[speedups]` compile_blocks, cuda_graphs, channels_last and fp32_attention
    (on: "fp16_flash", off: "sdpa") where they are "auto" (their defaults) for this job on
    `device`, in place, and log the decisions in one `speedup_auto` line (setting: "on" or
    "off: why"; fp32_attention only for an fp32 job of sdxl or Stage C); then check the
    compiler that compile_blocks needs (exit 2 without it). Every process of a job decides
    alike (same settings, same kind of machine)."""
    s, decided = cfg.speedups, {}
    if s.compile_blocks == "auto":
        off = _auto_compile_off_because(cfg, device)
        s.compile_blocks = off is None
        decided["compile_blocks"] = off
    if s.channels_last == "auto":
        # NHWC pays only under compile: eager group norm copies it (SDXL eager: 0.88x).
        # FSDP2 shards contiguous weights only.
        off = "fsdp2 shards contiguous weights only" if cfg.distributed.strategy == "fsdp2" \
            else None if s.compile_blocks else "follows compile_blocks (eager: slower)"
        s.channels_last = off is None
        decided["channels_last"] = off
    if s.cuda_graphs == "auto":
        off = "compile_blocks is off" if not s.compile_blocks else \
            "no CUDA GPU" if device.type != "cuda" else _auto_graphs_off_because(cfg)
        s.cuda_graphs = off is None
        decided["cuda_graphs"] = off
    if s.fp32_attention == "auto":
        from job.speedups.attention import fp16_flash_auto_off_because

        off = fp16_flash_auto_off_because(cfg, device)
        s.fp32_attention = "fp16_flash" if off is None else "sdpa"
        if off != "":  # "": the choice cannot matter (no fp32 attention of its blocks)
            decided["fp32_attention"] = off
    if decided:
        get_logger().info("speedup_auto", **{key: "on" if off is None else f"off: {off}"
                                             for key, off in decided.items()})
    if s.compile_blocks:
        check_compiler(device)
        return
    if cfg.train.activation_memory_budget is not None:
        raise ConfigError(f"train.activation_memory_budget = "
                          f"{cfg.train.activation_memory_budget} needs compile_blocks, which "
                          f"auto turned off here ({decided.get('compile_blocks')})",
                          "set speedups.compile_blocks = true, or remove "
                          "activation_memory_budget")


def _auto_compile_off_because(cfg, device: torch.device) -> str | None:
    """Why compile_blocks = "auto" is off for this job (None: on)."""
    if device.type != "cuda":
        return "no CUDA GPU (measured on GPUs only; compile_blocks = true compiles for the CPU)"
    missing, fix = _compiler_missing(device)
    if missing:
        return f"it needs {missing}: {fix} for the speedup"
    if cfg.speedups.base_model_precision != "no_change":
        return "a quantised base: not measured compiled (compile_blocks = true to try)"
    if cfg.speedups.enable_group_offload:
        return "group offload: not measured compiled (compile_blocks = true to try)"
    if cfg.distributed.strategy == "fsdp2":
        return "fsdp2: not measured compiled on GPUs (compile_blocks = true to try)"
    return None


def _auto_graphs_off_because(cfg) -> str | None:
    """Why cuda_graphs = "auto" is off for this job (None: on where it applies). On where a
    GPU run showed it: SDXL fine-tuning (step 2.18x, 3.9x with checkpointing; the whole job;
    tests/test_gpu_cuda_graphs.py) and the Stage C prior in bf16 without checkpointing."""
    t, s, to_try = cfg.train, cfg.speedups, "not measured on a GPU (cuda_graphs = true to try)"
    if cfg.model.family == "stable_cascade":
        # bench/RESULTS.md, session 8: lite, bf16, checkpointing: 155.2 ms with graphs,
        # 156.4 without (the recompute doubles each block's kernels, so launches matter less).
        # Session 11, one call: lite, bf16, no checkpointing: 122.9 ms with graphs, 181.4
        # without (2.14x and 1.42x the plain step; without graphs the step waits on launches).
        if t.gradient_checkpointing:
            return ("the Stage C prior with gradient checkpointing: no gain measured on a GPU "
                    "(cuda_graphs = true to try)")
        if t.mixed_precision != "bf16":
            return f"the Stage C prior in {t.mixed_precision!r} precision: {to_try}"
    elif cfg.model.family != "sdxl":
        return f"family {cfg.model.family!r}: {to_try}"
    if cfg.distillation.method != "none":
        return f"distillation: {to_try}"
    if cfg.model.model_type != "lora":
        return f"a full fine-tune: {to_try}"
    if s.base_model_precision != "no_change":
        return f"a quantised base: {to_try}"
    if t.gradient_checkpointing and t.gradient_checkpointing_ratio < 1:
        return f"gradient_checkpointing_ratio < 1: {to_try}"
    return None


def cuda_graphs_off_because(cfg, device: torch.device) -> str | None:
    """Why `[speedups] cuda_graphs` (decided, see resolve_auto) does not apply to this job
    on `device` (None: it does)."""
    if not cfg.speedups.cuda_graphs:
        return "speedups.cuda_graphs = false"
    if device.type != "cuda":
        return "no CUDA GPU"
    if cfg.speedups.enable_group_offload:
        return "group offload moves the blocks' weights during the step"
    if cfg.distributed.strategy == "fsdp2":
        return "fsdp2 gathers the blocks' weights into fresh memory for every forward"
    return None


def apply_regional_compile(denoiser: nn.Module, backend: str = "inductor",
                           classes: frozenset[str] = BLOCK_CLASSES, mode: str | None = None,
                           cuda_graphs: bool = False, recompute_inside: float = 0.0,
                           memory_budget: float | None = None) -> int:
    """Compile every module of `denoiser` whose class is in `classes` (the repeated blocks by
    default) in place, the UNets' for static shapes; returns how many. `mode` is
    torch.compile's for every block; `cuda_graphs` gives the static-shape blocks inductor's
    "reduce-overhead" mode, which replays each graph as a CUDA graph (the DiTs' blocks keep
    dynamic shapes, which CUDA graphs would record once per shape). `recompute_inside`: the
    denoiser has gradient checkpointing on with this ratio (0: off), and the checkpoint of
    the UNets' compiled blocks goes inside them (see `_recompute_inside`; the DiTs' blocks
    keep diffusers' checkpoint around them, measured at 1.68x for SD3.5 Medium).
    `memory_budget`: torch's activation memory budget for the compiled graphs (the share of
    their activations kept for backward, the partitioner recomputing the cheapest rest; a
    process-wide torch setting, read when each graph compiles)."""
    blocks = [m for m in denoiser.modules() if type(m).__name__ in classes]
    if memory_budget is not None:
        import torch._functorch.config as functorch_config

        functorch_config.activation_memory_budget = memory_budget
    static = [b for b in blocks if type(b).__name__ in STATIC_SHAPE_CLASSES]
    inside = _recompute_inside(denoiser, static, recompute_inside) if recompute_inside else []
    dynamo = torch._dynamo.config
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, limit, max(getattr(dynamo, limit), RECOMPILE_LIMIT))
    if cuda_graphs:
        _allow_graph_per_block()
        denoiser.register_forward_pre_hook(_new_generation_when_sampling)
        global _graphs
        _graphs = True
    # With checkpointing the static-shape blocks that recompute do it inside their own
    # graphs, so they replay like the rest.
    graphed = {id(b) for b in static} if cuda_graphs else set()
    for block in blocks:
        static = type(block).__name__ in STATIC_SHAPE_CLASSES
        block_mode = "reduce-overhead" if id(block) in graphed else mode
        block.compile(backend=backend, dynamic=False if static else None, mode=block_mode)
    kinds = sorted({type(m).__name__ for m in blocks})
    static_kinds = sorted(set(kinds) & STATIC_SHAPE_CLASSES)
    get_logger().info("speedup_active", speedup="regional_compile", blocks=len(blocks),
                      kinds=kinds, backend=backend, mode=mode or "default",
                      static_shapes=static_kinds,
                      cuda_graphs=sorted({type(b).__name__ for b in blocks if id(b) in graphed}),
                      recompute_inside=sorted({type(b).__name__ for b in inside}),
                      blocks_recomputing_inside=len(inside), activation_memory_budget=memory_budget)
    return len(blocks)


def _recompute_inside(denoiser: nn.Module, blocks: list[nn.Module],
                      ratio: float) -> list[nn.Module]:
    """Gradient checkpointing inside the compiled blocks instead of around them; returns
    the blocks that recompute.

    diffusers checkpoints a block by calling `checkpoint(block, ...)` from its parent, so a
    compiled block runs its whole compiled forward a second time during backward, launched
    kernel by kernel from eager autograd (SDXL: 0.95x the plain checkpointed step, bench/
    RESULTS.md). Here each block's own forward calls the checkpoint, which torch.compile
    traces into the block's graph: the backward graph then holds the recomputation with
    the gradients, compiled and fused together, and the parent calls the block directly.
    With a ratio below 1 (selective checkpointing) an evenly spaced share of `blocks`, in
    module order, recomputes (`SelectiveCheckpointing.chosen`; module order differs from
    call order only in where the share falls), and the others keep their activations.
    Blocks outside `blocks` (the DiTs') keep the checkpoint function the family set up
    (diffusers' checkpoint, or the selective one). The numbers are the same (tests/
    test_compile.py); dropout masks (the released Stage C prior's blocks) are drawn once and
    replayed in the recompute by torch's partitioner, which a finite-difference check of
    the gradients shows."""
    from job.speedups.checkpointing import SelectiveCheckpointing

    ours = {id(block) for block in blocks}
    before = next((m._gradient_checkpointing_func for m in denoiser.modules()
                   if getattr(m, "gradient_checkpointing", False)
                   and hasattr(m, "_gradient_checkpointing_func")), None)

    def around(block: nn.Module, *args: Any) -> Any:
        return checkpoint(block, *args, use_reentrant=False)

    outside = before or around

    def call(block: nn.Module, *args: Any) -> Any:
        if id(block) in ours:
            return block(*args)
        return outside(block, *args)

    denoiser.enable_gradient_checkpointing(gradient_checkpointing_func=call)
    chosen = SelectiveCheckpointing(min(ratio, 1.0)).chosen
    recomputing = [block for index, block in enumerate(blocks) if chosen(index)]
    for block in recomputing:
        recompute_in_own_graph(block)
    return recomputing


def recompute_in_own_graph(block: nn.Module) -> None:
    """Make `block`'s forward checkpoint itself (`_checkpointed_forward`), so that compiled,
    its recompute is inside its own graph. The class's forward is bound here: dynamo cannot
    trace `type(block).forward` when diffusers marks the class allow_in_graph
    (BasicTransformerBlock), and broke the block's graph there (its checkpoint and recompute
    then ran eagerly)."""
    block._class_forward = MethodType(type(block).forward, block)
    block.forward = MethodType(_checkpointed_forward, block)


def _checkpointed_forward(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A block's forward, recomputed in backward when a gradient will flow through it (one
    function for every block, so the blocks of a kind share their compiled graph). A block
    with no trainable weight and no input that needs a gradient (the first blocks of a LoRA
    on attention only) has no backward: it runs plainly, and compiles as an inference graph,
    where torch cannot recompute random ops (dropout). These checks run while dynamo
    traces, as guards, not per call."""
    forward = block._class_forward
    if torch.is_grad_enabled() and _needs_grad(block, args, kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def _needs_grad(block: nn.Module, args: tuple, kwargs: dict) -> bool:
    inputs = (*args, *kwargs.values())
    return any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs) \
        or any(p.requires_grad for p in block.parameters())


def begin_step() -> None:
    """Start a training step's CUDA graph generation (the trainer calls it before each
    optimizer step's first forward; a no-op without cuda_graphs). One generation holds
    every micro-batch's forward and backward of the step, so the graphs' outputs that the
    step still uses (activations saved for backward, gradients being accumulated) are not
    overwritten by a later replay; the next step's mark releases them (torch's advice:
    `torch.compiler.cudagraph_mark_step_begin`). Left to itself, torch 2.11 started new
    generations inside a training forward and failed on an overwritten residual."""
    if _graphs:
        torch.compiler.cudagraph_mark_step_begin()


def _new_generation_when_sampling(denoiser: nn.Module, args) -> None:
    """Each call of the denoiser in eval mode (validation's loss and sampling) is its own
    generation: the sampler keeps only the UNet's final output, which its last layers
    compute outside the graphs. In training mode the step's mark covers every call (a
    distillation step calls the denoiser several times before one backward)."""
    if not denoiser.training:
        torch.compiler.cudagraph_mark_step_begin()


def _allow_graph_per_block() -> None:
    """Blocks of one kind share a compiled graph but not their weights, and a CUDA graph
    is recorded for fixed weight addresses: inductor records one graph per block, and
    falls back to running a function without graphs after 128 such recordings. SDXL has
    70 transformer and 40 resnet blocks, each recorded per shape and grad mode."""
    import torch._inductor.config as inductor

    triton = inductor.triton
    triton.cudagraph_unexpected_rerecord_limit = max(
        triton.cudagraph_unexpected_rerecord_limit, 64 * RECOMPILE_LIMIT)
