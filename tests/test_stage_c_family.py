"""The Stage C family on the tiny prior and decoder: conditioning parity with the stock
prior pipeline, the fp16 prompt cache, LoRA export and its loading snippet, the merged
export, and validation through the stock decoder (released layout) or previews."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableCascadeDecoderPipeline, StableCascadePriorPipeline

from job.models.stable_cascade import TEXT_CACHE_DTYPE
from job.models.stable_cascade_output import ADAPTER_WEIGHTS, LOADER_SNIPPET, load_decoder_pipeline
from helpers import assert_an_unsharded_copy_exports_in_place
from stage_c_helpers import CAPTIONS, decoder_folder, load_family, make_batch, prior_folder


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    prior_folder(folder)
    decoder_folder(folder)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, models_dir: Path):
    """A family with a LoRA pushed away from zero, and its exported adapter folder."""
    tmp = tmp_path_factory.mktemp("trained")
    family = load_family(tmp, models_dir, lora={"rank": 4, "alpha": 8.0})
    family.add_lora()
    with torch.no_grad():
        for name, param in family.prior.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    family.save_final(tmp / "final")
    return family, tmp / "final"


def _prior_output(prior: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(batch["latents"].shape, generator=generator)
    with torch.no_grad():
        return prior(sample=noisy, timestep_ratio=torch.full((noisy.shape[0],), 0.5),
                     clip_text_pooled=batch["text.prompt_embeds_pooled"].float(),
                     clip_text=batch["text.prompt_embeds"].float(),
                     clip_img=torch.zeros(noisy.shape[0], 1, prior.config.clip_image_in_channels),
                     return_dict=False)[0]


def test_encode_text_equals_prior_pipeline_encode_prompt(tmp_path: Path, models_dir: Path) -> None:
    family = load_family(tmp_path, models_dir)
    pipeline = StableCascadePriorPipeline.from_pretrained(str(prior_folder(models_dir)))
    ours = family.encode_text(CAPTIONS)
    embeds, pooled, _, _ = pipeline.encode_prompt("cpu", len(CAPTIONS), 1, False, prompt=CAPTIONS)
    assert ours[0]["prompt_embeds"].shape == (77, 32) and ours[0]["prompt_embeds_pooled"].shape == (1, 32)
    for i, entry in enumerate(ours):
        assert entry["prompt_embeds"].dtype == TEXT_CACHE_DTYPE
        torch.testing.assert_close(entry["prompt_embeds"], embeds[i].to(TEXT_CACHE_DTYPE))
        torch.testing.assert_close(entry["prompt_embeds_pooled"], pooled[i].to(TEXT_CACHE_DTYPE))
    # The attention mask matters: without it the padding positions differ.
    tokens = family.tokenizer(CAPTIONS[:1], padding="max_length", max_length=77, return_tensors="pt")
    unmasked = family.text_encoder(tokens.input_ids, output_hidden_states=True).hidden_states[-1]
    assert not torch.allclose(unmasked[0].to(TEXT_CACHE_DTYPE), ours[0]["prompt_embeds"])


def test_prompt_cache_entry_is_under_200_kib_at_released_sizes(tmp_path: Path,
                                                               models_dir: Path) -> None:
    from safetensors.torch import save_file

    family = load_family(tmp_path, models_dir)
    entry = family.encode_text(CAPTIONS[:1])[0]
    save_file(entry, str(tmp_path / "entry.safetensors"))
    assert (tmp_path / "entry.safetensors").stat().st_size < family.text_entry_bytes() + 512
    # CLIP-G (bigG): 77 tokens x 1280 and a pooled 1280, in fp16.
    family.text_encoder.config.hidden_size = family.text_encoder.config.projection_dim = 1280
    assert family.text_entry_bytes() == (77 * 1280 + 1280) * 2 <= 200 * 1024


def test_lora_changes_the_prior_and_the_snippet_loads_it_into_the_stock_prior(
        trained, models_dir: Path) -> None:
    family, folder = trained
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [ADAPTER_WEIGHTS, "adapter_config.json", LOADER_SNIPPET])
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)
    batch = make_batch(family)
    ours = _prior_output(family.prior, batch)
    snippet = runpy.run_path(str(folder / LOADER_SNIPPET))
    pipeline = snippet["load_prior_pipeline"](base=str(prior_folder(models_dir)))
    assert isinstance(pipeline, StableCascadePriorPipeline)
    stock = StableCascadePriorPipeline.from_pretrained(str(prior_folder(models_dir)))
    torch.testing.assert_close(_prior_output(pipeline.prior, batch), ours, atol=1e-5, rtol=1e-5)
    assert (_prior_output(stock.prior, batch) - ours).abs().max() > 1e-3


def test_merged_export_loads_with_from_pretrained_and_equals_the_lora(trained, tmp_path: Path) -> None:
    family, folder = trained
    family.export_merged(folder, tmp_path / "merged")
    pipeline = StableCascadePriorPipeline.from_pretrained(str(tmp_path / "merged"))
    assert not any("lora" in k for k in pipeline.prior.state_dict())
    batch = make_batch(family)
    torch.testing.assert_close(_prior_output(pipeline.prior, batch),
                               _prior_output(family.prior, batch), atol=1e-4, rtol=1e-4)


def test_released_decoder_layout_loads_where_from_pretrained_fails(models_dir: Path) -> None:
    folder = decoder_folder(models_dir)
    assert json.loads((folder / "model_index.json").read_text())["vqgan"][0] == "wuerstchen"
    with pytest.raises(ValueError, match="wuerstchen"):
        StableCascadeDecoderPipeline.from_pretrained(str(folder))
    for subfolder in ("decoder", "decoder_lite"):
        pipeline = load_decoder_pipeline(str(folder), subfolder, {}, torch.float32)
        assert isinstance(pipeline, StableCascadeDecoderPipeline)
        assert pipeline.config.latent_dim_scale == 10.67


def test_validation_decodes_through_the_stock_decoder(trained) -> None:
    family, _ = trained
    image = family.sample("a red circle", "", 64, 64, 4.0, 2, seed=0)
    again = family.sample("a red circle", "", 64, 64, 4.0, 2, seed=0)
    assert image.size == (84, 84)  # the stock decoder's size for a 2x2 prior grid
    assert image.tobytes() == again.tobytes()


def test_without_decoder_saves_latents_and_a_preview(tmp_path: Path, models_dir: Path) -> None:
    from safetensors.torch import load_file

    family = load_family(tmp_path, models_dir, stable_cascade={"use_decoder_for_validation": False})
    image = family.sample("a red circle", "", 128, 64, 4.0, 2, seed=0)
    assert image.size == (128, 64) and family._decoder_pipeline is None
    saved = list((tmp_path / "output" / "tiny" / "validation" / "prior-latents").glob("*.safetensors"))
    assert len(saved) == 1
    assert load_file(str(saved[0]))["image_embeddings"].shape == (1, 16, 2, 3)
    assert len(np.unique(np.asarray(image).reshape(-1, 3), axis=0)) > 1  # not one flat colour


def test_prior_guidance_wins_over_validation_guidance(tmp_path: Path, models_dir: Path) -> None:
    family = load_family(tmp_path, models_dir, stable_cascade={
        "use_decoder_for_validation": False, "validation_prior_guidance_scale": 1.0,
        "validation_prior_num_inference_steps": 2})
    seen = []
    family._prior_pipeline().prior.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["sample"].shape[0]), with_kwargs=True)
    family.sample("a red circle", "", 64, 64, 7.0, 2, seed=0)
    assert seen == [1, 1]  # guidance 1.0 from [stable_cascade]: no CFG batch of 2


def release_previewer_state() -> dict[str, torch.Tensor]:
    """Random tensors in the key layout and shapes of the release's previewer.safetensors
    (written out here from the release's architecture, not from our module)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"blocks.0.weight": (512, 16, 1, 1), "blocks.3.weight": (512, 512, 3, 3),
              "blocks.6.weight": (512, 256, 2, 2), "blocks.9.weight": (256, 256, 3, 3),
              "blocks.12.weight": (256, 128, 2, 2), "blocks.15.weight": (128, 128, 3, 3),
              "blocks.18.weight": (128, 128, 2, 2), "blocks.21.weight": (128, 128, 3, 3),
              "blocks.24.weight": (3, 128, 1, 1)}
    state = {}
    for key, shape in shapes.items():
        state[key] = torch.randn(shape, generator=g) * 0.05
        out = shape[1] if "blocks.6." in key or "blocks.12." in key or "blocks.18." in key \
            else shape[0]
        state[key.replace("weight", "bias")] = torch.zeros(out)
    for index, width in ((2, 512), (5, 512), (8, 256), (11, 256), (14, 128), (17, 128),
                         (20, 128), (23, 128)):
        state.update({f"blocks.{index}.weight": torch.ones(width),
                      f"blocks.{index}.bias": torch.zeros(width),
                      f"blocks.{index}.running_mean": torch.zeros(width),
                      f"blocks.{index}.running_var": torch.ones(width),
                      f"blocks.{index}.num_batches_tracked": torch.tensor(0)})
    return state


