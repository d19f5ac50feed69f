"""What one Stage C lite block keeps for its backward, with gradient checkpointing: diffusers'
checkpoint around the eager block (the reference step's) against regional compile's recompute
inside the block's graph (tunejob's), with SDPA and with fp32_attention = "fp16_flash".

A diagnostic for the lite fp32 step with checkpointing (bench/RESULTS.md, session 10: ours
36.9 GiB against the reference's 26.6): per block kind and mode, the memory the block holds
between its forward and its backward (beyond its output) and the peak over both, at the lite
prior's width (1536 channels, 24 heads) and the bench's fp32 batch (56, 24x24 latents).

    python bench/stage_c_block_memory.py [--batch 56] [--without-checkpointing] [--tiny]

Prints one JSON line per (block, mode) and writes them to $OUT/block_memory.jsonl when OUT is
set. --tiny runs small blocks on the CPU (memory figures are then null) to check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusers.models.unets.unet_stable_cascade import (  # noqa: E402
    SDCascadeAttnBlock, SDCascadeResBlock, SDCascadeTimestepBlock)

from job.speedups import attention  # noqa: E402
from job.speedups.compile import recompute_in_own_graph  # noqa: E402


def blocks(width: int, heads: int, batch: int, size: int, device: torch.device):
    """(name, block, inputs) of the prior's three block kinds at its dims."""
    x = lambda: torch.randn(batch, width, size, size, device=device,  # noqa: E731
                            requires_grad=True)
    return [
        ("res", lambda: SDCascadeResBlock(width, 0, kernel_size=3, dropout=0.1),
         lambda: (x(),)),
        ("timestep", lambda: SDCascadeTimestepBlock(width, 64, conds=["sca", "crp"]),
         lambda: (x(), torch.randn(batch, 64 * 3, device=device))),
        ("attn", lambda: SDCascadeAttnBlock(width, width, heads, self_attn=True, dropout=0.1),
         lambda: (x(), torch.randn(batch, 85, width, device=device))),
    ]


def prepare(block: torch.nn.Module, mode: str, tiny: bool) -> torch.nn.Module:
    if mode == "reference":  # diffusers' checkpoint around the eager block
        return lambda *args: checkpoint(block, *args, use_reentrant=False)
    block.to(memory_format=torch.channels_last)
    if mode.endswith("fp16_flash"):
        for module in block.modules():
            if hasattr(module, "set_processor"):
                module.set_processor(attention.Fp32AttnProcessor())
    if "nockpt" not in mode:
        recompute_in_own_graph(block)
    torch._dynamo.reset()
    return torch.compile(block, backend="aot_eager_decomp_partition" if tiny else "inductor")


def measure(name: str, make, inputs, mode: str, device: torch.device, tiny: bool) -> dict:
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    with torch.device(device):
        block = make().train()
    call = prepare(block, mode, tiny)
    for _ in range(2):  # compile and warm up
        call(*inputs()).float().sum().backward()
    block.zero_grad(set_to_none=True)
    args = inputs()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    out = call(*args)
    if cuda:
        torch.cuda.synchronize()
    held = (torch.cuda.memory_allocated() - before
            - out.numel() * out.element_size()) if cuda else None
    out.float().sum().backward()
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before if cuda else None
    mib = lambda b: None if b is None else round(b / 2**20, 1)  # noqa: E731
    tensor = args[0].numel() * args[0].element_size()
    return {"block": name, "mode": mode, "held_mib": mib(held), "peak_mib": mib(peak),
            "input_mib": mib(tensor),
            "held_inputs": None if held is None else round(held / tensor, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=56)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--without-checkpointing", action="store_true",
                        help="also each block compiled without checkpointing")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    if args.tiny:  # the CPU flash kernels stand in for the CUDA ones
        attention.FP16_FLASH_DEVICES = ("cuda", "cpu")
    width, heads, batch = (128, 2, 2) if args.tiny else (1536, 24, args.batch)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    rows = []
    for name, make, inputs in blocks(width, heads, batch, 24, device):
        modes = ["reference", "ours_sdpa"] + (["ours_fp16_flash"] if name == "attn" else [])
        modes += ["ours_nockpt"] if args.without_checkpointing else []
        for mode in modes:
            row = measure(name, make, inputs, mode, device, args.tiny)
            print(json.dumps(row), flush=True)
            rows.append(row)
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "block_memory.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
