"""From file to bucket-sized pixels, with the SDXL micro-conditioning values."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from job.config import DatasetTable
from job.data.discovery import ImageRecord, discover
from job.data.transforms import prepare_image


def ds(root: Path, **kw) -> DatasetTable:
    return DatasetTable(id="d", instance_data_dir=str(root), **kw)


def only_record(root: Path, name: str) -> ImageRecord:
    return next(r for r in discover(ds(root)).records if r.rel == name)


@pytest.fixture
def box(tmp_path: Path) -> ImageRecord:
    """A 300x200 image: red left half, blue right half."""
    image = Image.new("RGB", (300, 200), (255, 0, 0))
    image.paste((0, 0, 255), (150, 0, 300, 200))
    image.save(tmp_path / "box.png")
    return only_record(tmp_path, "box.png")


def test_center_crop_matches_sdxl_micro_conditioning(box: ImageRecord, tmp_path: Path) -> None:
    image = prepare_image(box, ds(tmp_path, crop=True), (128, 128), random.Random(0))
    assert image.original_size == (200, 300)
    assert image.crop_top_left == (0, 32)  # resized to 192x128, 64 columns to spare
    assert image.target_size == (128, 128)
    assert image.pixels.shape == (3, 128, 128) and image.pixels.dtype == torch.float32
    assert image.pixels.min() >= -1 and image.pixels.max() <= 1
    left, right = image.pixels[:, :, :40], image.pixels[:, :, -40:]
    assert left[0].mean() > 0.95 and left[2].mean() < -0.95    # red
    assert right[2].mean() > 0.95 and right[0].mean() < -0.95  # blue


def test_portrait_crops_rows_and_wide_buckets_keep_bookkeeping(tmp_path: Path) -> None:
    Image.new("RGB", (200, 300), "white").save(tmp_path / "tall.png")
    tall = only_record(tmp_path, "tall.png")
    image = prepare_image(tall, ds(tmp_path), (128, 128), random.Random(0))
    assert image.crop_top_left == (32, 0) and image.original_size == (300, 200)
    wide = prepare_image(tall, ds(tmp_path), (192, 64), random.Random(0))
    # Covering 192x64 needs 192x288: all 224 spare rows are above and below.
    assert wide.crop_top_left == (112, 0) and wide.target_size == (64, 192)
    assert wide.pixels.shape == (3, 64, 192)


def test_small_images_are_upscaled_to_cover_the_bucket(tmp_path: Path) -> None:
    Image.new("RGB", (40, 80), "white").save(tmp_path / "small.png")
    image = prepare_image(only_record(tmp_path, "small.png"), ds(tmp_path), (64, 128),
                          random.Random(0))
    assert image.crop_top_left == (0, 0) and image.pixels.shape == (3, 128, 64)
    assert image.original_size == (80, 40)


def test_random_crop_is_seeded_and_in_bounds(box: ImageRecord, tmp_path: Path) -> None:
    d = ds(tmp_path, crop=True, crop_style="random")
    corners = [prepare_image(box, d, (64, 64), random.Random(s)).crop_top_left
               for s in range(8)]
    assert len(set(corners)) > 1
    assert all(top == 0 and 0 <= left <= 32 for top, left in corners)  # resized to 96x64
    first = prepare_image(box, d, (64, 64), random.Random(3))
    again = prepare_image(box, d, (64, 64), random.Random(3))
    assert first.crop_top_left == again.crop_top_left
    assert torch.equal(first.pixels, again.pixels)


def test_exif_rotated_jpeg_is_upright_with_swapped_size(tmp_path: Path) -> None:
    image = Image.new("RGB", (120, 60), (255, 0, 0))
    image.paste((0, 0, 255), (60, 0, 120, 60))
    exif = image.getexif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: the left half goes on top
    image.save(tmp_path / "rot.jpg", exif=exif)
    prepared = prepare_image(only_record(tmp_path, "rot.jpg"), ds(tmp_path), (64, 128),
                             random.Random(0))
    assert prepared.original_size == (120, 60) and prepared.pixels.shape == (3, 128, 64)
    top, bottom = prepared.pixels[:, :48], prepared.pixels[:, -48:]
    assert top[0].mean() > 0.9 and bottom[2].mean() > 0.9


def test_image_modes_become_rgb(tmp_path: Path) -> None:
    Image.new("RGBA", (64, 64), (0, 0, 255, 0)).save(tmp_path / "clear.png")
    Image.new("L", (64, 64), 64).save(tmp_path / "grey.jpg")
    Image.new("I;16", (64, 64), 65535 // 2).save(tmp_path / "g16.png")
    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([0, 255, 0] * 256)
    palette.save(tmp_path / "pal.png")
    records = {r.rel: r for r in discover(ds(tmp_path)).records}
    out = {name: prepare_image(records[name], ds(tmp_path), (64, 64), random.Random(0)).pixels
           for name in records}
    assert out["clear.png"].min() > 0.99  # transparent over white, not black or blue
    grey = out["grey.jpg"]
    assert torch.allclose(grey[0], grey[1]) and torch.allclose(grey[1], grey[2])
    assert abs(grey.mean().item() - (64 / 127.5 - 1)) < 0.02
    # 16-bit mid-grey stays mid-grey (a plain convert would clip it to white).
    assert abs(out["g16.png"].mean().item()) < 0.02
    assert out["pal.png"][1].min() > 0.99 and out["pal.png"][0].max() < -0.99


def test_oversized_image_reports_its_size_before_downsampling(tmp_path: Path) -> None:
    Image.new("RGB", (600, 400), "white").save(tmp_path / "big.png")
    d = ds(tmp_path, resolution=64, maximum_image_size=128, target_downsample_size=96)
    image = prepare_image(only_record(tmp_path, "big.png"), d, (96, 64), random.Random(0))
    assert image.original_size == (400, 600)
    assert image.crop_top_left == (0, 0) and image.pixels.shape == (3, 64, 96)
