"""Validation prompts and the image grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from job.errors import ConfigError
from job.validate import make_grid, prompt_library
from helpers import tiny_job_config


def test_prompt_library_from_table_and_json_file(tmp_path: Path) -> None:
    cfg = tiny_job_config(tmp_path, validation={"prompt": "a cat", "prompt_library": {"dog": "a dog"}})
    assert prompt_library(cfg) == {"validation": "a cat", "dog": "a dog"}
    library = tmp_path / "prompts.json"
    library.write_text(json.dumps({"portrait": "a portrait", "product": "a bottle"}))
    cfg = tiny_job_config(tmp_path, validation={"prompt_library": str(library)})
    assert prompt_library(cfg) == {"portrait": "a portrait", "product": "a bottle"}


def test_bad_prompt_library_file_is_a_config_error(tmp_path: Path) -> None:
    library = tmp_path / "prompts.json"
    library.write_text(json.dumps(["not", "a", "mapping"]))
    cfg = tiny_job_config(tmp_path, validation={"prompt_library": str(library)})
    with pytest.raises(ConfigError, match="name -> prompt"):
        prompt_library(cfg)
    cfg = tiny_job_config(tmp_path, validation={"prompt_library": str(tmp_path / "missing.json")})
    with pytest.raises(ConfigError, match="cannot be read"):
        prompt_library(cfg)


def test_grid_places_prompts_in_rows_and_sizes_in_columns() -> None:
    red, blue = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (96, 64), "blue")
    grid = make_grid([[red, blue], [blue, red]])
    assert grid.size == (192, 128)
    assert grid.getpixel((10, 10)) == (255, 0, 0) and grid.getpixel((100, 10)) == (0, 0, 255)
    assert grid.getpixel((10, 70)) == (0, 0, 255)