def test_release_previewer_weights_make_the_previews(tmp_path: Path, models_dir: Path) -> None:
    from safetensors.torch import save_file

    from job.errors import ConfigError
    from job.models.stable_cascade_output import load_previewer

    path = tmp_path / "previewer.safetensors"
    save_file(release_previewer_state(), str(path))
    previewer = load_previewer(str(path))
    assert previewer(torch.randn(1, 16, 24, 24)).shape == (1, 3, 192, 192)
    family = load_family(tmp_path, models_dir, stable_cascade={
        "use_decoder_for_validation": False, "previewer_path": str(path)})
    image = family.sample("a red circle", "", 128, 64, 4.0, 2, seed=0)
    plain = load_family(tmp_path, models_dir, stable_cascade={"use_decoder_for_validation": False})
    assert image.size == (128, 64)
    assert image.tobytes() != plain.sample("a red circle", "", 128, 64, 4.0, 2, seed=0).tobytes()
    broken = tmp_path / "broken.safetensors"
    save_file({"blocks.0.weight": torch.zeros(4, 4, 1, 1)}, str(broken))
    with pytest.raises(ConfigError, match="is not the release's previewer"):
        load_previewer(str(broken))


def test_an_unsharded_copy_exports_in_the_priors_place(tmp_path: Path, models_dir: Path) -> None:
    from diffusers import StableCascadeUNet

    family = load_family(tmp_path, models_dir, model={"model_type": "full"})
    assert_an_unsharded_copy_exports_in_place(
        family, tmp_path / "final",
        lambda folder: StableCascadeUNet.from_pretrained(folder, subfolder="prior"))
