"""SDXL LoRA training step: tunejob's sdxl family with its speedups vs a plain diffusers +
peft step, on a full-size random-init SDXL UNet (issue 9's SDXL row).

LoRA rank 16 on the attention projections (to_q, to_k, to_v, to_out.0), 1024 px (128x128x4
latents), batch 4, bf16 weights and autocast, fp32 LoRA weights, fused AdamW, inputs already
cached. One configuration per process, so each peak is its own:

  --mode reference   the plain step (diffusers' SDXL LoRA example: epsilon MSE, peft)
  --mode ours        SDXLFamily.training_loss + the project's optimizer and clipping
  --compile blocks   ours with [speedups] compile_blocks (regional, static shapes)
  --cuda-graphs      with --compile blocks: [speedups] cuda_graphs, the blocks replayed as
                     CUDA graphs (the job's default on a GPU)
  --compile-mode M   torch.compile's mode for the compiled regions (e.g. reduce-overhead)
  --compile stages   the UNet's down, middle and up blocks compiled (larger regions)
  --compile model    the whole UNet compiled in one graph (for comparison)
  --channels-last    [speedups] channels_last
  --sdpa cudnn|flash|efficient   SDPA restricted to (preferring) one backend
  --checkpointing    gradient checkpointing (reference and ours alike)
  --checkpointing-ratio R   ours checkpoints an evenly spaced share R of the blocks
  --memory-budget B  ours keeps a share B of the compiled blocks' activations (torch's
                     partitioner recomputes the rest; [train] activation_memory_budget)

    python bench/sdxl_step.py --mode ours --compile blocks --channels-last [--profile] [--tiny]

Prints one JSON line (samples/s, peak memory, achieved TFLOP/s: bench/timing.py) and
appends it to $OUT/sdxl_bench.jsonl when OUT is set. --tiny: a small UNet on the CPU
(aot_eager for compile), to check the script.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peft import LoraConfig  # noqa: E402

from lcm_step import (SDXL_UNET, TINY_UNET, job_config, make_batch, make_unet,  # noqa: E402
                      our_family, reference_lora_step, sdxl_scheduler)
from job.train.optimizers import build_optimizer  # noqa: E402
from timing import bench_device, emit, flops_per_sample, timed  # noqa: E402

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def sdpa_context(name: str):
    """SDPA limited to one backend (math kept as the fallback for shapes it refuses)."""
    if name == "default":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]
    return sdpa_kernel([backend, SDPBackend.MATH], set_priority=True)


def reference(args, config, batch, device, dtype):
    unet = make_unet(config, device, dtype)
    unet.requires_grad_(False)
    if args.checkpointing:
        unet.enable_gradient_checkpointing()
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=ATTENTION,
                                init_lora_weights="gaussian"))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda" or None)
    generator, scheduler = torch.Generator().manual_seed(0), sdxl_scheduler()
    unet.train()
    return lambda: reference_lora_step(unet, batch, scheduler, dtype, optimizer, generator)


def ours(args, config, batch, device, dtype):
    cfg = job_config(args.rank, "bf16" if device.type == "cuda" else "no", lcm=False,
                     targets=ATTENTION)
    unet = make_unet(config, device, dtype)
    if args.checkpointing:
        from job.speedups.checkpointing import enable_checkpointing

        enable_checkpointing(unet, args.checkpointing_ratio)
    if args.channels_last:
        from job.speedups.memory_format import apply_channels_last

        apply_channels_last(unet)
    family = our_family(cfg, unet, device, dtype)
    family.unet.train()
    params = [p for p in family.unet.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, "adamw", 1e-4, 0.9, 0.999, 1e-2, 1e-8)
    backend = "aot_eager" if args.tiny else "inductor"
    if args.compile == "blocks":
        from job.speedups.compile import apply_regional_compile

        apply_regional_compile(family.unet, backend, mode=args.compile_mode,
                               cuda_graphs=args.cuda_graphs, memory_budget=args.memory_budget,
                               recompute_inside=args.checkpointing_ratio
                               if args.checkpointing and not args.recompute_around else 0.0)
    elif args.compile == "stages":
        from job.speedups.compile import UNET_STAGE_CLASSES, apply_regional_compile

        apply_regional_compile(family.unet, backend, UNET_STAGE_CLASSES, mode=args.compile_mode)
    elif args.compile == "model":
        family.unet.compile(backend=backend, dynamic=False, mode=args.compile_mode)
    generator = torch.Generator().manual_seed(0)

    # --cuda-graphs: the job's marks (begin_step); a whole model or its stages compiled in
    # reduce-overhead mode are marked here.
    mark = args.compile_mode == "reduce-overhead" and args.compile in ("stages", "model")

    from job.speedups.compile import begin_step

    def step() -> None:
        if mark:
            torch.compiler.cudagraph_mark_step_begin()
        begin_step()  # the trainer's mark (a no-op without --cuda-graphs)
        family.training_loss(batch, generator).mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("reference", "ours"), required=True)
    parser.add_argument("--compile", choices=("none", "blocks", "stages", "model"), default="none")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode for --compile blocks (e.g. reduce-overhead)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="with --compile blocks: [speedups] cuda_graphs (the job's default)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--sdpa", choices=("default", "cudnn", "flash", "efficient"),
                        default="default")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--recompute-around", action="store_true",
                        help="with --compile blocks --checkpointing: diffusers' checkpoint around "
                             "the compiled blocks (the job puts it inside them)")
    parser.add_argument("--memory-budget", type=float, default=None,
                        help="with --compile blocks: [train] activation_memory_budget")
    parser.add_argument("--checkpointing-ratio", type=float, default=1.0,
                        help="ours: [train] gradient_checkpointing_ratio (share of blocks)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--pageable-draws", action="store_true",
                        help="ours moves its random draws with a plain (syncing) copy, as before")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    if args.recompute_around and args.cuda_graphs:
        parser.error("--recompute-around with --cuda-graphs: a block checkpointed from outside "
                     "would rerun its CUDA graph from eager autograd (the job never does this)")
    cuda, device, dtype = bench_device(args.tiny)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    config = TINY_UNET if args.tiny else SDXL_UNET
    size = 128 if args.tiny else args.size
    batch = make_batch(config, args.batch, size, device)
    if args.pageable_draws:
        from job.train import distributed

        distributed.to_device = lambda t, d: t if d is None else t.to(d)
    build = reference if args.mode == "reference" else ours
    plain = argparse.Namespace(**{**vars(args), "checkpointing": False})
    with sdpa_context(args.sdpa):
        sample_flops = flops_per_sample(lambda: reference(plain, config,
                                                          make_batch(config, 1, size, device),
                                                          device, dtype))
        step = build(args, config, batch, device, dtype)
        result = timed(step, args.warmup, args.steps, args.batch, device, args.profile,
                       sample_flops)
    line = {"mode": args.mode, "compile": args.compile, "compile_mode": args.compile_mode,
            "cuda_graphs": args.cuda_graphs, "memory_budget": args.memory_budget,
            "channels_last": args.channels_last,
            "sdpa": args.sdpa, "pageable_draws": args.pageable_draws, "checkpointing": args.checkpointing,
            "recompute_around": args.recompute_around,
            "checkpointing_ratio": args.checkpointing_ratio, "batch": args.batch,
            "resolution": size, "lora_rank": args.rank,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "torch": torch.__version__, **result}
    emit(line, "sdxl_bench.jsonl")


if __name__ == "__main__":
    main()
