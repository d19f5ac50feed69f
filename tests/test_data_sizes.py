"""Resolution units: every resolution_type x size limit, and the source documents' examples."""

from __future__ import annotations

import pytest

from job.config import DatasetTable
from job.data.sizes import (MEGAPIXEL, check_sizes, downsample_size, image_measure,
                            target_area_px, too_small)
from job.errors import ConfigError


def ds(**kw) -> DatasetTable:
    return DatasetTable(id="d", instance_data_dir="/x", **kw)


# (resolution_type, resolution, key, value, image w x h, expectation)
# expectation: "small"/"ok" for minimum, a (w, h) or None for maximum/target downsampling.
CASES = [
    ("pixel", 1024, "minimum_image_size", 768, (700, 1200), "small"),
    ("pixel", 1024, "minimum_image_size", 768, (800, 1200), "ok"),
    ("area", 1.0, "minimum_image_size", 0.5, (700, 700), "small"),     # 0.47 MP
    ("area", 1.0, "minimum_image_size", 0.5, (800, 700), "ok"),        # 0.53 MP
    ("pixel_area", 1024, "minimum_image_size", 0.5, (700, 700), "small"),
    ("pixel_area", 1024, "minimum_image_size", 0.5, (1024, 512), "ok"),
    ("pixel", 1024, "maximum_image_size", 1536, (2000, 3000), (1024, 1536)),
    ("pixel", 1024, "maximum_image_size", 1536, (1500, 3000), None),   # short edge 1500 fits
    ("area", 1.0, "maximum_image_size", 2.0, (2048, 2048), (1024, 1024)),
    ("area", 1.0, "maximum_image_size", 4.0, (2048, 2048), None),
    ("pixel_area", 1024, "maximum_image_size", 2.0, (2048, 2048), (1024, 1024)),
    ("pixel", 512, "target_downsample_size", 768, (3000, 2000), (1152, 768)),
    ("area", 1.0, "target_downsample_size", 0.25, (4096, 4096), (512, 512)),
    ("pixel_area", 1024, "target_downsample_size", 0.25, (4096, 4096), (512, 512)),
]


@pytest.mark.parametrize("rtype,res,key,value,size,expect", CASES)
def test_units_per_resolution_type(rtype, res, key, value, size, expect) -> None:
    extra = {key: value}
    if key == "target_downsample_size":
        extra["maximum_image_size"] = 1600 if rtype == "pixel" else 3.0
    d = ds(resolution=res, resolution_type=rtype, **extra)
    check_sizes(d)
    if key == "minimum_image_size":
        assert too_small(*size, d) == (expect == "small")
    else:
        assert downsample_size(*size, d) == expect


def test_resolution_to_area() -> None:
    assert target_area_px(ds(resolution=1024)) == 1024 * 1024
    assert target_area_px(ds(resolution=1.0, resolution_type="area")) == MEGAPIXEL
    assert target_area_px(ds(resolution=1024, resolution_type="pixel_area")) == MEGAPIXEL
    assert target_area_px(ds(resolution="1024x768")) == 1024 * 768
    assert image_measure(2048, 1024, ds(resolution=1.0, resolution_type="area")) == 2.0


def test_stage_c_example_is_accepted() -> None:
    d = ds(resolution="1024x1024", minimum_image_size=768, maximum_image_size=1536,
           target_downsample_size=1024, crop=True, crop_style="random",
           bucket_resolutions=["1024x1024", "896x1152", "1152x896"])
    check_sizes(d)
    assert too_small(700, 2000, d) and not too_small(800, 800, d)
    assert downsample_size(2000, 4000, d) == (1024, 2048)


def test_lcm_multidatabackend_example_is_accepted() -> None:
    d = ds(resolution=1.0, resolution_type="area", minimum_image_size=0.5,
           maximum_image_size=1.0, target_downsample_size=1.0)
    check_sizes(d)
    assert downsample_size(2048, 2048, d) == (1024, 1024)


def test_sd3_pixel_area_example_in_pixels_is_refused_with_the_fix() -> None:
    d = ds(resolution=1024, resolution_type="pixel_area", minimum_image_size=0,
           maximum_image_size=1024, target_downsample_size=1024)
    with pytest.raises(ConfigError) as caught:
        check_sizes(d)
    assert "maximum_image_size = 1024" in caught.value.message
    assert "megapixels" in caught.value.message and "1" in caught.value.hint


def test_lcm_config_json_half_a_pixel_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError) as caught:
        check_sizes(ds(resolution=1024, resolution_type="pixel", minimum_image_size=0.5))
    assert "in pixels" in caught.value.message and '"area"' in caught.value.hint


def test_zero_minimum_means_none() -> None:
    d = ds(minimum_image_size=0)
    check_sizes(d)
    assert not too_small(8, 8, d)
