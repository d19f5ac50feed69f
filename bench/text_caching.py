"""Stage C text-embedding caching throughput: prompts per second into the cache.

A full-size random-init CLIP-G text encoder (CLIPTextModelWithProjection: width 1280, 32
layers, projection 1280; the weights do not change the cost) in the dtype the job caches
with, prompts padded to 77 tokens as the family pads them. Two ways, same prompts:

  reference  the stock StableCascadePriorPipeline.encode_prompt, one call per batch, the
             results kept in memory (no files: the ratio favours it)
  ours       StableCascadeFamily.encode_text per batch + the cache's background writer
             (job/data/prepare.py's CacheWriter), each entry written and fsynced

    python bench/text_caching.py [--prompts 2048] [--batch 16,64,256] [--tiny]

Prints JSON per batch size (prompts/s for both, the ratio) and writes $OUT/text_caching.json
when OUT is set. The issue's target: >= 100 prompts/s on one H100 (the Stage C guide expects
8-12). --tiny: a small CLIP-G on the CPU, to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from job.config import JobConfig  # noqa: E402
from job.data.cache import EntryCache  # noqa: E402
from job.data.prepare import CacheWriter  # noqa: E402
from job.models.sdxl_tiny import build_tokenizer  # noqa: E402
from job.models.stable_cascade import StableCascadeFamily  # noqa: E402

CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, projection_dim=1280,
              hidden_act="gelu")
TINY = dict(CLIP_G, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, projection_dim=64)
WORDS = "a photo of the red circle on a yellow square with blue sky and green grass".split()


def prompts(count: int) -> list[str]:
    """Captions of 8-40 words, different from each other."""
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(8 + i % 33))
            for i in range(count)]


def make_family(config: dict, device: torch.device, dtype: torch.dtype, folder: Path):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = JobConfig.model_validate({
        "job": {"name": "bench", "output_dir": str(folder)},
        "model": {"family": "stable_cascade"},
        "datasets": [{"id": "x", "instance_data_dir": str(folder), "synthetic_images": 1}]})
    family = StableCascadeFamily(cfg, device, dtype)
    family.tokenizer = build_tokenizer(folder / "tokenizer", "<|endoftext|>")
    torch.manual_seed(0)
    with torch.device(device):
        family.text_encoder = CLIPTextModelWithProjection(
            CLIPTextConfig(**config)).to(dtype).eval().requires_grad_(False)
    return family


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def ours(family, texts: list[str], batch: int, cache: EntryCache) -> float:
    """Seconds to encode and write every prompt as the caching phase does."""
    start = time.perf_counter()
    with CacheWriter(64) as writer:
        for i in range(0, len(texts), batch):
            chunk = texts[i:i + batch]
            for j, tensors in enumerate(family.encode_text(chunk)):
                writer.submit(cache.save, f"p{i + j}", tensors)
    return time.perf_counter() - start


@torch.no_grad()
def reference(family, texts: list[str], batch: int, device: torch.device) -> float:
    """Seconds for the stock pipeline's encode_prompt over the same batches (kept in
    memory, no writes)."""
    from diffusers import StableCascadePriorPipeline

    pipeline = StableCascadePriorPipeline(tokenizer=family.tokenizer,
                                          text_encoder=family.text_encoder, prior=None,
                                          scheduler=None)
    start = time.perf_counter()
    kept = []
    for i in range(0, len(texts), batch):
        chunk = texts[i:i + batch]
        embeds, pooled, _, _ = pipeline.encode_prompt(
            device=device, batch_size=len(chunk), num_images_per_prompt=1,
            do_classifier_free_guidance=False, prompt=chunk)
        kept.append((embeds.cpu(), pooled.cpu()))
    sync(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=2048)
    parser.add_argument("--batch", default="16,64,256")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    count = 64 if args.tiny else args.prompts
    texts = prompts(count)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        family = make_family(TINY if args.tiny else CLIP_G, device, dtype, Path(scratch))
        family.encode_text(texts[:8])  # warm-up (kernels, allocator)
        reference(family, texts[:8], 8, device)
        for batch in [int(b) for b in args.batch.split(",")]:
            cache = EntryCache(Path(scratch) / f"cache{batch}", "text", {"batch": batch})
            mine = ours(family, texts, batch, cache)
            theirs = reference(family, texts, batch, device)
            written = len(list((Path(scratch) / f"cache{batch}").rglob("*.safetensors")))
            results.append({
                "batch": batch, "prompts": count, "device": torch.cuda.get_device_name(0)
                if cuda else "cpu", "dtype": str(dtype), "written": written,
                "ours_prompts_per_s": round(count / mine, 1),
                "reference_prompts_per_s": round(count / theirs, 1),
                "ratio": round(theirs / mine, 2)})
            print(json.dumps(results[-1]), flush=True)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "text_caching.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
