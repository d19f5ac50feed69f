"""Resolution units: what `resolution` and the image size limits mean for each type.

A megapixel here is 1024 * 1024 pixels, so `resolution = 1.0` with `area` trains around
1024x1024, as the source documents expect.

| resolution_type | resolution            | minimum/maximum/target sizes |
| --------------- | --------------------- | ---------------------------- |
| pixel           | short edge, pixels    | short edge, pixels           |
| area            | megapixels            | megapixels                   |
| pixel_area      | edge in pixels, as an area (1024 -> 1.0 MP) | megapixels |

`resolution = "WxH"` means a pixel area of W*H whatever the type (and its short edge for
pixel-type limits). Nonsense values are errors that say which unit applies, never silent
fixes: a size or area resolution over 64 MP (a 1024 written as megapixels), or a pixel
size or pixel resolution under 16 px (a 0.5 written as pixels). minimum_image_size = 0
means no minimum. An image over maximum_image_size is first shrunk, aspect kept, to
target_downsample_size (or to the training resolution when that is not set).
Torch-free: config validation calls check_sizes.
"""

from __future__ import annotations

import math

from job.config import DatasetTable
from job.errors import ConfigError

MEGAPIXEL = 1024 * 1024
MAX_SANE_MP = 64.0
MIN_SANE_PX = 16.0
LIMITS = ("minimum_image_size", "maximum_image_size", "target_downsample_size")


def uses_pixels(ds: DatasetTable) -> bool:
    """True when sizes are short-edge pixels (resolution_type pixel)."""
    return ds.resolution_type == "pixel"


def target_area_px(ds: DatasetTable) -> float:
    """The training area in pixels (for pixel type: the square of the short edge)."""
    value = ds.resolution
    if isinstance(value, str):
        from job.config import parse_size

        width, height = parse_size(value, f"datasets ({ds.id}).resolution")
        return float(width * height)
    if ds.resolution_type == "area":
        return float(value) * MEGAPIXEL
    return float(value) ** 2


def short_edge_px(ds: DatasetTable) -> float:
    """The training short edge in pixels, for pixel-type bucketing."""
    if isinstance(ds.resolution, str):
        from job.config import parse_size

        return float(min(parse_size(ds.resolution, f"datasets ({ds.id}).resolution")))
    return float(ds.resolution) if uses_pixels(ds) else math.sqrt(target_area_px(ds))


def image_measure(width: int, height: int, ds: DatasetTable) -> float:
    """An image's size in the dataset's unit: short edge px, or megapixels."""
    return float(min(width, height)) if uses_pixels(ds) else width * height / MEGAPIXEL


def too_small(width: int, height: int, ds: DatasetTable) -> bool:
    """True when the image is below minimum_image_size (0 or None: no minimum)."""
    limit = ds.minimum_image_size
    return bool(limit) and image_measure(width, height, ds) < limit


def downsample_size(width: int, height: int, ds: DatasetTable) -> tuple[int, int] | None:
    """The size an oversized image is first shrunk to (aspect kept), or None."""
    limit = ds.maximum_image_size
    if not limit or image_measure(width, height, ds) <= limit:
        return None
    target = ds.target_downsample_size
    if uses_pixels(ds):
        edge = target if target else short_edge_px(ds)
        scale = edge / min(width, height)
    else:
        area = target * MEGAPIXEL if target else target_area_px(ds)
        scale = math.sqrt(area / (width * height))
    scale = min(scale, 1.0)
    return max(1, round(width * scale)), max(1, round(height * scale))


def check_sizes(ds: DatasetTable) -> None:
    """Refuse values that cannot be meant in this dataset's unit."""
    _check_resolution(ds)
    for key in LIMITS:
        value = getattr(ds, key)
        if value is None or (key == "minimum_image_size" and value == 0):
            continue
        if not uses_pixels(ds) and value > MAX_SANE_MP:
            raise ConfigError(
                f"datasets ({ds.id}).{key} = {value} is in megapixels with resolution_type = "
                f'"{ds.resolution_type}", and {value} MP is larger than any training image',
                f"write it in megapixels (1.0 is a 1024x1024 image, so a {value:g} px edge is "
                f'{_edge_to_mp(value)}), or set resolution_type = "pixel"')
        if uses_pixels(ds) and value < MIN_SANE_PX:
            raise ConfigError(
                f'datasets ({ds.id}).{key} = {value} is in pixels with resolution_type = "pixel"',
                f'write a short-edge size in pixels (e.g. 768), or set resolution_type = "area" '
                f"to give {value} in megapixels")


def _check_resolution(ds: DatasetTable) -> None:
    """The training resolution: a 'WxH' that parses, or a positive number in its unit."""
    value, where = ds.resolution, f"datasets ({ds.id}).resolution"
    if isinstance(value, str):
        from job.config import parse_size

        parse_size(value, where)
        return
    if value <= 0:
        raise ConfigError(f"{where} = {value} must be positive",
                          "e.g. resolution = 1024 (pixel) or 1.0 (area)")
    if ds.resolution_type == "area" and value > MAX_SANE_MP:
        raise ConfigError(
            f'{where} = {value} is in megapixels with resolution_type = "area"',
            f"write megapixels ({_edge_to_mp(value)} for a {value:g} px edge), or set "
            'resolution_type = "pixel_area" to give the edge in pixels')
    if ds.resolution_type != "area" and value < MIN_SANE_PX:
        raise ConfigError(
            f'{where} = {value} is in pixels with resolution_type = "{ds.resolution_type}"',
            'write pixels (e.g. 1024), or set resolution_type = "area" to give megapixels')


def _edge_to_mp(edge: float) -> float:
    """Megapixels of a square with this edge in pixels (1024 -> 1.0)."""
    return round(edge * edge / MEGAPIXEL, 3)
