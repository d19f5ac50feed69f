"""From an image file to bucket-sized pixels and the SDXL-style crop bookkeeping.

The three sizes recorded are what SDXL's micro-conditioning takes (and what the diffusers
SDXL training examples feed): the original size after EXIF orientation, the crop's
top-left corner in the resized image, and the target (bucket) size, all as (h, w).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from PIL import Image, ImageOps
from torchvision.transforms.functional import pil_to_tensor

from job.config import DatasetTable
from job.data.discovery import ImageRecord
from job.data.sizes import downsample_size

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


@dataclass
class PreparedImage:
    """Pixels [3, H, W] float32 in [-1, 1], and the micro-conditioning values that made them."""

    pixels: torch.Tensor
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]

    def pil(self) -> Image.Image:
        """The pixels as an 8-bit RGB image (what a pipeline takes as an input image)."""
        array = self.pixels.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)
        return Image.fromarray(array.permute(1, 2, 0).numpy())


def prepare_image(record: ImageRecord, ds: DatasetTable, bucket: tuple[int, int],
                  rng: random.Random) -> PreparedImage:
    """Open, orient, downsample if oversized, resize to cover the bucket, crop to it."""
    return _fit_to_bucket(open_oriented(record.path), ds, bucket, rng)


def prepare_conditioning(record: ImageRecord, path: str, ds: DatasetTable,
                         bucket: tuple[int, int], rng: random.Random) -> PreparedImage:
    """The conditioning image paired with `record`, cropped exactly as the training image:
    brought to the training image's size first, then the same transform with an rng in the
    same state."""
    image = open_oriented(path)
    if image.size != (record.width, record.height):
        image = image.resize((record.width, record.height), Image.Resampling.LANCZOS)
    return _fit_to_bucket(image, ds, bucket, rng)


def _fit_to_bucket(image: Image.Image, ds: DatasetTable, bucket: tuple[int, int],
                   rng: random.Random) -> PreparedImage:
    original = (image.height, image.width)
    shrink = downsample_size(image.width, image.height, ds)
    if shrink is not None:
        image = image.resize(shrink, Image.Resampling.LANCZOS)
    bucket_w, bucket_h = bucket
    scale = max(bucket_w / image.width, bucket_h / image.height)
    # max(): rounding must never leave the resized image a pixel short of the bucket.
    resized_w = max(bucket_w, round(image.width * scale))
    resized_h = max(bucket_h, round(image.height * scale))
    image = image.resize((resized_w, resized_h), Image.Resampling.LANCZOS)
    if ds.crop_style == "random":
        top, left = rng.randint(0, resized_h - bucket_h), rng.randint(0, resized_w - bucket_w)
    else:
        top, left = (resized_h - bucket_h) // 2, (resized_w - bucket_w) // 2
    image = image.crop((left, top, left + bucket_w, top + bucket_h))
    pixels = pil_to_tensor(image).float().div_(127.5).sub_(1.0)
    return PreparedImage(pixels, original, (top, left), (bucket_h, bucket_w))


def open_oriented(path: str) -> Image.Image:
    """The image as displayed: EXIF orientation applied, 8-bit RGB."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: transparency over white, 16-bit scaled, palettes expanded."""
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        # Transparent pixels over white, not over whatever colour they happen to hold.
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode.startswith("I"):
        # 16-bit greyscale: scale to 8 bits; a plain convert would clip everything above 255.
        image = image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    return image.convert("RGB")
