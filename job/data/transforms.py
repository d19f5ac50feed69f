"""From an image file to bucket-sized pixels and the SDXL-style crop bookkeeping."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from job.config import DatasetTable
from job.data.discovery import ImageRecord, open_oriented
from job.data.sizes import downsample_size


@dataclass
class PreparedImage:
    """Pixels in [-1, 1] and the micro-conditioning values of how they were made."""

    pixels: torch.Tensor
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]


def prepare_image(record: ImageRecord, ds: DatasetTable, bucket: tuple[int, int],
                  rng: random.Random) -> PreparedImage:
    """Open, orient, downsample if oversized, resize to cover the bucket, crop to it."""
    image = open_oriented(record.path)
    original = (image.height, image.width)
    shrink = downsample_size(image.width, image.height, ds)
    if shrink is not None:
        image = image.resize(shrink, Image.Resampling.LANCZOS)
    bucket_w, bucket_h = bucket
    scale = max(bucket_w / image.width, bucket_h / image.height)
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
