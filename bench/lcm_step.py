"""LCM distillation step time vs a plain LoRA step, on a full-size random-init SDXL UNet.

Four step kinds, same UNet config, batch, resolution and LoRA, measured in one process:

  ref_lora   plain diffusers + peft LoRA step (epsilon MSE), the reference
  ours_lora  tunejob's SDXL family training_loss + its optimizer
  ref_lcm    the LCM-LoRA step as diffusers' train_lcm_distill_lora_sdxl example runs it
             (teacher conditional and unconditional passes as two UNet calls)
  ours_lcm   tunejob's LCMDistillation (one 2B teacher pass)

    python bench/lcm_step.py [--batch 2] [--size 1024] [--steps 10] [--tiny]

Writes JSON to $OUT/lcm_bench.json (or prints it). --tiny runs a small UNet on the CPU to
check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: E402
from peft import LoraConfig  # noqa: E402

from job.config import JobConfig  # noqa: E402
from job.distill.lcm import LCMDistillation  # noqa: E402
from job.models.sdxl import SDXLFamily  # noqa: E402
from job.train.optimizers import build_optimizer  # noqa: E402
from timing import timed  # noqa: E402

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, the dims that matter.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1),
    attention_head_dim=(2, 4), cross_attention_dim=64, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=64 + 6 * 8, norm_num_groups=8)
# jobs/sdxl_lcm.toml's LoRA target set.
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in",
           "proj_out", "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv",
           "upsamplers.0.conv", "time_emb_proj"]


def sdxl_scheduler() -> DDPMScheduler:
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000)


def make_unet(config: dict, device: torch.device, dtype: torch.dtype) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**config).to(device, dtype)


def make_batch(config: dict, batch: int, size: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(1)
    latent = size // 8
    text = config["cross_attention_dim"]
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    return {"latents": torch.randn(batch, 4, latent, latent, generator=g).to(device),
            "text.prompt_embeds": torch.randn(batch, 77, text, generator=g).to(device),
            "text.pooled_prompt_embeds": torch.randn(batch, pooled, generator=g).to(device),
            "cond.time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch,
                                          dtype=torch.float32).to(device)}


def job_config(rank: int, precision: str, lcm: bool,
               targets: list[str] | None = None) -> JobConfig:
    """The bench job's settings; the LoRA on `targets` (default: TARGETS)."""
    return JobConfig.model_validate({
        "job": {"name": "bench", "output_dir": "/tmp/bench-out"},
        "model": {"family": "sdxl", "flavour": "base-1.0", "model_type": "lora"},
        "lora": {"rank": rank, "alpha": rank, "target_modules": targets or TARGETS},
        "train": {"max_train_steps": 1, "mixed_precision": precision},
        "optimizer": {"name": "adamw", "learning_rate": 1e-4},
        "datasets": [{"id": "x", "instance_data_dir": "/tmp/none", "synthetic_images": 1}],
        "distillation": {"method": "lcm" if lcm else "none"},
    })


def our_family(cfg: JobConfig, unet, device, dtype) -> SDXLFamily:
    """The SDXL family around an in-memory UNet (no weights folder: random init)."""
    family = SDXLFamily(cfg, device, dtype)
    family.unet = unet
    family.noise_scheduler = sdxl_scheduler()
    family.prediction_type = "epsilon"
    family.add_lora()
    return family


