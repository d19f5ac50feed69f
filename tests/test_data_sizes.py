"""Resolution units: every resolution_type x size limit, and the source documents' examples."""

from __future__ import annotations

import pytest

from job.config import DatasetTable
from job.data.sizes import (MEGAPIXEL, check_sizes, downsample_size, image_measure,
                            target_area_px, too_small)
from job.errors import EXIT_BAD_JOB, ConfigError


def ds(**kw) -> DatasetTable:
    return DatasetTable(id="d", instance_data_dir="/x", **kw)


# (resolution_type, resolution, limits, image w x h, expectation); every type x key.
# minimum_image_size rows expect "small"/"ok"; maximum/target rows expect the size the
# image is first downsampled to, or None when it is left alone.
ACCEPTED = [
    # minimum: short-edge pixels for pixel, megapixels for area and pixel_area
    ("pixel", 1024, {"minimum_image_size": 768}, (700, 1200), "small"),
    ("pixel", 1024, {"minimum_image_size": 768}, (800, 1200), "ok"),
    ("area", 1.0, {"minimum_image_size": 0.5}, (700, 700), "small"),       # 0.47 MP
    ("area", 1.0, {"minimum_image_size": 0.5}, (800, 700), "ok"),          # 0.53 MP
    ("pixel_area", 1024, {"minimum_image_size": 0.5}, (700, 700), "small"),
    ("pixel_area", 1024, {"minimum_image_size": 0.5}, (1024, 512), "ok"),  # exactly 0.5 MP
    ("pixel", 1024, {"minimum_image_size": 0}, (8, 8), "ok"),              # 0: no minimum
    ("area", 1.0, {"minimum_image_size": 0}, (8, 8), "ok"),
    # maximum without target: down to the training resolution
    ("pixel", 1024, {"maximum_image_size": 1536}, (2000, 3000), (1024, 1536)),
    ("pixel", 1024, {"maximum_image_size": 1536}, (1500, 3000), None),     # short edge fits
    ("area", 1.0, {"maximum_image_size": 2.0}, (2048, 2048), (1024, 1024)),
    ("area", 1.0, {"maximum_image_size": 4.0}, (2048, 2048), None),
    ("pixel_area", 1024, {"maximum_image_size": 2.0}, (2048, 2048), (1024, 1024)),
    ("pixel_area", 1024, {"maximum_image_size": 2.0}, (1024, 1024), None),
    # target: where an oversized image goes instead of the training resolution
    ("pixel", 512, {"maximum_image_size": 1600, "target_downsample_size": 768},
     (3000, 2000), (1152, 768)),
    ("area", 1.0, {"maximum_image_size": 3.0, "target_downsample_size": 0.25},
     (4096, 4096), (512, 512)),
    ("pixel_area", 1024, {"maximum_image_size": 3.0, "target_downsample_size": 0.25},
     (4096, 4096), (512, 512)),
    # a target above the image never upscales it
    ("area", 1.0, {"maximum_image_size": 1.0, "target_downsample_size": 4.0},
     (1200, 1200), (1200, 1200)),
]


@pytest.mark.parametrize("rtype,res,limits,size,expect", ACCEPTED)
def test_units_per_resolution_type(rtype, res, limits, size, expect) -> None:
    d = ds(resolution=res, resolution_type=rtype, **limits)
    check_sizes(d)
    if "minimum_image_size" in limits:
        assert too_small(*size, d) == (expect == "small")
    else:
        assert downsample_size(*size, d) == expect


# (resolution_type, key, value, words in the message, words in the hint)
REFUSED = [
    ("area", "minimum_image_size", 768, "megapixels", 'resolution_type = "pixel"'),
    ("area", "maximum_image_size", 1024, "megapixels", "1.0"),
    ("area", "target_downsample_size", 1024, "megapixels", "1.0"),
    ("pixel_area", "minimum_image_size", 512, "megapixels", "0.25"),
    ("pixel_area", "maximum_image_size", 1024, "megapixels", "1.0"),
    ("pixel_area", "target_downsample_size", 2048, "megapixels", "4.0"),
    ("pixel", "minimum_image_size", 0.5, "in pixels", 'resolution_type = "area"'),
    ("pixel", "maximum_image_size", 1.0, "in pixels", 'resolution_type = "area"'),
    ("pixel", "target_downsample_size", 8, "in pixels", 'resolution_type = "area"'),
]


