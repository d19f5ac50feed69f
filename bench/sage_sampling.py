"""Validation sampling with SageAttention against PyTorch SDPA, per family (issue 9): the
denoiser's time over a sampling run and how far the result moves (PSNR).

Full-size random-init denoisers (the step benches' configs), bf16, no grad, the CFG batch
(2: conditional and unconditional), 1024 px, `--steps` Euler steps from one seeded noise;
the same run once with SDPA and once with SageAttention. PSNR compares the final latents
(peak = the SDPA result's range) and, as a second measure, each single denoiser output
at the first step.

  sd3       the product path: SD3Family's sampling processor (job/speedups/attention.py)
  sdxl, stage-c, kandinsky5   no sampling processor exists in tunejob for these yet: the
            bench routes torch's scaled_dot_product_attention to sageattn for the run
            (unmasked calls with head dim 64/96/128; others stay SDPA) to see whether one
            would pay

    python bench/sage_sampling.py --family sd3 [--steps 28] [--tiny]

Prints one JSON line per family and appends it to $OUT/sage_sampling.jsonl. --tiny: small
models on the CPU with a stand-in for sageattn (SDPA itself), to check the script only.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import bench_device, emit  # noqa: E402

FAMILIES = ("sd3", "sdxl", "stage-c", "kandinsky5")
SDPA = F.scaled_dot_product_attention


def denoiser_and_call(family: str, tiny: bool, device, dtype):
    """(model, call(x, t) -> prediction, latent shape) for one family, CFG batch 2."""
    if family == "sd3":
        import sd3_step as b
        config = b.TINY if tiny else b.SD35_MEDIUM
        model = b.make_transformer(config, device, dtype).eval()
        batch = b.make_batch(config, 2, 64 if tiny else 1024, device)
        shape = batch["latents"].shape

        def call(x, t):
            return model(hidden_states=x, timestep=t.expand(2) * 1000,
                         encoder_hidden_states=batch["text.prompt_embeds"].to(dtype),
                         pooled_projections=batch["text.pooled_prompt_embeds"].to(dtype),
                         return_dict=False)[0]
    elif family == "sdxl":
        import lcm_step as b
        config = b.TINY_UNET if tiny else b.SDXL_UNET
        model = b.make_unet(config, device, dtype).eval()
        batch = b.make_batch(config, 2, 128 if tiny else 1024, device)
        shape = batch["latents"].shape

        def call(x, t):
            return model(x, t.expand(2) * 1000, encoder_hidden_states=batch["text.prompt_embeds"].to(dtype),
                         added_cond_kwargs={"text_embeds": batch["text.pooled_prompt_embeds"].to(dtype),
                                            "time_ids": batch["cond.time_ids"].to(dtype)}).sample
    elif family == "stage-c":
        import stage_c_step as b
        config = b.TINY if tiny else b.PRIORS["stage-c"]
        model = b.make_prior(config, device, dtype).eval()
        batch = b.make_batch(config, 2, device)
        shape = batch["latents"].shape
        clip_img = torch.zeros(2, 1, config["clip_image_in_channels"], device=device, dtype=dtype)

        def call(x, t):
            return model(sample=x, timestep_ratio=t.expand(2),
                         clip_text_pooled=batch["text.prompt_embeds_pooled"].to(dtype),
                         clip_text=batch["text.prompt_embeds"].to(dtype), clip_img=clip_img,
                         return_dict=False)[0]
    else:
        import kandinsky5_step as b
        config = b.TINY if tiny else b.LITE
        model = b.make_transformer(config, device, dtype).eval()
        size, tokens = (64, 8) if tiny else (1024, 256)
        batch = b.make_batch(config, 2, size, tokens, device)
        shape = (2, 1, size // 8, size // 8, 16)
        h = w = size // 16
        rope = [torch.arange(1, device=device), torch.arange(h, device=device),
                torch.arange(w, device=device)]

        def call(x, t):  # under autocast, as the family samples: its time embedding is fp32
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                return model(hidden_states=x,
                             encoder_hidden_states=batch["text.prompt_embeds"].to(dtype),
                             pooled_projections=batch["text.pooled_prompt_embeds"].to(dtype),
                             timestep=t.expand(2) * 1000, visual_rope_pos=rope,
                             text_rope_pos=torch.arange(tokens, device=device),
                             return_dict=False)[0]
    return model, call, tuple(shape)


@contextmanager
def sdpa_routed_to(kernel):
    """torch's SDPA calls go to `kernel` where it applies (no mask, no dropout, head dim it
    supports), the rest to SDPA itself."""
    sdpa = F.scaled_dot_product_attention
    counts = {"sage": 0, "sdpa": 0}

    def routed(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               **kwargs):
        if attn_mask is None and dropout_p == 0.0 and not is_causal and scale is None \
                and not kwargs.get("enable_gqa") and query.shape[-1] in (64, 96, 128) \
                and query.dim() == 4:
            counts["sage"] += 1
            return kernel(query, key, value)
        counts["sdpa"] += 1
        return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                    is_causal=is_causal, scale=scale, **kwargs)

    F.scaled_dot_product_attention = routed
    try:
        yield counts
    finally:
        F.scaled_dot_product_attention = sdpa


def sample(call, shape, steps, device, dtype):
    """Euler steps of a flow (x += (t_next - t) * v) from seeded noise; returns the final
    latents and the first denoiser output. The sampler's math is the same for both runs,
    so only attention differs (the families' own schedulers are not needed for a ratio)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    ts = torch.linspace(1.0, 0.0, steps + 1, device=device)
    first = None
    for i in range(steps):
        out = call(x, ts[i].to(dtype))
        first = out.float() if first is None else first
        x = (x.float() + (ts[i + 1] - ts[i]) * out.float()).to(dtype)
    return x.float(), first


def psnr(reference: torch.Tensor, other: torch.Tensor) -> float:
    peak = (reference.max() - reference.min()).item()
    mse = F.mse_loss(other, reference).item()
    return math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def timed_sampling(call, shape, steps, device, dtype):
    sample(call, shape, 2, device, dtype)  # warm-up (kernel selection, Triton compile)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = sample(call, shape, steps, device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=FAMILIES, required=True)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    cuda, device, dtype = bench_device(args.tiny)
    if cuda:
        from sageattention import sageattn

        def sage(q, k, v):
            return sageattn(q, k, v, tensor_layout="HND", is_causal=False)
    else:
        def sage(q, k, v):  # the CPU check has no sageattn: SDPA stands in
            return SDPA(q, k, v)
    model, call, shape = denoiser_and_call(args.family, args.tiny, device, dtype)
    calls = {"sage": "all joint attention (processor)", "sdpa": 0}
    with torch.no_grad():
        sdpa_s, (sdpa_x, sdpa_first) = timed_sampling(call, shape, args.steps, device, dtype)
        if args.family == "sd3":
            from job.speedups.attention import JointAttentionProcessor, swapped_processors

            with swapped_processors(model, JointAttentionProcessor(sage)):
                sage_s, (sage_x, sage_first) = timed_sampling(call, shape, args.steps, device,
                                                              dtype)
        else:
            with sdpa_routed_to(sage) as calls:
                sage_s, (sage_x, sage_first) = timed_sampling(call, shape, args.steps, device,
                                                              dtype)
    line = {"family": args.family, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "steps": args.steps, "latents": list(shape), "sdpa_s": round(sdpa_s, 3),
            "sage_s": round(sage_s, 3), "sage_speedup": round(sdpa_s / sage_s, 3),
            "psnr_final_db": round(psnr(sdpa_x, sage_x), 2),
            "psnr_first_output_db": round(psnr(sdpa_first, sage_first), 2),
            "attention_calls": calls,
            "path": "product processor" if args.family == "sd3" else "bench-only SDPA routing"}
    emit(line, "sage_sampling.jsonl")


if __name__ == "__main__":
    main()
