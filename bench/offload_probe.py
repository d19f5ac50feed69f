"""Where the weights live around a group-offloaded LoRA training step (diagnostic).

    python bench/offload_probe.py     (CUDA; prints GiB allocated at each point)
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kandinsky5_step import LITE, job_config, make_batch, make_transformer  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from job.models.kandinsky5 import Kandinsky5Family  # noqa: E402
from job.speedups.offload import apply_group_offload  # noqa: E402


def gib() -> float:
    return round(torch.cuda.memory_allocated() / 2**30, 2)


for stream in (False, True):
    config = dict(LITE, num_visual_blocks=10)
    args = type("A", (), {"rank": 16, "tiny": False})()
    cfg = job_config(args, "offload", torch.bfloat16)
    cfg.speedups.group_offload_use_stream = stream
    device = torch.device("cuda")
    t = make_transformer(config, device, torch.bfloat16)
    t.enable_gradient_checkpointing()
    points = {"built": gib()}
    family = Kandinsky5Family.around(cfg, t, FlowMatchEulerDiscreteScheduler(), device,
                                     torch.bfloat16)
    family.add_lora()
    apply_group_offload(t, cfg.speedups, device)
    points["offloaded"] = gib()
    points["gpu_params"] = sum(p.numel() for p in t.parameters() if p.is_cuda) / 1e6
    batch = make_batch(config, 1, 1024, 256, device)
    torch.cuda.reset_peak_memory_stats()
    loss = family.training_loss(batch, torch.Generator().manual_seed(0)).mean()
    points["after_forward"] = gib()
    points["gpu_params_after_forward"] = sum(p.numel() for p in t.parameters() if p.is_cuda) / 1e6
    loss.backward()
    points["after_backward"] = gib()
    points["peak"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print({"stream": stream, **points}, flush=True)
    del t, family, loss
    torch.cuda.empty_cache()
