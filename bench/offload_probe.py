"""Where the weights are around a group-offloaded LoRA training step (diagnostic).

    python bench/offload_probe.py [--blocks 10]    (CUDA; prints one JSON line per mode)

For each mode (no offload, synchronous offload, streamed offload) on a random Kandinsky 5
Lite transformer cut to --blocks visual blocks: GiB allocated after the forward pass and
after the backward pass, the frozen weights on the GPU at those points (GiB), how many
groups were offloaded during the backward pass, and the peak of the step.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kandinsky5_step import LITE, job_config, make_batch, make_transformer  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.hooks.group_offloading import ModuleGroup  # noqa: E402
from job.models.kandinsky5 import Kandinsky5Family  # noqa: E402
from job.speedups.offload import apply_group_offload  # noqa: E402


def gib(n: float) -> float:
    return round(n / 2**30, 2)


def frozen_on_gpu(model) -> float:
    return gib(sum(p.numel() * p.element_size() for p in model.parameters()
                   if p.is_cuda and not p.requires_grad))


offloads = {"n": 0}
loaded: dict[int, bool] = {}
most = {"groups": 0, "at_gib": 0.0}
original_onload, original_offload = ModuleGroup.onload_, ModuleGroup.offload_


def note_loaded() -> None:
    count = sum(loaded.values())
    if count > most["groups"]:
        most.update(groups=count, at_gib=gib(torch.cuda.memory_allocated()))


def tracking_onload(group):
    original_onload(group)
    loaded[id(group)] = True
    note_loaded()


def tracking_offload(group):
    offloads["n"] += 1
    original_offload(group)
    loaded[id(group)] = False


ModuleGroup.onload_, ModuleGroup.offload_ = tracking_onload, tracking_offload
parser = argparse.ArgumentParser()
parser.add_argument("--blocks", type=int, default=10)
cli = parser.parse_args()
for mode in ("none", "sync", "stream"):
    config = dict(LITE, num_visual_blocks=cli.blocks)
    args = type("A", (), {"rank": 16, "tiny": False})()
    cfg = job_config(args, "offload-stream" if mode == "stream" else "offload", torch.bfloat16)
    device = torch.device("cuda")
    model = make_transformer(config, device, torch.bfloat16)
    model.enable_gradient_checkpointing()
    family = Kandinsky5Family.around(cfg, model, FlowMatchEulerDiscreteScheduler(), device,
                                     torch.bfloat16)
    family.add_lora()
    if mode != "none":
        apply_group_offload(model, cfg.speedups, device)
    batch = make_batch(config, 1, 1024, 256, device)
    out = {"mode": mode, "blocks": cli.blocks, "weights_gib": gib(
        sum(p.numel() * p.element_size() for p in model.parameters()))}
    for step in range(2):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loss = family.training_loss(batch, torch.Generator().manual_seed(0)).mean()
        torch.cuda.synchronize()
        out[f"s{step}_after_forward"] = gib(torch.cuda.memory_allocated())
        out[f"s{step}_forward_peak"] = gib(torch.cuda.max_memory_allocated())
        out[f"s{step}_frozen_after_forward"] = frozen_on_gpu(model)
        offloads["n"] = 0
        loss.backward()
        torch.cuda.synchronize()
        out[f"s{step}_offloads_in_backward"] = offloads["n"]
        out[f"s{step}_after_backward"] = gib(torch.cuda.memory_allocated())
        out[f"s{step}_frozen_after_backward"] = frozen_on_gpu(model)
        out[f"s{step}_peak"] = gib(torch.cuda.max_memory_allocated())
        out[f"s{step}_most_groups_loaded"] = dict(most)
        most.update(groups=0, at_gib=0.0)
        for p in model.parameters():
            p.grad = None
    print(json.dumps(out), flush=True)
    del model, family, loss
    torch.cuda.empty_cache()
