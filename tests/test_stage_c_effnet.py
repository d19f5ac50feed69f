"""Stage C latents: the released EfficientNet encoder's layout, the resize rule, and the
latent grid of every bucket equal to the grid the stock prior pipeline samples."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableCascadePriorPipeline
from safetensors.torch import save_file

from job.config import DatasetTable
from job.data.buckets import bucket_for
from job.errors import ConfigError
from job.models.stable_cascade_effnet import (EFFNET_FILE, EfficientNetEncoder, IMAGENET_MEAN,
                                              IMAGENET_STD, effnet_input_size, load_effnet,
                                              released_backbone)
from stage_c_helpers import decoder_folder, prior_folder


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    prior_folder(folder)
    decoder_folder(folder)
    return folder


@pytest.fixture(scope="module")
def effnet(models_dir: Path) -> EfficientNetEncoder:
    return load_effnet(decoder_folder(models_dir) / EFFNET_FILE, tiny=True, where="test")


def test_resize_rule_matches_the_issue_examples() -> None:
    assert effnet_input_size(1024, 1024) == (768, 768)
    assert effnet_input_size(896, 1152) == (672, 864)
    assert effnet_input_size(1152, 896) == (864, 672)


def _stage_c_buckets() -> set[tuple[int, int]]:
    """Every bucket the data layer makes for 1024-class images: the explicit buckets of
    jobs/stage_c.toml, and aspect-preserving buckets of images from 1:2.5 to 2.5:1."""
    explicit = DatasetTable.model_validate({
        "id": "a", "instance_data_dir": "x", "resolution": 1024, "resolution_type": "pixel_area",
        "crop": True, "crop_aspect": "closest",
        "bucket_resolutions": ["1024x1024", "896x1152", "1152x896"]})
    preserve = DatasetTable.model_validate({
        "id": "b", "instance_data_dir": "x", "resolution": 1024, "resolution_type": "pixel_area",
        "crop": True, "crop_aspect": "preserve"})
    buckets = set()
    for width in range(400, 2600, 100):
        for height in (400, 1000, 2000):
            for ds in (explicit, preserve):
                buckets.add(bucket_for(width, height, ds, 64))
    return buckets


def test_every_bucket_gives_the_prior_pipelines_latent_grid(models_dir: Path,
                                                            effnet: EfficientNetEncoder) -> None:
    pipeline = StableCascadePriorPipeline.from_pretrained(str(prior_folder(models_dir)))
    buckets = _stage_c_buckets()
    assert {(1024, 1024), (896, 1152), (1152, 896)} <= buckets and len(buckets) > 10
    for width, height in sorted(buckets):
        pixels = torch.rand(1, 3, height, width) * 2 - 1
        latents = effnet.encode(pixels)
        expected = pipeline.prepare_latents(1, height, width, 1, torch.float32, "cpu", None,
                                            None, pipeline.scheduler)
        assert latents.shape == expected.shape, (width, height)
    assert effnet.encode(torch.zeros(1, 3, 1024, 1024)).shape[-2:] == (24, 24)
    assert effnet.encode(torch.zeros(1, 3, 1152, 896)).shape[-2:] == (27, 21)


def test_encode_is_imagenet_normalised_resized_pixels_in_0_1(effnet: EfficientNetEncoder) -> None:
    pixels = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    images = torch.nn.functional.interpolate((pixels + 1) / 2, size=(96, 96), mode="bilinear",
                                             antialias=True, align_corners=False)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = effnet((images - mean) / std)
    torch.testing.assert_close(effnet.encode(pixels), expected)
    # Eval mode: batch norm uses the released running statistics, so a sample's latent
    # does not depend on the rest of its batch.
    torch.testing.assert_close(effnet.encode(pixels[:1]), expected[:1], atol=1e-5, rtol=1e-5)


def test_released_architecture_loads_a_file_in_the_released_key_layout(tmp_path: Path) -> None:
    encoder = EfficientNetEncoder(released_backbone())
    state = encoder.state_dict()
    assert {k.split(".")[0] for k in state} == {"backbone", "mapper"}
    assert tuple(state["mapper.0.weight"].shape) == (16, 1280, 1, 1)
    assert "mapper.1.running_var" in state and "mapper.1.weight" not in state  # affine=False
    torch.manual_seed(0)
    state = {k: (torch.randn_like(v) if v.is_floating_point() else v) for k, v in state.items()}
    state = {k: (v.abs() + 0.5 if "running_var" in k else v) for k, v in state.items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / EFFNET_FILE))
    loaded = load_effnet(tmp_path / EFFNET_FILE, tiny=False, where="test")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(loaded.mapper[0].weight, state["mapper.0.weight"])
    assert loaded.encode(torch.zeros(1, 3, 128, 128)).shape == (1, 16, 3, 3)


def test_missing_or_wrong_effnet_file_is_exit_2_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as missing:
        load_effnet(tmp_path / EFFNET_FILE, tiny=True, where="stable_cascade.effnet_encoder_path")
    assert missing.value.exit_code == 2
    assert EFFNET_FILE in str(missing.value) and "effnet_encoder_path" in str(missing.value)
    save_file({"mapper.0.weight": torch.zeros(16, 1280, 1, 1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match="not an effnet_encoder.safetensors"):
        load_effnet(tmp_path / "other.safetensors", tiny=True, where="test")
