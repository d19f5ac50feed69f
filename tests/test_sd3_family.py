"""The SD3 family on the tiny model: stock-pipeline parity of the text conditioning, the
unconditional inputs, LoRA training and export, and skip-layer guidance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel

from helpers import (assert_an_unsharded_copy_exports_in_place,
                     assert_exported_lora_acts_in_the_stock_pipeline,
                     assert_trained_state_round_trips, fit_fixed_batch)
from job.data.batches import BatchLoader
from job.data.prepare import prepare_data
from job.errors import ConfigError
from job.models.sd3_output import PIPELINE_PARTS
from job.models.sd3_tiny import SCALING_FACTOR, SHIFT_FACTOR
from sd3_helpers import (CAPTIONS, load_family, make_batch, record_transformer_inputs,
                         sd3_config, stock_pipeline, tiny_folder)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    tiny_folder(folder)
    return folder


@pytest.fixture(scope="module")
def pipeline(models_dir: Path):
    return stock_pipeline(tiny_folder(models_dir))


def test_tiny_model_is_shaped_like_sd35(models_dir: Path) -> None:
    folder = tiny_folder(models_dir)
    assert sorted(p.name for p in folder.iterdir()) == sorted(("model_index.json",
                                                               *PIPELINE_PARTS))
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 4 * 2**20
    transformer = SD3Transformer2DModel.from_pretrained(str(folder), subfolder="transformer")
    assert transformer.config.num_layers >= 4 and transformer.config.in_channels == 16
    assert transformer.config.qk_norm == "rms_norm"
    vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae")
    assert vae.config.latent_channels == 16
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (SCALING_FACTOR, SHIFT_FACTOR)


def test_encode_text_equals_pipeline_encode_prompt(tmp_path: Path, models_dir: Path,
                                                   pipeline) -> None:
    for length in (154, 77):
        family = load_family(tmp_path, models_dir, sd3={"tokenizer_max_length": length})
        ours = family.encode_text(CAPTIONS)
        with torch.no_grad():
            embeds, _, pooled, _ = pipeline.encode_prompt(
                CAPTIONS, None, None, device="cpu", do_classifier_free_guidance=False,
                max_sequence_length=length)
        width = pipeline.text_encoder_3.config.d_model
        assert ours[0]["prompt_embeds"].shape == (77 + length, width)
        for i, entry in enumerate(ours):
            torch.testing.assert_close(entry["prompt_embeds"], embeds[i], atol=1e-5, rtol=0)
            torch.testing.assert_close(entry["pooled_prompt_embeds"], pooled[i], atol=1e-5,
                                       rtol=0)
    # CLIP features padded with zeros up to T5's width; T5 rows are not padded.
    clip = (pipeline.text_encoder.config.hidden_size + pipeline.text_encoder_2.config.hidden_size)
    assert clip < width and ours[0]["prompt_embeds"][:77, clip:].abs().sum() == 0
    assert ours[0]["prompt_embeds"][77:, clip:].abs().sum() > 0


def test_t5_padding_zero_zeroes_padding_positions_only(tmp_path: Path, models_dir: Path) -> None:
    plain = load_family(tmp_path, models_dir).encode_text(CAPTIONS[:1])[0]["prompt_embeds"]
    family = load_family(tmp_path, models_dir, sd3={"t5_padding": "zero"})
    zeroed = family.encode_text(CAPTIONS[:1])[0]["prompt_embeds"]
    real = len(family.tokenizer_3(CAPTIONS[0]).input_ids)  # its tokens and </s>
    torch.testing.assert_close(zeroed[:77 + real], plain[:77 + real])
    assert zeroed[77 + real:].abs().sum() == 0 and plain[77 + real:].abs().sum() > 0
    assert plain.shape == zeroed.shape


UNCOND = [("empty_string", "empty_string"), ("zero", "empty_string"), ("empty_string", "zero")]


@pytest.mark.parametrize("clip, t5", UNCOND, ids=["-".join(u) for u in UNCOND])
def test_caption_dropout_feeds_the_configured_unconditional_input(
        tmp_path: Path, models_dir: Path, pipeline, clip: str, t5: str) -> None:
    """Through the real data path: cache, batch with captions dropped, transformer input."""
    sd3 = {"clip_uncond_behaviour": clip, "t5_uncond_behaviour": t5}
    cfg = sd3_config(tmp_path, models_dir, sd3=sd3)
    family = load_family(tmp_path, models_dir, sd3=sd3)
    data = prepare_data(cfg, family)
    samples = data.train[:2]
    batch = BatchLoader(data, torch.device("cpu")).load(samples, [True, False])
    seen = record_transformer_inputs(family)
    family.training_loss(batch, torch.Generator().manual_seed(0))
    fed, pooled = seen[0]["encoder_hidden_states"], seen[0]["pooled_projections"]
    with torch.no_grad():
        _, empty, _, empty_pooled = pipeline.encode_prompt(
            samples[0].caption, None, None, device="cpu", negative_prompt=None,
            max_sequence_length=154)
    expect_clip = torch.zeros_like(empty[0, :77]) if clip == "zero" else empty[0, :77]
    expect_t5 = torch.zeros_like(empty[0, 77:]) if t5 == "zero" else empty[0, 77:]
    expect_pooled = torch.zeros_like(empty_pooled[0]) if clip == "zero" else empty_pooled[0]
    torch.testing.assert_close(fed[0, :77], expect_clip, atol=1e-5, rtol=0)
    torch.testing.assert_close(fed[0, 77:], expect_t5, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled[0], expect_pooled, atol=1e-5, rtol=0)
    # The kept caption is its own encoding, not the unconditional one.
    caption = family.encode_text([samples[1].caption])[0]
    torch.testing.assert_close(fed[1], caption["prompt_embeds"])
    assert not torch.allclose(fed[1], fed[0])


def test_validation_cfg_uses_the_unconditional_behaviour(tmp_path: Path, models_dir: Path) -> None:
    images, uncond = {}, {}
    for clip in ("empty_string", "zero"):
        family = load_family(tmp_path, models_dir, sd3={"clip_uncond_behaviour": clip})
        seen = record_transformer_inputs(family)
        images[clip] = np.asarray(family.sample("a red circle", "", 64, 64, 4.0, 3, seed=1))
        uncond[clip] = seen[0]["encoder_hidden_states"][0]  # CFG: [uncond, cond]
    assert uncond["zero"][:77].abs().sum() == 0 and uncond["empty_string"][:77].abs().sum() > 0
    assert not np.array_equal(images["zero"], images["empty_string"])
    # A negative prompt replaces the unconditional input, whatever the behaviour.
    seen = record_transformer_inputs(family)
    family.sample("a red circle", "a blue square", 64, 64, 4.0, 1, seed=1)
    negative = family.encode_text(["a blue square"])[0]["prompt_embeds"]
    torch.testing.assert_close(seen[0]["encoder_hidden_states"][0], negative)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, models_dir: Path):
    """A rank-4, alpha-8 LoRA on all attention projections after 20 AdamW steps."""
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
               "to_add_out"]
    family = load_family(tmp_path_factory.mktemp("trained"), models_dir,
                         lora={"rank": 4, "alpha": 8.0, "target_modules": targets})
    family.add_lora()
    batch = make_batch(family)
    losses = fit_fixed_batch(family, family.transformer, batch, 20, lr=1e-2)
    return family, batch, losses


def test_lora_overfits_a_fixed_batch(trained) -> None:
    family, _, losses = trained
    assert losses[-1] < 0.8 * losses[0], losses
    trainable = {n: p for n, p in family.transformer.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32
                             for n, p in trainable.items())
    assert any("add_q_proj" in n for n in trainable) and any("attn2" in n for n in trainable)


def test_exported_lora_loads_into_the_stock_pipeline(trained, tmp_path: Path,
                                                     models_dir: Path) -> None:
    family = trained[0]

    def stock_image(pipe) -> np.ndarray:
        return np.asarray(pipe("a red circle", width=64, height=64, guidance_scale=4.0,
                               num_inference_steps=2, max_sequence_length=154,
                               generator=torch.Generator().manual_seed(7)).images[0])

    assert_exported_lora_acts_in_the_stock_pipeline(
        family, tmp_path / "final", lambda: family.sample("a red circle", "", 64, 64, 4.0, 2, 7),
        stock_pipeline(tiny_folder(models_dir)), stock_image)


def test_checkpoint_state_round_trips(trained, tmp_path: Path, models_dir: Path) -> None:
    family, batch, _ = trained
    assert_trained_state_round_trips(family, batch, torch.tensor([100, 700]),
                                     lambda **extra: load_family(tmp_path, models_dir, **extra))


def slg_validation(**extra) -> dict:
    return {"validation": {"guidance": 4.0, "num_inference_steps": 20, **extra}}


def test_skip_layer_guidance_changes_the_image(tmp_path: Path, models_dir: Path) -> None:
    family = load_family(tmp_path, models_dir, **slg_validation(guidance_skip_layers=[1, 2]))
    slg_cfg = family.cfg
    family.cfg = sd3_config(tmp_path, models_dir, **slg_validation())
    reference = np.asarray(family.sample("a red circle", "", 64, 64, 4.0, 20, seed=3))
    family.cfg = slg_cfg
    calls = record_transformer_inputs(family)
    image = np.asarray(family.sample("a red circle", "", 64, 64, 4.0, 20, seed=3))
    assert np.abs(image.astype(int) - reference).max() > 2
    # Steps 1, 2, 3 of 20 lie in (0.01 * 20, 0.2 * 20): one extra skip-layer pass each.
    skipped = [c for c in calls if c.get("skip_layers") is not None]
    assert len(calls) == 20 + 3 and [c["skip_layers"] for c in skipped] == [[1, 2]] * 3


def test_skip_layer_past_the_depth_is_exit_2_at_load(tmp_path: Path, models_dir: Path) -> None:
    folder = tiny_folder(models_dir)
    # An explicit path: the depth is only known once the transformer is loaded.
    with pytest.raises(ConfigError) as caught:
        load_family(tmp_path, models_dir, model={"pretrained_model_name_or_path": str(folder)},
                    **slg_validation(guidance_skip_layers=[2, 4]))
    assert caught.value.exit_code == 2 and "[4]" in caught.value.message
    assert "4 layers" in caught.value.message


def test_bf16_keeps_lora_fp32_and_fingerprints(tmp_path: Path, models_dir: Path) -> None:
    fp32 = load_family(tmp_path, models_dir)
    bf16 = load_family(tmp_path, models_dir, torch.bfloat16, train={"mixed_precision": "bf16"})
    bf16.add_lora()
    assert bf16.transformer.pos_embed.proj.weight.dtype == torch.bfloat16
    assert bf16.vae.dtype == torch.float32
    bf16.training_loss(make_batch(bf16), torch.Generator().manual_seed(0)).mean().backward()
    lora = [p for p in bf16.transformer.parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 and p.grad is not None for p in lora)
    assert bf16.sample("a red circle", "", 64, 64, 4.0, 2, seed=1).size == (64, 64)
    assert fp32.fingerprint("text") != bf16.fingerprint("text")
    assert fp32.fingerprint("latent") == bf16.fingerprint("latent")
    zero = load_family(tmp_path, models_dir, sd3={"t5_uncond_behaviour": "zero"})
    assert zero.fingerprint("text") != fp32.fingerprint("text")
    json.dumps([fp32.fingerprint("text"), fp32.fingerprint("latent")])


def test_missing_weights_offline_is_a_config_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = sd3_config(tmp_path, tmp_path / "models", model={"flavour": "large"})
    from job.models.sd3 import SD3Family

    with pytest.raises(ConfigError) as caught:
        SD3Family(cfg, torch.device("cpu"), torch.float32).load()
    assert caught.value.exit_code == 2
    assert "stabilityai/stable-diffusion-3.5-large" in caught.value.message
    assert "HF_HUB_OFFLINE" in caught.value.message and "licence" in caught.value.hint


def test_an_unsharded_copy_exports_in_the_transformers_place(tmp_path: Path,
                                                           models_dir: Path) -> None:
    family = load_family(tmp_path, models_dir, model={"model_type": "full"})
    assert_an_unsharded_copy_exports_in_place(
        family, tmp_path / "final",
        lambda folder: SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer"))
