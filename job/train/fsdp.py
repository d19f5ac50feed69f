"""FSDP2 (`[distributed] strategy = "fsdp2"`): a full fine-tune's denoiser sharded over the
processes with torch's composable `fully_shard`, so each GPU holds 1/N of the trained
weights, their gradients and the optimizer state.

Units: each of the denoiser's repeated blocks (the block classes regional compile uses,
job/speedups/compile.py) is sharded on its own, then the root denoiser, which keeps the rest
(embeddings, input and output layers). A block's weights are all-gathered just before its
forward and freed after it (gathered again for its backward); its gradients are
reduce-scattered and averaged over ranks as its backward ends, while the next block computes.
The loop then skips its own gradient all-reduce (job/train/distributed.py).

Mixed precision: MixedPrecisionPolicy(reduce_dtype=float32) and nothing else. The weights
stay in their trained dtype (fp32 master weights, bf16 with adamw_bf16) when gathered, and the
family's autocast casts them per op in train.mixed_precision's dtype, as with one process:
a run on N processes computes what one process computes with the N-times batch. Gradients are
summed over ranks in fp32. Gathering in bf16 (param_dtype) would halve the all-gather traffic,
but it rounds weights that autocast keeps in fp32 (normalisations); not measured yet.

Gradient accumulation: every micro-step's backward reduce-scatters, and the sharded
gradients add up. Skipping the reduction until the last micro-step
(set_requires_gradient_sync(False)) would save communication but keep a full-size fp32
gradient on every GPU between micro-steps (32 GB for SD3.5 Large's 8B weights), against
the reason to shard.

Gradient clipping and the non-finite check use the full norm over all shards
(distributed.clip_gradients). EMA works on the local shards: its shadow weights are sharded
like the weights, and are saved and resumed with them.

Checkpoints are sharded, written with torch.distributed.checkpoint (DCP) into the
checkpoint's `dcp/` folder by every rank (checkpoint.CheckpointManager.save_together); DCP
reshards on load, so a checkpoint resumes on another number of processes, also on one
process without FSDP. Validation samples on every rank (a sharded forward needs every rank's
all-gather); rank 0 writes. The final weights are gathered to rank 0's CPU and exported by
the family from an unsharded copy of the denoiser.

Not yet: the denoiser is loaded whole onto every GPU before it is sharded, so its weights
(not its training state) must fit one GPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from job.log import get_logger
from job.speedups.compile import BLOCK_CLASSES
from job.train import distributed

# The checkpoint's folder of DCP files (every rank's shards and DCP's .metadata).
SHARDED_DIR = "dcp"


def apply_fsdp2(denoiser: nn.Module, device: torch.device) -> int:
    """Shard `denoiser` in place over every process: each repeated block, then the root.
    Returns the number of sharded blocks. After regional compile (torchtitan's order: the
    compiled blocks are what gets sharded) and before the optimizer is built on the
    now-sharded parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    world = distributed.topology().world
    mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    # Children before parents: a block nested in another block is its own unit.
    blocks = [m for m in reversed(list(denoiser.modules())) if type(m).__name__ in BLOCK_CLASSES]
    kinds = sorted({type(b).__name__ for b in blocks})
    # Every unit, the root too, frees its gathered weights after forward. A root kept
    # gathered would outlive a forward without backward (validation, the eval loss) and
    # then miss what changes the shards before the next forward (the EMA swap-out).
    for module in (*blocks, denoiser):
        fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    get_logger().info("fsdp2_active", processes=world, blocks=len(blocks), kinds=kinds,
                      reduce_dtype="float32")
    return len(blocks)


def is_sharded(module: nn.Module) -> bool:
    """Whether `module` was sharded by apply_fsdp2."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer,
           ema_shadow: dict[str, torch.Tensor] | None) -> dict:
    """DCP's view of the trained state: weights and optimizer state keyed by parameter name
    (the same keys sharded or not), and the EMA shadow if any."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": weights, "optimizer": optimizer_state}
    if ema_shadow is not None:
        state["ema"] = ema_shadow
    return state


def save_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 ema_shadow: dict[str, torch.Tensor] | None) -> None:
    """Every rank writes its shards into folder/dcp (a collective; DCP raises a failure of
    any rank on every rank)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(model, optimizer, ema_shadow), checkpoint_id=str(folder / SHARDED_DIR))


def has_ema(folder: Path) -> bool:
    """Whether the sharded checkpoint in `folder` holds EMA weights."""
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(folder / SHARDED_DIR)).read_metadata().state_dict_metadata
    return any(k.startswith("ema.") for k in keys)


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 ema_shadow: dict[str, torch.Tensor] | None) -> None:
    """Load folder/dcp into the model, optimizer and EMA shadow (in place), sharded or not,
    on any number of processes: DCP reads the pieces each rank's shards need."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _state(model, optimizer, ema_shadow if has_ema(folder) else None)
    dcp.load(state, checkpoint_id=str(folder / SHARDED_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


def gather_full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole denoiser's weights, unsharded, in rank 0's CPU memory ({} on the other
    ranks). A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def unsharded_copy(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A plain module of the sharded `model`'s diffusers class with `weights` (from
    gather_full_weights), on the CPU: what the family's export saves. Built without
    allocating weights of its own; buffers the state dict lacks are computed as usual."""
    from accelerate import init_empty_weights
    from torch.distributed.fsdp import FSDPModule

    # fully_shard swaps the module's class for a subclass of FSDPModule and the original.
    original = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with init_empty_weights(include_buffers=False):
        copy = original.from_config(model.config)
    copy.load_state_dict(weights, strict=True, assign=True)
    return copy.eval()
