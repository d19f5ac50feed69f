"""Group offload of a frozen denoiser for training ([speedups] enable_group_offload).

diffusers' group offloading keeps a module's weights in CPU memory and brings each group of
blocks (or each layer) to the GPU just before it runs, optionally prefetching the next
group on a side stream. It was written for inference; two things make it fit training here:

- Trained weights stay out of it. An offload puts back the group's CPU copies (with a
  stream) or moves every tensor of the group's modules, so a LoRA inside a group would lose
  its updates or wander to the CPU with its gradients. After the hooks are applied, each
  group is narrowed to its frozen parameters and its buffers; the LoRA stays on the GPU.
- Memory only falls with gradient checkpointing: autograd keeps the tensors a backward pass
  needs, weights included, so without checkpointing every block's weights stay alive on the
  GPU until the backward pass. Checkpointed blocks save only their inputs; the backward
  pass reruns each block's forward, whose hooks bring its weights back for that block only.
  The config rules warn when checkpointing is off.
"""

from __future__ import annotations

import torch
from torch import nn

from job.config import SpeedupsTable
from job.errors import ConfigError
from job.log import get_logger


def apply_group_offload(module: nn.Module, settings: SpeedupsTable, device: torch.device) -> int:
    """Group-offload `module` (a diffusers ModelMixin whose trained parameters already
    exist) onto `device`; returns the number of groups. Trained parameters end up on
    `device`, outside every group."""
    if settings.group_offload_use_stream and device.type != "cuda":
        raise ConfigError(f"speedups.group_offload_use_stream = true needs a CUDA GPU, and this "
                          f"job runs on {device.type}", "set group_offload_use_stream = false")
    trained = [p for p in module.parameters() if p.requires_grad]
    module.to("cpu")
    kwargs = {"num_blocks_per_group": settings.group_offload_blocks_per_group} \
        if settings.group_offload_type == "block_level" else {}
    module.enable_group_offload(
        onload_device=device, offload_device=torch.device("cpu"),
        offload_type=settings.group_offload_type, use_stream=settings.group_offload_use_stream,
        **kwargs)
    groups = _groups(module)
    for group in groups:
        _frozen_only(group)
    for param in trained:
        param.data = param.data.to(device)
    get_logger().info("speedup_active", speedup="group_offload", groups=len(groups),
                      type=settings.group_offload_type, stream=settings.group_offload_use_stream,
                      trained_on_gpu=len(trained))
    return len(groups)


def _groups(module: nn.Module) -> list:
    """Every ModuleGroup that diffusers' hooks on `module` and its submodules manage."""
    from diffusers.hooks.group_offloading import GroupOffloadingHook
    from diffusers.hooks.hooks import HookRegistry

    seen, groups = set(), []
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        if not isinstance(registry, HookRegistry):
            continue
        for hook in registry.hooks.values():
            if isinstance(hook, GroupOffloadingHook) and id(hook.group) not in seen:
                seen.add(id(hook.group))
                groups.append(hook.group)
    return groups


def _frozen_only(group) -> None:
    """Let the group move only its frozen parameters and its buffers (explicit lists), not
    whole modules, whose parameters include the trained ones."""
    params = [p for m in group.modules for p in m.parameters() if not p.requires_grad]
    params += [p for p in group.parameters if not p.requires_grad]
    buffers = [b for m in group.modules for b in m.buffers()] + list(group.buffers)
    group.modules = []
    group.parameters = list(dict.fromkeys(params))
    group.buffers = list(dict.fromkeys(buffers))
