"""SDXL latent caching throughput at 1024 px: images per second into the latent cache.

A full-size random-init SDXL VAE (stabilityai/stable-diffusion-xl-base-1.0's vae config;
fp32, as SDXL's VAE overflows in fp16) and random 1024x1024 PNGs on disk. Two ways, same
images and VAE batch:

  reference  a plain loop as diffusers' SDXL training example caches: open each image,
             VaeImageProcessor.preprocess, vae.encode(...).latent_dist, kept in memory
  ours       tunejob's caching phase (job/data/prepare.py): reader threads decode the next
             batch while this one encodes, the background writer fsyncs each entry

    python bench/vae_caching.py [--images 64] [--batch 4] [--tiny]

Prints one JSON line and appends it to $OUT/vae_caching.jsonl. --tiny: the tiny SDXL VAE
and 64 px images on the CPU, to check the script.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import emit  # noqa: E402

SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=1024,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025)


def write_images(folder: Path, count: int, size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
            folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"random image number {i}\n")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def reference(vae, folder: Path, batch: int, size: int, device: torch.device) -> float:
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=8)
    paths = sorted(folder.glob("*.png"))
    kept = []
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(paths), batch):
        images = [Image.open(p).convert("RGB") for p in paths[i:i + batch]]
        pixels = processor.preprocess(images, height=size, width=size).to(device)
        latents = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
        kept.append(latents.cpu())
    sync(device)
    return time.perf_counter() - start


def ours(cfg, family, device: torch.device) -> float:
    """Seconds of the caching phase's latent filling (job/data/prepare.py's _fill_latents,
    timed around the call; the captions it caches too are not counted)."""
    import job.data.prepare as prepare

    fill, spent = prepare._fill_latents, []

    def timed_fill(*args, **kwargs):
        sync(device)
        start = time.perf_counter()
        fill(*args, **kwargs)
        sync(device)
        spent.append(time.perf_counter() - start)

    prepare._fill_latents = timed_fill
    try:
        data = prepare.prepare_data(cfg, family)
    finally:
        prepare._fill_latents = fill
    assert data.encoded["latents"] == len(list(Path(cfg.datasets[0].instance_data_dir)
                                                .glob("*.png"))), data.encoded
    return sum(spent)


def main() -> None:
    from diffusers import AutoencoderKL

    from job.config import JobConfig
    from job.models.sdxl import SDXLFamily

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    size, count = (64, 8) if args.tiny else (1024, args.images)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        write_images(root / "data", count, size)
        cfg = JobConfig.model_validate({
            "job": {"name": "bench", "output_dir": str(root / "out"), "device": device.type},
            "model": {"family": "sdxl", "flavour": "tiny", "hub_cache_dir": str(root / "models")},
            "train": {"mixed_precision": "no"},
            "datasets": [{"id": "x", "instance_data_dir": str(root / "data"),
                          "caption_strategy": "textfile", "resolution": size,
                          "aspect_bucket_alignment": 64 if size >= 64 else 32}],
            "cache": {"dir": str(root / "cache"), "vae_batch_size": args.batch},
            "validation": {"eval_split": 0.0}})
        family = SDXLFamily(cfg, device, torch.float32)
        family.load()  # the tiny text encoders: captions are not what is measured
        if not args.tiny:
            torch.manual_seed(0)
            with torch.device(device):
                family.vae = AutoencoderKL(**SDXL_VAE).eval().requires_grad_(False)
        reference(family.vae, root / "data", args.batch, size, device)  # warm-up
        ours_s = ours(cfg, family, device)
        reference_s = reference(family.vae, root / "data", args.batch, size, device)
    emit({"images": count, "resolution": size, "vae_batch": args.batch,
          "device": torch.cuda.get_device_name(0) if cuda else "cpu",
          "ours_images_per_s": round(count / ours_s, 2),
          "reference_images_per_s": round(count / reference_s, 2),
          "ours_over_reference": round(reference_s / ours_s, 3)}, "vae_caching.jsonl")


if __name__ == "__main__":
    main()
