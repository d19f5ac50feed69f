"""Stage C LoRA training step: tunejob's stable_cascade family vs a plain diffusers + peft step.

Full-size random-init priors from the release's dims (stage-c 3.6B, stage-c-lite 1B, below),
LoRA rank 16 on the attention projections, 24x24x16 latents (1024 px), CLIP-G-sized text
inputs. Two settings per prior: fp32 at the largest batch that fits (searched downwards),
and the bf16 override (bf16 prior under bf16 autocast, fp32 LoRA weights) at batch 16. Both
steps run in one process on the same weights (rebuilt from one seed; one prior in memory at
a time), batch and settings:

  reference  t ~ U(0, 1), DDPMWuerstchenScheduler.add_noise, epsilon target, P2 weight,
             peft's inject_adapter_in_model, torch's fused AdamW, written out plainly
  ours       StableCascadeFamily.training_loss + tunejob's optimizer and clipping, as the
             training loop runs them

    python bench/stage_c_step.py [--priors stage-c,stage-c-lite] [--steps 10] [--warmup 3]
                                 [--gradient-checkpointing] [--compile] [--channels-last]
                                 [--cuda-graphs] [--fp16-flash]
                                 [--precisions no,bf16] [--fp32-matmul-reference] [--tiny]

Each timed row has samples/s, peak memory and achieved TFLOP/s (bench/timing.py). Prints
JSON and writes it to $OUT/stage_c_bench.json when OUT is set. --tiny runs a toy prior on
the CPU to check the script itself.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffusers import DDPMWuerstchenScheduler, StableCascadeUNet  # noqa: E402
from peft import LoraConfig, inject_adapter_in_model  # noqa: E402

from job.config import JobConfig  # noqa: E402
from job.models.stable_cascade import StableCascadeFamily  # noqa: E402
from job.train.optimizers import build_optimizer  # noqa: E402
from timing import flops_per_sample, timed  # noqa: E402

_COMMON = dict(in_channels=16, out_channels=16, timestep_ratio_embedding_dim=64, patch_size=1,
               clip_text_in_channels=1280, clip_text_pooled_in_channels=1280,
               clip_image_in_channels=768, clip_seq=4, kernel_size=3, dropout=(0.1, 0.1),
               self_attn=True, timestep_conditioning_type=("sca", "crp"), switch_level=(False,),
               block_types_per_layer=(("SDCascadeResBlock", "SDCascadeTimestepBlock",
                                       "SDCascadeAttnBlock"),) * 2,
               down_blocks_repeat_mappers=(1, 1), up_blocks_repeat_mappers=(1, 1))
# stabilityai/stable-cascade-prior prior/config.json and prior_lite/config.json.
PRIORS = {
    "stage-c": dict(_COMMON, conditioning_dim=2048, block_out_channels=(2048, 2048),
                    num_attention_heads=(32, 32), down_num_layers_per_block=(8, 24),
                    up_num_layers_per_block=(24, 8)),
    "stage-c-lite": dict(_COMMON, conditioning_dim=1536, block_out_channels=(1536, 1536),
                         num_attention_heads=(24, 24), down_num_layers_per_block=(4, 12),
                         up_num_layers_per_block=(12, 4)),
}
TINY = dict(_COMMON, conditioning_dim=32, block_out_channels=(32, 32), num_attention_heads=(2, 2),
            down_num_layers_per_block=(1, 1), up_num_layers_per_block=(1, 1),
            clip_text_in_channels=32, clip_text_pooled_in_channels=32, clip_image_in_channels=24)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
RANK, LATENT = 16, 24
FP32_BATCHES = (64, 56, 48, 40, 36, 32, 28, 24, 20, 16, 14, 12, 11, 10, 9, 8, 6, 4, 2, 1)


def make_prior(config: dict, device: torch.device, dtype: torch.dtype) -> StableCascadeUNet:
    torch.manual_seed(0)
    with torch.device(device):
        prior = StableCascadeUNet(**config)
    return prior.to(dtype)


def make_batch(config: dict, batch: int, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(1)
    width, pooled = config["clip_text_in_channels"], config["clip_text_pooled_in_channels"]
    return {"latents": torch.randn(batch, 16, LATENT, LATENT, generator=generator).to(device),
            "text.prompt_embeds": torch.randn(batch, 77, width, generator=generator)
            .half().to(device),
            "text.prompt_embeds_pooled": torch.randn(batch, 1, pooled, generator=generator)
            .half().to(device)}


def job_config(precision: str, checkpointing: bool) -> JobConfig:
    return JobConfig.model_validate({
        "job": {"name": "bench", "i_know_what_i_am_doing": precision != "no"},
        "model": {"family": "stable_cascade", "flavour": "stage-c"},
        "lora": {"rank": RANK, "alpha": RANK, "target_modules": TARGETS},
        "train": {"max_train_steps": 1, "mixed_precision": precision,
                  "gradient_checkpointing": checkpointing},
        "datasets": [{"id": "d", "instance_data_dir": "/tmp"}]})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ours(config, batch_size, precision, args, device) -> Callable[[], None]:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    prior = make_prior(config, device, dtype).train()
    cfg = job_config(precision, args.gradient_checkpointing)
    if args.gradient_checkpointing:
        prior.enable_gradient_checkpointing()
    if args.channels_last:
        from job.speedups.memory_format import apply_channels_last

        apply_channels_last(prior)
    family = StableCascadeFamily.around(cfg, prior, device, dtype)
    family.add_lora()
    if args.fp16_flash and device.type == "cuda":
        from job.speedups.attention import apply_fp16_flash_attention

        apply_fp16_flash_attention(prior)
    if args.compile:
        from job.speedups.compile import apply_regional_compile

        apply_regional_compile(prior, "aot_eager" if args.tiny else "inductor",
                               cuda_graphs=args.cuda_graphs and device.type == "cuda",
                               recompute_inside=1.0 if args.gradient_checkpointing else 0.0)
    params = [p for p in prior.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, "adamw", 1e-4, 0.9, 0.999, 1e-2, 1e-8)
    batch, generator = make_batch(config, batch_size, device), torch.Generator().manual_seed(2)

    from job.speedups.compile import begin_step

    def step() -> None:
        begin_step()  # the trainer's CUDA graph mark (a no-op without --cuda-graphs)
        family.training_loss(batch, generator).mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def reference(config, batch_size, precision, args, device) -> Callable[[], None]:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    prior = make_prior(config, device, dtype).train().requires_grad_(False)
    if args.gradient_checkpointing:
        prior.enable_gradient_checkpointing()
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS,
                                       init_lora_weights="gaussian"), prior)
    params = [p for n, p in prior.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2,
                                  fused=device.type == "cuda" or None)
    scheduler = DDPMWuerstchenScheduler()
    batch = make_batch(config, batch_size, device)
    clip_img = torch.zeros(batch_size, 1, config["clip_image_in_channels"], device=device,
                           dtype=dtype)

    def step() -> None:
        latents = batch["latents"]
        t = torch.rand(batch_size, device=device)
        noise = torch.randn_like(latents)
        noisy = scheduler.add_noise(latents, noise, t)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = prior(sample=noisy.to(dtype), timestep_ratio=t.to(dtype),
                         clip_text_pooled=batch["text.prompt_embeds_pooled"].to(dtype),
                         clip_text=batch["text.prompt_embeds"].to(dtype), clip_img=clip_img,
                         return_dict=False)[0]
        losses = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
        weights = 1 - scheduler._alpha_cumprod(t, device)
        (losses * weights).mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def fresh_memory(device: torch.device) -> None:
    torch._dynamo.reset()  # compiled graphs and CUDA graph pools of the previous run go too
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def both(config, batch_size, precision, args, device) -> dict:
    """Ours and the reference at one batch and precision, each timed after the other's
    memory is freed. With --fp32-matmul-reference, fp32 rows also time the reference with
    torch's default float32 matmuls (TF32 off; cuDNN's convolutions keep their default TF32),
    as a plain fp32 script runs it; the other reference gets tunejob's default (`[speedups]
    allow_tf32`) so that its ratio shows the other speedups."""
    result = {"batch": batch_size, "precision": precision}
    cuda = device.type == "cuda"
    runs = [("ours", ours, cuda), ("reference", reference, cuda)]
    if precision == "no" and args.fp32_matmul_reference:
        runs.append(("reference_fp32_matmuls", reference, False))
    plain = argparse.Namespace(**{**vars(args), "gradient_checkpointing": False})
    sample_flops = flops_per_sample(lambda: reference(config, 1, precision, plain, device))
    for name, build, tf32 in runs:
        fresh_memory(device)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            step = build(config, batch_size, precision, args, device)
            result[name] = timed(step, args.warmup, args.steps, batch_size, device,
                                 args.profile, sample_flops)
            del step
        finally:
            torch.backends.cuda.matmul.allow_tf32 = cuda
    fresh_memory(device)
    for name, _, _ in runs[1:]:
        key = "ratio_samples_per_s" + name.removeprefix("reference")
        result[key] = round(result["ours"]["samples_per_s"] / result[name]["samples_per_s"], 4)
    return result


def largest_fp32(config, args, device) -> dict:
    """The fp32 comparison at the largest batch at which both steps fit."""
    candidates = [b for b in FP32_BATCHES if b <= args.max_fp32_batch]
    for batch_size in candidates:
        try:
            return both(config, batch_size, "no", args, device)
        except torch.cuda.OutOfMemoryError:
            fresh_memory(device)
    raise RuntimeError("not even batch 1 fits in fp32")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--priors", default="stage-c,stage-c-lite")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--bf16-batch", type=int, default=16)
    parser.add_argument("--max-fp32-batch", type=int, default=64)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true",
                        help="ours with [speedups] compile_blocks (regional torch.compile)")
    parser.add_argument("--channels-last", action="store_true",
                        help="ours with [speedups] channels_last")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="with --compile on a GPU: [speedups] cuda_graphs")
    parser.add_argument("--fp16-flash", action="store_true",
                        help='ours with [speedups] fp32_attention = "fp16_flash" (a GPU)')
    parser.add_argument("--precisions", default="no,bf16",
                        help="no (fp32, largest batch that fits) and/or bf16")
    parser.add_argument("--fp32-matmul-reference", action="store_true",
                        help="fp32 rows: also the reference with torch's default fp32 "
                             "matmuls (no TF32), and ours' ratio to it")
    parser.add_argument("--tiny", action="store_true", help="toy prior on the CPU")
    parser.add_argument("--profile", action="store_true",
                        help="also profile two steps (GPU busy share, top kernels)")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "lora_rank": RANK, "latents": [LATENT, LATENT],
           "gradient_checkpointing": args.gradient_checkpointing, "compile_blocks": args.compile,
           "channels_last": args.channels_last, "cuda_graphs": args.cuda_graphs,
           "fp32_attention": "fp16_flash" if args.fp16_flash and device.type == "cuda"
           else "sdpa", "priors": {}}
    for name in args.priors.split(","):
        config = TINY if args.tiny else PRIORS[name]
        if args.tiny:
            args.max_fp32_batch = min(args.max_fp32_batch, 2)
        params = sum(p.numel() for p in make_prior(config, torch.device("meta"),
                                                   torch.float32).parameters())
        row = out["priors"][name] = {"parameters": params}
        if "no" in args.precisions.split(","):
            row["fp32"] = largest_fp32(config, args, device)
        if "bf16" in args.precisions.split(","):
            row["bf16"] = both(config, 2 if args.tiny else args.bf16_batch, "bf16", args, device)
        print(json.dumps({name: out["priors"][name]}), flush=True)
    print(json.dumps(out))  # one line: bench/run_list.sh keeps each command's last line
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "stage_c_bench.json").write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
