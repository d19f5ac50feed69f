"""Kandinsky 5 Image Lite LoRA training step: tunejob's family (with group offload, an int8
base, TREAD) vs a plain diffusers + peft step, and the step's peak memory under a cap.

A full-size random-init Lite transformer (kandinskylab's config_t2i.yaml dims: model_dim
2560, ff 10240, 50 visual + 2 text blocks, head dim 128), LoRA rank 16 on the attention
projections, 1024 px (128x128x16 latents), 256 Qwen tokens, bf16 weights and autocast, fp32
LoRA weights, AdamW, gradient checkpointing in every mode unless --no-checkpointing (issue
9's table has both rows; the offload modes need checkpointing). One mode per process, so
each peak is its own:

  reference  a plain diffusers + peft step: logit-normal sigmas, the pipeline's layout
             ([B, 1, h, w, C] latents, rope positions), velocity MSE
  ours       Kandinsky5Family.training_loss + the project's optimizer, as the loop runs it
  offload    ours with [speedups] group offload (block_level, 1 block per group, synchronous)
  offload-stream  the same, prefetching the next block on a CUDA stream
  tread      ours with [[tread.routes]] selection_ratio 0.5, blocks 2..-2
  int8       ours on an int8-torchao base
  compile    ours with [speedups] compile_blocks (regional torch.compile, inductor)
  tread-compile  TREAD 0.5 with compiled blocks
  job        jobs/kandinsky5.toml's step: int8-torchao base + group offload (no stream)

    python bench/kandinsky5_step.py --mode ours [--cap-gib 24] [--batch 1] [--tiny]

--cap-gib caps the process's GPU memory (torch.cuda.set_per_process_memory_fraction); a step
that does not fit reports fits: false. Prints JSON, and appends it to
$OUT/kandinsky5_bench.jsonl when OUT is set. --tiny: a 4-block model on the CPU, 64 px.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffusers import FlowMatchEulerDiscreteScheduler, Kandinsky5Transformer3DModel  # noqa: E402
from diffusers.training_utils import compute_density_for_timestep_sampling  # noqa: E402
from peft import LoraConfig  # noqa: E402

from job.config import JobConfig  # noqa: E402
from job.models.kandinsky5 import DEFAULT_LORA_TARGETS, Kandinsky5Family  # noqa: E402
from job.train.optimizers import build_optimizer  # noqa: E402
from timing import flops_per_sample, timed  # noqa: E402

LITE = dict(in_visual_dim=16, out_visual_dim=16, in_text_dim=3584, in_text_dim2=768,
            time_dim=512, patch_size=(1, 2, 2), model_dim=2560, ff_dim=10240,
            num_text_blocks=2, num_visual_blocks=50, axes_dims=(32, 48, 48))
TINY = dict(in_visual_dim=16, out_visual_dim=16, in_text_dim=32, in_text_dim2=16, time_dim=16,
            patch_size=(1, 2, 2), model_dim=32, ff_dim=64, num_text_blocks=1,
            num_visual_blocks=4, axes_dims=(4, 6, 6))
MODES = ("reference", "ours", "offload", "offload-stream", "tread", "int8", "job", "compile",
         "tread-compile")


def make_transformer(config: dict, device: torch.device, dtype: torch.dtype):
    """Random weights built on the device (6B parameters initialise slowly on a CPU), with
    the zero-initialised modulations given small values so every block does work."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16: an fp32 build would need 24 GB first
    try:
        with torch.device(device):
            model = Kandinsky5Transformer3DModel(**config)
    finally:
        torch.set_default_dtype(default)
    for name, param in model.named_parameters():
        if "modulation" in name:
            param.data.normal_(0, 0.02)
    return model


def make_batch(config: dict, batch: int, size: int, tokens: int, device) -> dict:
    g = torch.Generator().manual_seed(1)
    latent = size // 8
    return {"latents": torch.randn(batch, 16, latent, latent, generator=g).to(device),
            "text.prompt_embeds": torch.randn(batch, tokens, config["in_text_dim"],
                                              generator=g).to(device),
            "text.prompt_length": torch.full((batch,), tokens, device=device),
            "text.pooled_prompt_embeds": torch.randn(batch, config["in_text_dim2"],
                                                     generator=g).to(device)}


def job_config(args, mode: str, dtype: torch.dtype) -> JobConfig:
    offload = mode in ("offload", "offload-stream", "job")
    # jobs/kandinsky5.toml offloads without a stream: torchao's int8 tensors cannot be pinned.
    speedups = {"enable_group_offload": offload,
                "group_offload_use_stream": mode == "offload-stream" and not args.tiny,
                "base_model_precision": "int8-torchao"
                if mode in ("int8", "job") else "no_change"}
    tread = {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2,
                         "end_layer_idx": -2}]} if mode.startswith("tread") else {"routes": []}
    return JobConfig.model_validate({
        "job": {"name": "bench", "output_dir": "/tmp/bench-out"},
        "model": {"family": "kandinsky5-image", "model_type": "lora"},
        "lora": {"rank": args.rank, "alpha": args.rank},
        "train": {"max_train_steps": 1, "gradient_checkpointing": not args.no_checkpointing,
                  "mixed_precision": "bf16" if dtype == torch.bfloat16 else "no"},
        "optimizer": {"name": "adamw", "learning_rate": 1e-4},
        "speedups": {**speedups, "compile_blocks": mode.endswith("compile")}, "tread": tread,
        "datasets": [{"id": "x", "instance_data_dir": "/tmp/none", "synthetic_images": 1}],
    })