def reference_lora_step(unet, batch, scheduler, dtype, optimizer, generator):
    """A plain diffusers + peft LoRA step, as the diffusers SDXL LoRA example writes it."""
    latents = batch["latents"]
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    t = torch.randint(0, 1000, (latents.shape[0],), generator=generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    with torch.autocast(latents.device.type, dtype=dtype, enabled=dtype != torch.float32):
        pred = unet(noisy, t, encoder_hidden_states=batch["text.prompt_embeds"],
                    added_cond_kwargs={"text_embeds": batch["text.pooled_prompt_embeds"],
                                       "time_ids": batch["cond.time_ids"]}).sample
    loss = F.mse_loss(pred.float(), noise.float())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def reference_lcm_step(unet, batch, alphas, dtype, optimizer, generator, w_min=1.0, w_max=12.0,
                       num_ddim=50):
    """The LCM-LoRA step of diffusers' train_lcm_distill_lora_sdxl example, written inline:
    conditional and unconditional teacher passes as two calls, the target from the student
    under no grad, l2 loss."""
    latents = batch["latents"]
    device, bsz = latents.device, latents.shape[0]
    k = 1000 // num_ddim
    noise = torch.randn(latents.shape, generator=generator).to(device)
    index = torch.randint(0, num_ddim, (bsz,), generator=generator).to(device)
    start = (index + 1) * k - 1
    end = (start - k).clamp(min=0)
    w = (torch.rand(bsz, generator=generator) * (w_max - w_min) + w_min).to(device).view(-1, 1, 1, 1)
    a = alphas.to(device)

    def ab(t):
        return a[t].view(-1, 1, 1, 1)

    def call(x, t, embeds, pooled):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return unet(x, t, encoder_hidden_states=embeds,
                        added_cond_kwargs={"text_embeds": pooled,
                                           "time_ids": batch["cond.time_ids"]}).sample.float()

    def x0(out, x, t):
        return (x - (1 - ab(t)).sqrt() * out) / ab(t).sqrt()

    def boundary(t):
        s = t.float() * 10.0
        return (0.25 / (s ** 2 + 0.25)).view(-1, 1, 1, 1), (s / (s ** 2 + 0.25).sqrt()).view(-1, 1, 1, 1)

    embeds, pooled = batch["text.prompt_embeds"], batch["text.pooled_prompt_embeds"]
    noisy = ab(start).sqrt() * latents + (1 - ab(start)).sqrt() * noise
    c_skip_s, c_out_s = boundary(start)
    student = c_skip_s * noisy + c_out_s * x0(call(noisy, start, embeds, pooled), noisy, start)
    with torch.no_grad():
        unet.disable_adapters()
        cond = call(noisy, start, embeds, pooled)
        uncond = call(noisy, start, torch.zeros_like(embeds), torch.zeros_like(pooled))
        unet.enable_adapters()
        x0_c, x0_u = x0(cond, noisy, start), x0(uncond, noisy, start)
        x0_g = x0_c + w * (x0_c - x0_u)
        eps_g = cond + w * (cond - uncond)
        x_prev = ab(end).sqrt() * x0_g + (1 - ab(end)).sqrt() * eps_g
        c_skip_e, c_out_e = boundary(end)
        target = c_skip_e * x_prev + c_out_e * x0(call(x_prev, end, embeds, pooled), x_prev, end)
    loss = F.mse_loss(student, target)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--channels-last", action="store_true",
                        help="ours with [speedups] channels_last (the UNet's convolutions)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile two steps (GPU busy share, top kernels)")
    parser.add_argument("--compile", action="store_true",
                        help="ours with [speedups] compile_blocks (regional torch.compile)")
    parser.add_argument("--targets", default="lcm", choices=["lcm", "attention"],
                        help="LoRA targets: the LCM-LoRA set, or to_q/to_k/to_v/to_out.0")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    precision = "bf16" if cuda else "no"
    config = TINY_UNET if args.tiny else SDXL_UNET
    size = 128 if args.tiny else args.size
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    batch = make_batch(config, args.batch, size, device)
    if args.targets == "attention":
        TARGETS[:] = ["to_q", "to_k", "to_v", "to_out.0"]
    results = {"device": torch.cuda.get_device_name(0) if cuda else "cpu",
               "compile_blocks": args.compile, "lora_targets": list(TARGETS),
               "torch": torch.__version__, "batch": args.batch, "resolution": size,
               "lora_rank": args.rank, "dtype": str(dtype), "steps_timed": args.steps}

    def lora_unet():
        unet = make_unet(config, device, dtype)
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS,
                                    init_lora_weights="gaussian"))
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        return unet

    generator = torch.Generator().manual_seed(0)
    scheduler = sdxl_scheduler()
    # Reference and ours alternate per kind; one UNet at a time keeps memory comparable.
    unet = lora_unet()
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
    results["ref_lora"] = timed(lambda: reference_lora_step(unet, batch, scheduler, dtype, opt,
                                                            generator),
                                args.warmup, args.steps, args.batch, device, args.profile)
    results["ref_lcm"] = timed(lambda: reference_lcm_step(unet, batch, scheduler.alphas_cumprod,
                                                          dtype, opt, generator),
                               args.warmup, args.steps, args.batch, device, args.profile)
    del unet, opt
    torch.cuda.empty_cache() if cuda else None

    for lcm in (False, True):
        cfg = job_config(args.rank, precision, lcm)
        family = our_family(cfg, make_unet(config, device, dtype), device, dtype)
        params = [p for p in family.unet.parameters() if p.requires_grad]
        opt = build_optimizer(params, "adamw", 1e-4, 0.9, 0.999, 1e-2, 1e-8)
        objective = LCMDistillation(cfg, family, device) if lcm else family.training_loss
        if args.channels_last:
            from job.speedups.memory_format import apply_channels_last

            apply_channels_last(family.unet)
        if args.compile:
            from job.speedups.compile import apply_regional_compile

            apply_regional_compile(family.unet, "aot_eager" if args.tiny else "inductor")

        def step():
            loss = objective(batch, generator).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        results["ours_lcm" if lcm else "ours_lora"] = timed(
            step, args.warmup, args.steps, args.batch, device, args.profile)
        del family, opt, objective
        torch.cuda.empty_cache() if cuda else None

    ms = {k: results[k]["ms_per_step"] for k in ("ref_lora", "ours_lora", "ref_lcm", "ours_lcm")}
    results["ratios"] = {
        "ours_lora_speedup_vs_ref_lora": round(ms["ref_lora"] / ms["ours_lora"], 3),
        "ours_lcm_speedup_vs_ref_lcm": round(ms["ref_lcm"] / ms["ours_lcm"], 3),
        "ours_lcm_step_over_ours_lora_step": round(ms["ours_lcm"] / ms["ours_lora"], 3),
        "samples_per_s": {k: round(args.batch / (v / 1000), 3) for k, v in ms.items()}}
    text = json.dumps(results, indent=2)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "lcm_bench.json").write_text(text)


if __name__ == "__main__":
    main()
