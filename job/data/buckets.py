"""Aspect buckets: the (width, height) every image of a batch is cropped to.

Which bucket an image gets, in order of precedence:

1. `bucket_resolutions` set: the listed size whose aspect is nearest the image's (in log
   space, so 2:1 and 1:2 are equally far from 1:1);
2. `crop` with `crop_aspect = "square"`: a square of the training area;
3. `crop` with `crop_aspect = "closest"`: the nearest of STANDARD_ASPECTS at that area;
4. otherwise (`preserve`, or no crop): the image's own aspect at that area.

Sizes come from job/data/sizes.py: with `resolution_type = "pixel"` the short edge is the
resolution, otherwise width * height is about the training area. Every side is rounded to
the nearest multiple of the alignment, which the caller resolves (the dataset's
aspect_bucket_alignment, else 64 or the family's if larger). Batches are grouped by the
exact (width, height), since only equal sizes stack into one tensor.
"""

from __future__ import annotations

import math

from job.config import DatasetTable, parse_size
from job.data.sizes import short_edge_px, target_area_px, uses_pixels
from job.errors import ConfigError

# Aspect ratios (w/h) for crop_aspect = "closest" when no bucket_resolutions are given.
STANDARD_ASPECTS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16)


def explicit_buckets(ds: DatasetTable) -> list[tuple[int, int]]:
    """bucket_resolutions as (width, height) pairs."""
    return [parse_size(text, f"datasets ({ds.id}).bucket_resolutions")
            for text in ds.bucket_resolutions or []]


def check_buckets(ds: DatasetTable, alignment: int) -> None:
    """Refuse bucket_resolutions whose sides are not multiples of the alignment."""
    for width, height in explicit_buckets(ds):
        if width % alignment or height % alignment:
            raise ConfigError(
                f"datasets ({ds.id}).bucket_resolutions {width}x{height} is not divisible by "
                f"the bucket alignment {alignment}",
                f"use sides that are multiples of {alignment} (e.g. "
                f"{_align(width, alignment)}x{_align(height, alignment)}), or set "
                "aspect_bucket_alignment")


def bucket_for(width: int, height: int, ds: DatasetTable, alignment: int) -> tuple[int, int]:
    """The bucket of an image of this displayed size."""
    aspect = width / height
    buckets = explicit_buckets(ds)
    if buckets:
        return min(buckets, key=lambda b: abs(math.log((b[0] / b[1]) / aspect)))
    if ds.crop and ds.crop_aspect == "square":
        return _sized(1.0, ds, alignment)
    if ds.crop and ds.crop_aspect == "closest":
        nearest = min(STANDARD_ASPECTS, key=lambda a: abs(math.log(a / aspect)))
        return _sized(nearest, ds, alignment)
    return _sized(aspect, ds, alignment)


def _sized(aspect: float, ds: DatasetTable, alignment: int) -> tuple[int, int]:
    """Width and height of this aspect at the training size, rounded to the alignment."""
    if uses_pixels(ds) and not isinstance(ds.resolution, str):
        edge = short_edge_px(ds)
        width, height = (edge * aspect, edge) if aspect >= 1 else (edge, edge / aspect)
    else:
        area = target_area_px(ds)
        width, height = math.sqrt(area * aspect), math.sqrt(area / aspect)
    return _align(width, alignment), _align(height, alignment)


def _align(value: float, alignment: int) -> int:
    """Nearest multiple of the alignment, at least one alignment unit."""
    return max(alignment, int(round(value / alignment)) * alignment)


def aspect_key(width: int, height: int, ds: DatasetTable) -> float:
    """The aspect ratio rounded to aspect_bucket_rounding places (for reports and grouping)."""
    return round(width / height, ds.aspect_bucket_rounding)
