"""SD3 LoRA training step: tunejob's sd3 family vs a plain diffusers + peft step.

A full-size random-init SD3.5 Medium transformer (its transformer/config.json dims below),
LoRA rank 16 on the attention projections of both streams, 1024 px (128x128x16 latents),
batch 4, bf16 autocast with fp32 LoRA weights, AdamW. Both steps run in one process on the
same weights (rebuilt from one seed; one model in memory at a time), batch and settings:

  reference  logit-normal sigmas (diffusers' compute_density_for_timestep_sampling), the
             rectified-flow noisy input and velocity target, unweighted MSE, written as the
             diffusers SD3 LoRA example does, with peft's add_adapter
  ours       tunejob's SD3Family.training_loss (its sigma sampling, shift 3, the same
             target) + its optimizer and gradient clipping, as the training loop runs it

    python bench/sd3_step.py [--model medium|large] [--batch 4] [--size 1024] [--steps 10]
        [--warmup 3] [--compile] [--fp8] [--checkpointing] [--sdpa cudnn] [--tiny]

Prints one JSON line (samples/s, ms per step, peak GPU memory, ours/reference ratio) and
appends it to $OUT/sd3_bench.jsonl when OUT is set. --tiny runs a 4-layer transformer on
the CPU to check the script itself.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel  # noqa: E402
from diffusers.training_utils import compute_density_for_timestep_sampling  # noqa: E402
from peft import LoraConfig  # noqa: E402

from job.config import JobConfig  # noqa: E402
from job.models.sd3 import SD3Family  # noqa: E402
from job.train.optimizers import build_optimizer  # noqa: E402
from timing import emit, flops_per_sample, timed  # noqa: E402

# stabilityai/stable-diffusion-3.5-medium transformer/config.json.
SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
# stabilityai/stable-diffusion-3.5-large transformer/config.json.
SD35_LARGE = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
    attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
    caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
    qk_norm="rms_norm")
TINY = dict(
    sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=4,
    attention_head_dim=8, num_attention_heads=4, joint_attention_dim=48,
    caption_projection_dim=32, pooled_projection_dim=40, pos_embed_max_size=32,
    dual_attention_layers=(0,), qk_norm="rms_norm")
# Attention projections of the image and the text stream (jobs/sd3.toml's set).
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
           "to_add_out"]
TEXT_TOKENS = 77 + 154  # CLIP tokens, then tunejob's default T5 length


def make_transformer(config: dict, device: torch.device, dtype: torch.dtype):
    """Random weights built on the device in `dtype` (Large's 8B parameters initialise slowly
    on a CPU, and in fp32 would need 32 GB first)."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return SD3Transformer2DModel(**config)
    finally:
        torch.set_default_dtype(default)


