"""Generated images for smoke tests: coloured shapes with captions, written atomically."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

from job.atomic import temp_name
from job.config import DatasetTable
from job.log import get_logger

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
           "yellow": (230, 210, 40), "white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
SIZES = ((96, 96), (128, 96), (96, 128))


def ensure_synthetic(ds: DatasetTable, seed: int = 0) -> bool:
    """Write `ds.synthetic_images` images when the folder is missing or empty; True if written."""
    folder = Path(ds.instance_data_dir)
    if ds.synthetic_images == 0 or (folder.is_dir() and any(folder.iterdir())):
        return False
    tmp = temp_name(folder)  # unique: ranks on several hosts may share the volume
    tmp.mkdir(parents=True)
    rng = random.Random(seed)
    for index in range(ds.synthetic_images):
        image, caption = _shape_image(rng, SIZES[index % len(SIZES)])
        stem = f"{index:04d}_{caption.replace(' ', '_')}"
        image.save(tmp / f"{stem}.png")
        (tmp / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        if folder.is_dir():
            folder.rmdir()  # empty, checked above (fails if another process filled it)
        os.replace(tmp, folder)
    except OSError:
        # Another process (a rank of the same job) wrote the same images first.
        shutil.rmtree(tmp, ignore_errors=True)
        if folder.is_dir() and any(folder.iterdir()):
            return False
        raise
    get_logger().info("synthetic_dataset_written", path=str(folder), images=ds.synthetic_images)
    return True


def _shape_image(rng: random.Random, size: tuple[int, int]) -> tuple[Image.Image, str]:
    """One shape of one colour on a background of another, and its caption."""
    fg, bg = rng.sample(sorted(COLOURS), 2)
    shape = rng.choice(SHAPES)
    width, height = size
    image = Image.new("RGB", size, COLOURS[bg])
    draw = ImageDraw.Draw(image)
    r = min(width, height) // 3
    cx, cy = width // 2 + rng.randint(-8, 8), height // 2 + rng.randint(-8, 8)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[fg])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[fg])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[fg])
    return image, f"a {fg} {shape} on a {bg} background"
