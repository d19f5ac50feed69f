"""Group offload of a frozen denoiser for training ([speedups] enable_group_offload).

diffusers' group offloading keeps a module's weights in CPU memory and brings each group of
blocks (or each layer) to the GPU just before it runs, optionally prefetching the next
group on a side stream. It was written for inference, where a forward pass is all there is.
Training adds a backward pass, and these changes make the hooks fit it:

- Trained weights stay out of it. An offload puts back the group's CPU copies (with a
  stream) or moves every tensor of the group's modules, so a LoRA inside a group would lose
  its updates or wander to the CPU with its gradients. After the hooks are applied, each
  group is narrowed to its frozen parameters and its buffers; the LoRA stays on the GPU.
- Gradient checkpointing is required (the config rules say so). Autograd keeps what a
  backward pass needs: a linear layer saves a view of its weight, which keeps the GPU copy
  alive after the hook has pointed the parameter back at its CPU copy, so without
  checkpointing every block's weights stay on the GPU until the backward pass (and a weight
  saved as itself would move away under its backward). Checkpointed blocks save only their
  inputs.
- In the backward pass, each checkpointed block reruns its forward to recompute what its
  gradients need. That rerun is not a forward pass to the hooks:
  - it loads the block's whole group if it is in CPU memory (blocks rerun in reverse, so a
    group's last block comes first, which diffusers' hooks would not load);
  - it does not offload at its end (torch may stop a rerun early, before any post-forward
    hook, and some saved tensors are the parameters themselves, which must stay on the GPU
    until the block's gradients are done);
  - the group goes back to CPU memory once the gradients of its inputs are computed, or
    of its trained weights where no input needs one (an autograd multi-grad hook set
    during the forward pass; _offload_when_gradients_are_done says why aliases);
  - a rerun group that no gradient flows through (nothing for that hook to wait on) is
    offloaded at the end of its rerun, as in the forward pass;
  - with a stream, a rerun prefetches the group that ran before it in the forward pass,
    which is the next one the backward pass needs (diffusers' prefetch goes the other way).
"""

from __future__ import annotations

from typing import Any

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
    hooks = _hooks(module)
    groups = list({id(hook.group): hook.group for hook in hooks}.values())
    trained_in = {id(group): _trained_params(group) for group in groups}
    for group in groups:
        _frozen_only(group)
    blocks = [hook for hook in hooks if hook.group.offload_leader is not module]
    shared = _Groups(blocks, trained_in)
    for hook in blocks:
        _train_aware(hook, shared)
    for param in trained:
        param.data = param.data.to(device)
    get_logger().info("speedup_active", speedup="group_offload", groups=len(groups),
                      type=settings.group_offload_type, stream=settings.group_offload_use_stream,
                      trained_on_gpu=len(trained))
    return len(groups)


def _hooks(module: nn.Module) -> list:
    """Every GroupOffloadingHook on `module` and its submodules (module first)."""
    from diffusers.hooks.group_offloading import GroupOffloadingHook
    from diffusers.hooks.hooks import HookRegistry

    hooks = []
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        if isinstance(registry, HookRegistry):
            hooks += [hook for hook in registry.hooks.values()
                      if isinstance(hook, GroupOffloadingHook)]
    return hooks


def _trained_params(group) -> list[nn.Parameter]:
    params = [p for m in group.modules for p in m.parameters()] + list(group.parameters)
    return list({id(p): p for p in params if p.requires_grad}.values())


def _frozen_only(group) -> None:
    """Let the group move only its frozen parameters and its buffers (explicit lists), not
    whole modules, whose parameters include the trained ones."""
    params = [p for m in group.modules for p in m.parameters() if not p.requires_grad]
    params += [p for p in group.parameters if not p.requires_grad]
    buffers = [b for m in group.modules for b in m.buffers()] + list(group.buffers)
    group.modules = []
    group.parameters = list(dict.fromkeys(params))
    group.buffers = list(dict.fromkeys(buffers))


def in_backward_pass() -> bool:
    """Whether autograd is running a backward pass on this thread (checkpoint reruns happen
    inside one)."""
    return torch._C._current_graph_task_id() != -1


