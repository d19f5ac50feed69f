"""LCM-LoRA distillation step, tunejob's against diffusers' example, on a full-size
random-init SDXL UNet. One configuration per process, so each peak is its own:

  --mode reference   the LCM-LoRA step as diffusers' train_lcm_distill_lora_sdxl example runs
                     it (student, then the teacher's conditional and unconditional passes as
                     two UNet calls with the adapters disabled, then the target: the student
                     under no grad; l2 loss; gradient clipping; AdamW)
  --mode ours        tunejob's LCMDistillation (one 2B teacher pass) + the project's optimizer
                     and clipping, with the speedups the flags ask for:
  --compile          [speedups] compile_blocks (regional, static shapes)
  --cuda-graphs      with --compile: [speedups] cuda_graphs (the trainer's begin_step marks)
  --channels-last    [speedups] channels_last
  --checkpointing    gradient checkpointing, reference and ours alike (ours with --compile:
                     inside the compiled blocks, as the job does)
  --accumulation N   N micro-batches of --batch per optimizer step (jobs/sdxl_lcm.toml: 1 x 4)

    python bench/lcm_step.py --mode ours --compile --cuda-graphs --channels-last [--tiny]

Prints one JSON line (samples/s over batch x accumulation, peak memory: bench/timing.py) and
appends it to $OUT/lcm_bench.jsonl when OUT is set. --tiny: a small UNet on the CPU
(aot_eager for compile), to check the script. The module's helpers (the SDXL UNet config,
the batch, the plain LoRA reference step) also serve bench/sdxl_step.py.
"""

from __future__ import annotations

import argparse
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
from timing import bench_device, emit, timed  # noqa: E402

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
                       num_ddim=50, scale=1.0):
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
    (loss * scale).backward()  # scale: 1 / accumulation, as accelerate divides the loss
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def lora_unet(config: dict, rank: int, device, dtype):
    """The reference's UNet: frozen weights in `dtype`, a peft LoRA in fp32."""
    unet = make_unet(config, device, dtype)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS,
                                init_lora_weights="gaussian"))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return unet


def reference(args, config, batch, device, dtype):
    """diffusers' example: accumulation through loss / N per micro-batch, clip, AdamW."""
    unet = lora_unet(config, args.rank, device, dtype)
    if args.checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = AccumulatingOptimizer(torch.optim.AdamW(
        params, lr=1e-4, fused=device.type == "cuda" or None), params, args.accumulation)
    generator, alphas = torch.Generator().manual_seed(0), sdxl_scheduler().alphas_cumprod

    def step() -> None:
        for _ in range(args.accumulation):
            reference_lcm_step(unet, batch, alphas, dtype, optimizer, generator,
                               scale=optimizer.scale)

    return step


class AccumulatingOptimizer:
    """What reference_lcm_step calls as its optimizer: it scales its loss by `scale` (1/N),
    and every Nth call clips and steps, as the example's accelerator.accumulate does."""

    def __init__(self, optimizer, params, accumulation: int) -> None:
        self.optimizer, self.params, self.n, self.calls = optimizer, params, accumulation, 0
        self.scale = 1.0 / accumulation

    def step(self) -> None:
        self.calls += 1
        if self.calls % self.n == 0:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.calls % self.n == 0:
            self.optimizer.zero_grad(set_to_none=set_to_none)


def ours(args, config, batch, device, dtype):
    """tunejob's LCM step, set up in run.py's order: LoRA, objective, channels_last, compile."""
    cfg = job_config(args.rank, "bf16" if device.type == "cuda" else "no", lcm=True)
    unet = make_unet(config, device, dtype)
    if args.checkpointing:
        from job.speedups.checkpointing import enable_checkpointing

        enable_checkpointing(unet, 1.0)
    family = our_family(cfg, unet, device, dtype)
    family.unet.train()
    objective = LCMDistillation(cfg, family, device)
    if args.channels_last:
        from job.speedups.memory_format import apply_channels_last

        apply_channels_last(family.unet)
    if args.compile:
        from job.speedups.compile import apply_regional_compile

        apply_regional_compile(family.unet, "aot_eager" if args.tiny else "inductor",
                               cuda_graphs=args.cuda_graphs,
                               recompute_inside=1.0 if args.checkpointing else 0.0)
    params = [p for p in family.unet.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, "adamw", 1e-4, 0.9, 0.999, 1e-2, 1e-8)
    generator = torch.Generator().manual_seed(0)

    from job.speedups.compile import begin_step

    def step() -> None:
        begin_step()  # the trainer's mark (a no-op without --cuda-graphs)
        for _ in range(args.accumulation):
            (objective(batch, generator).mean() / args.accumulation).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("reference", "ours"), required=True)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--targets", default="lcm", choices=["lcm", "attention"],
                        help="LoRA targets: the LCM-LoRA set, or to_q/to_k/to_v/to_out.0")
    args = parser.parse_args(argv)
    if args.mode == "reference" and (args.compile or args.cuda_graphs or args.channels_last):
        parser.error("--compile, --cuda-graphs and --channels-last are ours (--mode ours)")
    if args.cuda_graphs and not args.compile:
        parser.error("--cuda-graphs needs --compile (the graphs are the compiled blocks')")
    cuda, device, dtype = bench_device(args.tiny)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    config = TINY_UNET if args.tiny else SDXL_UNET
    size = 128 if args.tiny else args.size
    if args.targets == "attention":
        TARGETS[:] = ["to_q", "to_k", "to_v", "to_out.0"]
    batch = make_batch(config, args.batch, size, device)
    step = (reference if args.mode == "reference" else ours)(args, config, batch, device, dtype)
    result = timed(step, args.warmup, args.steps, args.batch * args.accumulation, device,
                   args.profile)
    line = {"mode": args.mode, "compile": args.compile, "cuda_graphs": args.cuda_graphs,
            "channels_last": args.channels_last, "checkpointing": args.checkpointing,
            "batch": args.batch, "accumulation": args.accumulation, "resolution": size,
            "lora_rank": args.rank, "lora_targets": list(TARGETS),
            "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "torch": torch.__version__, **result}
    emit(line, "lcm_bench.jsonl")
    return line


if __name__ == "__main__":
    main()