def ours(args, mode, config, device, dtype) -> Callable[[], None]:
    """The family's step as job/train/loop.py runs it, with the mode's speedups applied in
    the job's order (quantise, LoRA, group offload; TREAD hooks)."""
    from job.speedups.offload import apply_group_offload
    from job.speedups.quantize import quantise
    from job.speedups.tread import TokenRouter
    from job.models.kandinsky5 import _quantisable_base_layer
    from job.models.tread_rules import resolve_routes

    cfg = job_config(args, mode, dtype)
    transformer = make_transformer(config, device, dtype)
    if not args.no_checkpointing:
        transformer.enable_gradient_checkpointing()
    if cfg.speedups.base_model_precision != "no_change":
        quantise(transformer, cfg.speedups.base_model_precision, _quantisable_base_layer)
    family = Kandinsky5Family.around(cfg, transformer, FlowMatchEulerDiscreteScheduler(),
                                     device, dtype)
    family.add_lora()
    if cfg.speedups.enable_group_offload:
        apply_group_offload(transformer, cfg.speedups, device)
    if cfg.tread.routes:
        family.router = TokenRouter(transformer.visual_transformer_blocks,
                                    resolve_routes(cfg.tread.routes, config["num_visual_blocks"]))
    if cfg.speedups.compile_blocks:
        from job.speedups.compile import apply_regional_compile

        apply_regional_compile(transformer, backend="aot_eager" if args.tiny else "inductor")
    params = [p for p in transformer.parameters() if p.requires_grad]
    o = cfg.optimizer
    optimizer = build_optimizer(params, o.name, o.learning_rate, o.beta1, o.beta2,
                                o.weight_decay, o.epsilon)
    batch = make_batch(config, args.batch, args.size, args.tokens, device)
    generator = torch.Generator().manual_seed(2)

    def step() -> None:
        family.training_loss(batch, generator).mean().backward()
        torch.nn.utils.clip_grad_norm_(params, math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def reference(args, config, device, dtype) -> Callable[[], None]:
    """A plain diffusers + peft Kandinsky 5 LoRA step, laid out as the stock pipeline feeds
    the transformer."""
    transformer = make_transformer(config, device, dtype)
    if not args.no_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank,
                                       init_lora_weights="gaussian",
                                       target_modules=list(DEFAULT_LORA_TARGETS)))
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda" or None)
    batch = make_batch(config, args.batch, args.size, args.tokens, device)
    generator = torch.Generator().manual_seed(2)
    h = w = args.size // 16
    rope = [torch.arange(1, device=device), torch.arange(h, device=device),
            torch.arange(w, device=device)]

    def step() -> None:
        latents = batch["latents"].permute(0, 2, 3, 1)[:, None]
        u = compute_density_for_timestep_sampling("logit_normal", latents.shape[0], 0.0, 1.0,
                                                  generator=generator).to(device)
        sigmas = u.view(-1, 1, 1, 1, 1)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        noisy = (1 - sigmas) * latents + sigmas * noise
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = transformer(hidden_states=noisy, encoder_hidden_states=batch["text.prompt_embeds"],
                               pooled_projections=batch["text.pooled_prompt_embeds"],
                               timestep=u * 1000, visual_rope_pos=rope,
                               text_rope_pos=torch.arange(args.tokens, device=device),
                               return_dict=False)
        F.mse_loss(pred.float(), (noise - latents).float()).backward()
        torch.nn.utils.clip_grad_norm_(params, math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cap-gib", type=float, default=None)
    parser.add_argument("--no-checkpointing", action="store_true",
                        help="reference and ours without gradient checkpointing")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    if args.tiny:
        args.size, args.tokens = 64, 8
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    result = {"mode": args.mode, "model": "tiny" if args.tiny else "kandinsky5 lite (random)",
              "device": torch.cuda.get_device_name(0) if cuda else "cpu",
              "torch": torch.__version__, "batch": args.batch, "size": args.size,
              "cap_gib": args.cap_gib, "checkpointing": not args.no_checkpointing}
    if args.no_checkpointing and args.mode in ("offload", "offload-stream", "job"):
        parser.error(f"--mode {args.mode} offloads, which needs gradient checkpointing")
    config = TINY if args.tiny else LITE
    # Counted before --cap-gib applies: the plain step at batch 1 is the reference row's.
    plain = argparse.Namespace(**{**vars(args), "batch": 1, "no_checkpointing": True})
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    sample_flops = flops_per_sample(lambda: reference(plain, config, device, dtype))
    if cuda:
        if args.cap_gib:
            total = torch.cuda.get_device_properties(0).total_memory / 2**30
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib / total))
        torch.cuda.reset_peak_memory_stats()
    try:
        if args.mode == "reference":
            step = reference(args, config, device, dtype)
        else:
            step = ours(args, args.mode, config, device, dtype)
        result.update(timed(step, args.warmup, args.steps, args.batch, device, args.profile,
                            sample_flops))
        result["fits"] = True
    except torch.OutOfMemoryError as err:
        result.update(fits=False, error=str(err).splitlines()[0][:200])
    print(json.dumps(result))
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "kandinsky5_bench.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