def _offloaded(group) -> bool:
    """Whether the group's weights are away from its onload device ("cuda" means the
    current CUDA device, as in .to("cuda"))."""
    tensors = group.parameters or group.buffers
    if not tensors:
        return False
    where, home = tensors[0].device, torch.device(group.onload_device)
    if home.type == "cuda" and home.index is None:
        home = torch.device("cuda", torch.cuda.current_device())
    return where != home


class _Groups:
    """What the hooks share: each group's trained parameters, whether its last forward
    pass set a gradient hook to offload it ("armed"), and the forward order."""

    def __init__(self, blocks: list, trained_in: dict[int, list]) -> None:
        self.blocks, self.trained_in = blocks, trained_in
        self.armed: dict[int, bool] = {}
        self._previous: dict[int, Any] = {}

    def previous(self, group) -> Any:
        """The group that ran before `group` in the forward pass (diffusers records the
        order as each hook's next_group during the first forward pass, with a stream)."""
        if not self._previous:
            self._previous = {id(h.next_group): h.group for h in self.blocks
                              if h.next_group is not None}
        return self._previous.get(id(group))


def _train_aware(hook, groups: _Groups) -> None:
    """Replace the hook's pre- and post-forward (through its fn_ref, which diffusers' hook
    registry calls) with versions that know about the backward pass."""
    group, forward_pre, forward_post = hook.group, hook.fn_ref.pre_forward, hook.fn_ref.post_forward

    def pre_forward(module, *args, **kwargs):
        if in_backward_pass():
            if _offloaded(group):
                group.onload_()
            if group.stream is not None:
                group.stream.synchronize()
                previous = groups.previous(group)
                # Only a group whose gradient hook will offload it again.
                if previous is not None and groups.armed.get(id(previous)) \
                        and _offloaded(previous):
                    previous.onload_()
            return args, kwargs
        args, kwargs = forward_pre(module, *args, **kwargs)
        if module is group.onload_leader:
            armed = False
            if torch.is_grad_enabled():
                args, kwargs, armed = _offload_when_gradients_are_done(
                    group, args, kwargs, groups.trained_in[id(group)])
            groups.armed[id(group)] = armed
        return args, kwargs

    def post_forward(module, output):
        if in_backward_pass() and groups.armed.get(id(group)):
            return output  # its gradient hook offloads it
        # Forward pass; or a rerun of a group no gradient flows through (e.g. a leaf_level
        # layer of a rerun block that reads the timestep only), which nothing else offloads.
        return forward_post(module, output)

    hook.fn_ref.pre_forward, hook.fn_ref.post_forward = pre_forward, post_forward


def _offload_when_gradients_are_done(group, args: tuple, kwargs: dict,
                                     trained: list[nn.Parameter]) -> tuple[tuple, dict, bool]:
    """Set an autograd hook that offloads `group` once the backward pass is done with it;
    returns the arguments to call the module with, and whether a hook was set.

    Done means: the gradients of the group's first module's inputs, when some input needs
    one, else those of its trained weights. Inputs are passed on as aliases (views) owned by
    this call: an input such as the text embedding feeds every block, and its own gradient
    is complete only after the last of them, while the alias's gradient is this call's
    share. The trained weights are watched only without such inputs: a batch whose captions
    differ in length runs one forward pass per length, and a weight's gradient is complete
    only after all of them, which would keep every group loaded through the backward pass.
    The training loop follows every forward pass that needs gradients with its backward
    pass; a hook whose forward pass is never back-propagated stays registered."""
    def alias(value):
        return value.view_as(value) if isinstance(value, torch.Tensor) \
            and value.requires_grad else value

    args = tuple(alias(value) for value in args)
    kwargs = {key: alias(value) for key, value in kwargs.items()}
    watched = [t for t in (*args, *kwargs.values())
               if isinstance(t, torch.Tensor) and t.requires_grad] or trained
    if not watched:
        return args, kwargs, False
    handle = None

    def done(_grads) -> None:
        handle.remove()
        group.offload_()

    handle = torch.autograd.graph.register_multi_grad_hook(watched, done, mode="all")
    return args, kwargs, True
