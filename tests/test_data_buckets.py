"""Aspect buckets: which (width, height) an image trains at, for every crop setting."""

from __future__ import annotations

import math

import pytest

from job.config import DatasetTable
from job.data.buckets import aspect_key, bucket_for, check_buckets
from job.data.sizes import MEGAPIXEL
from job.errors import ConfigError

AREA = {"resolution": 1.0, "resolution_type": "area"}
STAGE_C = {"resolution": "1024x1024", "crop": True, "crop_style": "random",
           "bucket_resolutions": ["1024x1024", "896x1152", "1152x896"]}


def ds(**kw) -> DatasetTable:
    return DatasetTable(id="d", instance_data_dir="/x", **kw)


# (dataset settings, image w x h, alignment, bucket w x h)
CASES = [
    # preserve (the default with crop = false): own aspect, short edge = resolution (pixel)
    ({"resolution": 64}, (300, 200), 32, (96, 64)),
    ({"resolution": 64}, (200, 300), 32, (64, 96)),
    ({"resolution": 512}, (300, 200), 64, (768, 512)),
    ({"resolution": 512, "crop": True, "crop_aspect": "preserve"}, (300, 200), 64, (768, 512)),
    # crop_aspect = "square" without crop is not a crop: the image keeps its aspect
    ({"resolution": 512, "crop_aspect": "square"}, (300, 200), 64, (768, 512)),
    # area types: width * height is about the area
    ({**AREA}, (1000, 1000), 64, (1024, 1024)),
    ({**AREA}, (1500, 1000), 64, (1280, 832)),   # 1254 x 836 rounded to 64
    ({"resolution": 512, "resolution_type": "pixel_area"}, (300, 200), 64, (640, 448)),
    # a side never rounds to zero
    ({**AREA}, (100_000, 1), 64, (323_840, 64)),  # 3.2 px tall before rounding
    # crop square: a square of the training area
    ({"resolution": 64, "crop": True}, (300, 200), 32, (64, 64)),
    ({**AREA, "crop": True}, (300, 200), 64, (1024, 1024)),
    ({"resolution": 512, "resolution_type": "pixel_area", "crop": True}, (9, 16), 64, (512, 512)),
    # crop closest: nearest of 1:1, 4:3, 3:4, 3:2, 2:3, 16:9, 9:16 at the area
    ({**AREA, "crop": True, "crop_aspect": "closest"}, (1600, 1000), 64, (1280, 832)),  # 3:2
    ({**AREA, "crop": True, "crop_aspect": "closest"}, (1920, 1080), 64, (1344, 768)),  # 16:9
    ({**AREA, "crop": True, "crop_aspect": "closest"}, (1080, 1920), 64, (768, 1344)),  # 9:16
    ({**AREA, "crop": True, "crop_aspect": "closest"}, (1100, 1000), 64, (1024, 1024)),  # 1:1
    ({"resolution": 768, "crop": True, "crop_aspect": "closest"}, (640, 480), 64, (1024, 768)),
    # explicit bucket_resolutions: nearest aspect, in log space (Stage C's buckets)
    (STAGE_C, (900, 1200), 64, (896, 1152)),
    (STAGE_C, (1000, 1000), 64, (1024, 1024)),
    (STAGE_C, (3000, 1000), 64, (1152, 896)),
    (STAGE_C, (10, 10_000), 64, (896, 1152)),
]


@pytest.mark.parametrize("settings,size,alignment,bucket", CASES)
def test_bucket_for(settings, size, alignment, bucket) -> None:
    assert bucket_for(*size, ds(**settings), alignment) == bucket


@pytest.mark.parametrize("aspect", [0.25, 0.5, 0.75, 1.0, 1.33, 1.78, 2.5, 4.0])
def test_area_buckets_keep_the_area_and_alignment(aspect: float) -> None:
    width, height = bucket_for(round(1000 * aspect), 1000, ds(**AREA), 64)
    assert width % 64 == 0 and height % 64 == 0
    # Rounding each side to 64 moves the area by at most one 64-px strip on each side.
    assert abs(width * height - MEGAPIXEL) <= 64 * (width + height)
    assert abs(math.log((width / height) / aspect)) < 0.1


def test_pixel_buckets_keep_the_short_edge() -> None:
    for size in [(300, 200), (200, 300), (1000, 250)]:
        bucket = bucket_for(*size, ds(resolution=256), 64)
        assert min(bucket) == 256 and (bucket[0] > bucket[1]) == (size[0] > size[1])


def test_check_buckets_refuses_unaligned_sizes() -> None:
    check_buckets(ds(**STAGE_C), 64)  # all multiples of 64
    with pytest.raises(ConfigError) as caught:
        check_buckets(ds(resolution=1000, bucket_resolutions=["1024x1024", "1000x1000"]), 64)
    assert "1000x1000" in caught.value.message and "64" in caught.value.message
    assert "1024x1024" in caught.value.hint  # the nearest aligned size
    with pytest.raises(ConfigError, match="not a size"):
        check_buckets(ds(bucket_resolutions=["1024*1024"]), 64)


def test_aspect_key_rounds_to_the_configured_places() -> None:
    assert aspect_key(1920, 1080, ds()) == 1.78
    assert aspect_key(1920, 1080, ds(aspect_bucket_rounding=4)) == 1.7778
    assert aspect_key(1000, 999, ds()) == aspect_key(999, 1000, ds()) == 1.0