@pytest.mark.parametrize("rtype,key,value,said,fix", REFUSED)
def test_sizes_in_the_wrong_unit_are_refused_with_the_fix(rtype, key, value, said, fix) -> None:
    res = 1.0 if rtype == "area" else 1024
    with pytest.raises(ConfigError) as caught:
        check_sizes(ds(resolution=res, resolution_type=rtype, **{key: value}))
    assert f"{key} = {value}" in caught.value.message and said in caught.value.message
    assert fix in caught.value.hint
    assert caught.value.exit_code == EXIT_BAD_JOB


@pytest.mark.parametrize("rtype,res,fix", [
    ("area", 1024, "pixel_area"),         # 1024 "megapixels"
    ("pixel", 1.0, '"area"'),             # a one-pixel edge
    ("pixel_area", 0.5, '"area"'),
    ("pixel", "1024by1024", "WIDTHxHEIGHT"),
])
def test_resolutions_in_the_wrong_unit_are_refused(rtype, res, fix) -> None:
    with pytest.raises(ConfigError) as caught:
        check_sizes(ds(resolution=res, resolution_type=rtype))
    assert "resolution" in caught.value.message and fix in caught.value.hint


def test_resolution_to_area_and_measure() -> None:
    assert target_area_px(ds(resolution=1024)) == 1024 * 1024
    assert target_area_px(ds(resolution=1.0, resolution_type="area")) == MEGAPIXEL
    assert target_area_px(ds(resolution=1024, resolution_type="pixel_area")) == MEGAPIXEL
    assert target_area_px(ds(resolution=512, resolution_type="pixel_area")) == MEGAPIXEL / 4
    for rtype in ("pixel", "area", "pixel_area"):  # 'WxH' is a pixel area whatever the type
        assert target_area_px(ds(resolution="1024x768", resolution_type=rtype)) == 1024 * 768
    assert image_measure(2048, 1024, ds(resolution=1.0, resolution_type="area")) == 2.0
    assert image_measure(2048, 1024, ds(resolution=1024)) == 1024.0


def test_stage_c_example_is_accepted() -> None:
    d = ds(resolution="1024x1024", minimum_image_size=768, maximum_image_size=1536,
           target_downsample_size=1024, crop=True, crop_style="random",
           bucket_resolutions=["1024x1024", "896x1152", "1152x896"])
    check_sizes(d)
    assert too_small(700, 2000, d) and not too_small(800, 800, d)
    assert downsample_size(2000, 4000, d) == (1024, 2048)
    assert downsample_size(1536, 4000, d) is None


def test_lcm_multidatabackend_example_is_accepted() -> None:
    d = ds(resolution=1.0, resolution_type="area", minimum_image_size=0.5,
           maximum_image_size=1.0, target_downsample_size=1.0)
    check_sizes(d)
    assert downsample_size(2048, 2048, d) == (1024, 1024)
    assert too_small(512, 512, d) and not too_small(1024, 1024, d)


def test_sd3_pixel_area_example_in_pixels_is_refused_with_the_fix() -> None:
    d = ds(resolution=1024, resolution_type="pixel_area", minimum_image_size=0,
           maximum_image_size=1024, target_downsample_size=1024)
    with pytest.raises(ConfigError) as caught:
        check_sizes(d)
    assert "maximum_image_size = 1024" in caught.value.message
    assert "megapixels" in caught.value.message
    assert "1.0" in caught.value.hint and 'resolution_type = "pixel"' in caught.value.hint


def test_lcm_config_json_half_a_pixel_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError) as caught:
        check_sizes(ds(resolution=1024, resolution_type="pixel", minimum_image_size=0.5,
                       maximum_image_size=1.0))
    assert "minimum_image_size = 0.5" in caught.value.message
    assert "in pixels" in caught.value.message and '"area"' in caught.value.hint