def make_batch(config: dict, batch: int, size: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(1)
    latent = size // 8
    return {"latents": torch.randn(batch, 16, latent, latent, generator=g).to(device),
            "text.prompt_embeds": torch.randn(batch, TEXT_TOKENS, config["joint_attention_dim"],
                                              generator=g).to(device),
            "text.pooled_prompt_embeds": torch.randn(batch, config["pooled_projection_dim"],
                                                     generator=g).to(device)}


def job_config(rank: int, precision: str, checkpointing: bool, tread: float = 0.0) -> JobConfig:
    routes = [{"selection_ratio": tread, "start_layer_idx": 2, "end_layer_idx": -2}] \
        if tread else []
    return JobConfig.model_validate({
        "tread": {"routes": routes},
        "job": {"name": "bench", "output_dir": "/tmp/bench-out"},
        "model": {"family": "sd3", "flavour": "medium", "model_type": "lora"},
        "lora": {"rank": rank, "alpha": rank, "target_modules": TARGETS},
        "train": {"max_train_steps": 1, "mixed_precision": precision,
                  "gradient_checkpointing": checkpointing},
        "optimizer": {"name": "adamw", "learning_rate": 1e-4},
        "datasets": [{"id": "x", "instance_data_dir": "/tmp/none", "synthetic_images": 1}],
    })


def ours(args, config, device, dtype) -> Callable[[], None]:
    """The sd3 family's step as job/train/loop.py runs it: loss, backward, clip, step."""
    cfg = job_config(args.rank, "bf16" if dtype == torch.bfloat16 else "no", args.checkpointing,
                     args.tread)
    transformer = make_transformer(config, device, dtype)
    if args.base != "no_change":
        # As the job quantises the frozen base: before the LoRA (jobs/sd3.toml: int8-torchao).
        from job.models.sd3 import _quantisable_base_layer
        from job.speedups.quantize import quantise

        quantise(transformer, args.base, _quantisable_base_layer)
    if args.checkpointing:
        from job.speedups.checkpointing import enable_checkpointing

        enable_checkpointing(transformer, args.checkpointing_ratio)
    family = SD3Family.around(cfg, transformer, FlowMatchEulerDiscreteScheduler(shift=3.0),
                              device, dtype)
    family.add_lora()
    if args.tread:
        from job.speedups.tread import apply_tread

        apply_tread(family)
    if args.fp8:
        from job.speedups.float8 import apply_float8_base

        apply_float8_base(transformer, "sd3")
    if args.compile:
        from job.speedups.compile import apply_regional_compile

        apply_regional_compile(transformer, "aot_eager" if args.tiny else "inductor")
    params = [p for p in transformer.parameters() if p.requires_grad]
    o = cfg.optimizer
    optimizer = build_optimizer(params, o.name, o.learning_rate, o.beta1, o.beta2,
                                o.weight_decay, o.epsilon)
    batch = make_batch(config, args.batch, args.size, device)
    generator = torch.Generator().manual_seed(2)

    def step() -> None:
        family.training_loss(batch, generator).mean().backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def reference(args, config, device, dtype) -> Callable[[], None]:
    """A plain diffusers + peft SD3 LoRA step (logit-normal sigmas, velocity MSE)."""
    transformer = make_transformer(config, device, dtype)
    if args.checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank,
                                       init_lora_weights="gaussian", target_modules=TARGETS))
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # fp32 LoRA weights, as diffusers' cast_training_params does
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda" or None)
    batch = make_batch(config, args.batch, args.size, device)
    generator = torch.Generator().manual_seed(2)

    def step() -> None:
        latents = batch["latents"]
        u = compute_density_for_timestep_sampling("logit_normal", latents.shape[0], 0.0, 1.0,
                                                  generator=generator)
        sigmas = u.to(device).view(-1, 1, 1, 1)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        noisy = (1 - sigmas) * latents + sigmas * noise
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = transformer(hidden_states=noisy, timestep=u.to(device) * 1000,
                               encoder_hidden_states=batch["text.prompt_embeds"],
                               pooled_projections=batch["text.pooled_prompt_embeds"],
                               return_dict=False)[0]
        loss = F.mse_loss(pred.float(), (noise - latents).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def fresh_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--checkpointing", action="store_true",
                        help="gradient checkpointing in both steps")
    parser.add_argument("--checkpointing-ratio", type=float, default=1.0,
                        help="ours: [train] gradient_checkpointing_ratio (share of blocks)")
    parser.add_argument("--compile", action="store_true",
                        help="ours with [speedups] compile_blocks (regional torch.compile)")
    parser.add_argument("--model", choices=("medium", "large"), default="medium")
    parser.add_argument("--tread", type=float, default=0.0,
                        help="ours: a TREAD route over blocks 2..-2 with this share of the "
                             "image tokens skipping it (e.g. 0.5)")
    parser.add_argument("--base", default="no_change",
                        help="ours: [speedups] base_model_precision (e.g. int8-torchao, as "
                             "jobs/sd3.toml); the reference keeps bf16 weights")
    parser.add_argument("--fp8", action="store_true",
                        help="ours with [speedups] fp8_base_matmuls (float8 block linears)")
    parser.add_argument("--sdpa", choices=("default", "cudnn", "flash", "efficient"),
                        default="default", help="SDPA restricted to (preferring) one backend")
    parser.add_argument("--tiny", action="store_true", help="4-layer model on the CPU, 64 px")
    parser.add_argument("--profile", action="store_true",
                        help="also profile two steps (GPU busy share, top kernels)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.size = min(args.batch, 2), 64
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # as job/speedups/tf32.py sets it
    config = TINY if args.tiny else {"medium": SD35_MEDIUM, "large": SD35_LARGE}[args.model]
    result = {"model": "tiny" if args.tiny else f"sd3.5-{args.model} transformer (random init)",
              "device": torch.cuda.get_device_name(0) if cuda else "cpu",
              "torch": torch.__version__, "batch": args.batch, "size": args.size,
              "latents": [args.batch, 16, args.size // 8, args.size // 8],
              "lora_rank": args.rank, "dtype": str(dtype), "checkpointing": args.checkpointing,
              "checkpointing_ratio": args.checkpointing_ratio,
              "compile_blocks": args.compile, "fp8_base_matmuls": args.fp8,
              "base_model_precision": args.base, "tread": args.tread, "sdpa": args.sdpa,
              "steps": args.steps,
              "warmup": args.warmup}
    from sdxl_step import sdpa_context

    plain = argparse.Namespace(**{**vars(args), "batch": 1, "checkpointing": False})
    with sdpa_context(args.sdpa):
        sample_flops = flops_per_sample(lambda: reference(plain, config, device, dtype))
        for name, build in (("reference", reference), ("ours", ours)):
            fresh_memory(device)
            step = build(args, config, device, dtype)
            result[name] = timed(step, args.warmup, args.steps, args.batch, device,
                                 args.profile, sample_flops)
            del step
    result["ratio_samples_per_s"] = round(result["ours"]["samples_per_s"]
                                          / result["reference"]["samples_per_s"], 3)
    emit(result, "sd3_bench.jsonl")
    return result


if __name__ == "__main__":
    main()
