"""Discovery, captions, buckets, transforms and the batch order on real image files."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from PIL import Image

from job.config import DatasetTable
from job.data.buckets import bucket_for
from job.data.captions import caption_for
from job.data.discovery import discover
from job.data.sampler import BucketBatchSampler
from job.data.transforms import prepare_image
from job.errors import ConfigError, DataError


def ds(root: Path, **kw) -> DatasetTable:
    return DatasetTable(id="d", instance_data_dir=str(root), **kw)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    Image.new("RGB", (300, 200), "red").save(tmp_path / "a_red_box.png")
    Image.new("RGBA", (64, 64), (0, 0, 255, 0)).save(tmp_path / "clear.png")
    Image.new("L", (40, 80), 128).save(tmp_path / "sub_grey.jpg")
    (tmp_path / "nested").mkdir()
    rotated = Image.new("RGB", (120, 60), "green")
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90: displayed 60 wide, 120 tall
    rotated.save(tmp_path / "nested" / "rot.jpg", exif=exif)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    good = tmp_path / "whole.png"
    Image.new("RGB", (64, 64), "white").save(good)
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:60])
    (tmp_path / "a_red_box.txt").write_text("  a red box  \n")
    return tmp_path


def test_discovery_skips_unreadable_and_orients(folder: Path) -> None:
    found = discover(ds(folder))
    assert [r.rel for r in found.records] == ["a_red_box.png", "clear.png", "nested/rot.jpg",
                                              "sub_grey.jpg", "whole.png"]
    assert {s.rel for s in found.skipped} == {"empty.png", "garbage.jpg", "truncated.png"}
    rot = next(r for r in found.records if r.rel == "nested/rot.jpg")
    assert (rot.width, rot.height) == (60, 120)


def test_discovery_errors_name_the_dataset(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        discover(ds(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="no images"):
        discover(ds(tmp_path))


def test_caption_strategies(folder: Path) -> None:
    records = {r.rel: r for r in discover(ds(folder)).records}
    box, grey = records["a_red_box.png"], records["sub_grey.jpg"]
    assert caption_for(box, ds(folder)) == "a red box"
    assert caption_for(box, ds(folder, caption_strategy="textfile")) == "a red box"
    assert caption_for(grey, ds(folder, caption_strategy="textfile")) is None
    prompt = ds(folder, caption_strategy="instanceprompt", instance_prompt="sks dog")
    assert caption_for(grey, prompt) == "sks dog"
    prepended = ds(folder, instance_prompt="sks", prepend_instance_prompt=True)
    assert caption_for(box, prepended) == "sks a red box"


def test_buckets_by_crop_aspect(tmp_path: Path) -> None:
    assert bucket_for(300, 200, ds(tmp_path, resolution=64), 32) == (96, 64)
    assert bucket_for(300, 200, ds(tmp_path, resolution=64, crop=True), 32) == (64, 64)
    closest = ds(tmp_path, resolution=1.0, resolution_type="area", crop=True,
                 crop_aspect="closest")
    assert bucket_for(1600, 1000, closest, 64) == (1280, 832)  # nearest of 16:9, 3:2 -> 3:2
    explicit = ds(tmp_path, resolution="1024x1024",
                  bucket_resolutions=["1024x1024", "896x1152", "1152x896"])
    assert bucket_for(900, 1200, explicit, 64) == (896, 1152)
    assert bucket_for(1000, 1000, explicit, 64) == (1024, 1024)


def test_center_crop_bookkeeping_matches_sdxl_micro_conditioning(folder: Path) -> None:
    record = next(r for r in discover(ds(folder)).records if r.rel == "a_red_box.png")
    image = prepare_image(record, ds(folder, crop=True), (128, 128), random.Random(0))
    assert image.original_size == (200, 300) and image.target_size == (128, 128)
    assert image.crop_top_left == (0, 32)  # resized to 192x128, centred
    assert image.pixels.shape == (3, 128, 128)
    assert image.pixels.min() >= -1 and image.pixels.max() <= 1
    assert image.pixels[0].mean() > 0.9 and image.pixels[2].mean() < -0.9  # red


def test_random_crop_is_seeded(folder: Path) -> None:
    record = next(r for r in discover(ds(folder)).records if r.rel == "a_red_box.png")
    d = ds(folder, crop=True, crop_style="random")
    tops = {prepare_image(record, d, (64, 64), random.Random(s)).crop_top_left for s in range(8)}
    assert len(tops) > 1
    again = prepare_image(record, d, (64, 64), random.Random(3)).crop_top_left
    assert again == prepare_image(record, d, (64, 64), random.Random(3)).crop_top_left


def test_transparent_and_rotated_images(folder: Path) -> None:
    records = {r.rel: r for r in discover(ds(folder)).records}
    clear = prepare_image(records["clear.png"], ds(folder), (64, 64), random.Random(0))
    assert clear.pixels.min() > 0.99  # transparent over white, not black or blue
    rot = prepare_image(records["nested/rot.jpg"], ds(folder), (64, 128), random.Random(0))
    assert rot.original_size == (120, 60) and rot.pixels.shape == (3, 128, 64)


def test_sampler_batches_share_a_bucket_and_repeat_deterministically() -> None:
    buckets = [(64, 64)] * 5 + [(96, 64)] * 4 + [(64, 96)]
    sampler = BucketBatchSampler(buckets, batch_size=2, seed=1, repeats=[0] * 9 + [1])
    epoch0 = sampler.batches_for_epoch(0)
    assert all(len({buckets[i] for i in b}) == 1 for b in epoch0)
    assert len(epoch0) == sampler.num_batches_per_epoch() == 2 + 2 + 1
    assert epoch0 == sampler.batches_for_epoch(0) and epoch0 != sampler.batches_for_epoch(1)
    assert sampler.dropped_buckets() == []
    ranks = [BucketBatchSampler(buckets, 2, 1, world_size=2, rank=r).batches_for_epoch(0)
             for r in (0, 1)]
    flat = [i for batches in ranks for b in batches for i in b]
    assert len(ranks[0]) == len(ranks[1]) and len(flat) == len(set(flat))


def test_sampler_without_a_full_bucket_is_a_data_error() -> None:
    with pytest.raises(DataError, match="batch_size"):
        BucketBatchSampler([(64, 64), (96, 64)], batch_size=2, seed=0)
