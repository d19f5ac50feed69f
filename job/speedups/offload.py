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
  backward pass needs, and a saved weight keeps its GPU storage alive after the hook has
  pointed the parameter back at its CPU copy, so without checkpointing every block's weights
  stay on the GPU until the backward pass. Checkpointed blocks save only their inputs.
- In the backward pass, each checkpointed block reruns its forward to recompute what its
  gradients need. That rerun is not a forward pass to the hooks:
  - it loads the block's whole group if it is in CPU memory (blocks rerun in reverse, so a
    group's last block comes first, which diffusers' hooks would not load);
  - it does not offload at its end (torch may stop a rerun early, before any post-forward
    hook, and some saved tensors are the parameters themselves, which must stay on the GPU
    until the block's gradients are done);
  - the group goes back to CPU memory once the gradients of its inputs and of its trained
    weights are computed (an autograd multi-grad hook, set during the forward pass, on
    aliases of the inputs: an input shared by all blocks, such as the text embedding, has
    its own gradient complete only after the last block);
  - with a stream, a rerun prefetches the group that ran before it in the forward pass,
    which is the next one the backward pass needs (diffusers' prefetch goes the other way).
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
    hooks = _hooks(module)
    groups = list({id(hook.group): hook.group for hook in hooks}.values())
    trained_in = {id(group): _trained_params(group) for group in groups}
    for group in groups:
        _frozen_only(group)
    blocks = [hook for hook in hooks if hook.group.offload_leader is not module]
    for hook in blocks:
        _train_aware(hook, blocks, trained_in)
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


def _train_aware(hook, blocks: list, trained_in: dict[int, list]) -> None:
    """Replace the hook's pre- and post-forward (through its fn_ref, which diffusers' hook
    registry calls) with versions that know about the backward pass."""
    group, forward_pre, forward_post = hook.group, hook.fn_ref.pre_forward, hook.fn_ref.post_forward

    def previous_group():
        """The group that ran before this one in the forward pass (diffusers records the
        order as each hook's next_group during the first forward pass, with a stream)."""
        for other in blocks:
            if other.next_group is group and trained_in[id(other.group)]:
                return other.group
        return None

    def pre_forward(module, *args, **kwargs):
        if in_backward_pass():
            if _offloaded(group):
                group.onload_()
            if group.stream is not None:
                group.stream.synchronize()
                previous = previous_group()
                if previous is not None and _offloaded(previous):
                    previous.onload_()
            return args, kwargs
        args, kwargs = forward_pre(module, *args, **kwargs)
        if torch.is_grad_enabled() and module is group.onload_leader:
            args, kwargs = _offload_when_gradients_are_done(group, args, kwargs,
                                                            trained_in[id(group)])
        return args, kwargs

    def post_forward(module, output):
        if in_backward_pass():
            return output
        return forward_post(module, output)

    hook.fn_ref.pre_forward, hook.fn_ref.post_forward = pre_forward, post_forward


def _offload_when_gradients_are_done(group, args: tuple, kwargs: dict,
                                     trained: list[nn.Parameter]) -> tuple[tuple, dict]:
    """Offload `group` once the backward pass has computed its first module's input
    gradients and its trained weights' gradients: then nothing in the group is needed.

    Inputs that need a gradient are passed on as aliases (views) owned by this call: an
    input such as the text embedding feeds every block, and its own gradient is complete
    only after the last of them, while the alias's gradient is this block's share.
    Returns the arguments to call the module with."""
    def alias(value):
        return value.view_as(value) if isinstance(value, torch.Tensor) \
            and value.requires_grad else value

    args = tuple(alias(value) for value in args)
    kwargs = {key: alias(value) for key, value in kwargs.items()}
    watched = [t for t in (*args, *kwargs.values())
               if isinstance(t, torch.Tensor) and t.requires_grad] + trained
    if not watched:
        return args, kwargs
    handle = None

    def done(_grads) -> None:
        handle.remove()
        group.offload_()

    handle = torch.autograd.graph.register_multi_grad_hook(watched, done, mode="all")
    return args, kwargs
