"""The Kandinsky 5 family on the tiny t2i and i2i models: conditioning equal to the stock
pipelines' encode functions, LoRA training and its export to the stock pipelines, sampling at
the requested size, and the trained state round trip."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import (assert_an_unsharded_copy_exports_in_place,
                     assert_exported_lora_acts_in_the_stock_pipeline,
                     assert_trained_state_round_trips, fit_fixed_batch, tiny_job_config)
from job.errors import ConfigError
from job.models.kandinsky5 import Kandinsky5Family
from job.models.kandinsky5_tiny import ensure_tiny_kandinsky5

CAPTIONS = ["a red cube", "a small house with a tree and a large sky"]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    for kind in ("t2i", "i2i"):
        tiny_folder(folder, kind)
    return folder


def tiny_folder(models_dir: Path, kind: str) -> Path:
    """Where the tiny flavours build (and find) their weights under hub_cache_dir."""
    return ensure_tiny_kandinsky5(models_dir / "tunejob-tiny" / f"kandinsky5-image-{kind}", kind)


def load_family(tmp_path: Path, models_dir: Path, kind: str = "t2i",
                **overrides) -> Kandinsky5Family:
    model = {"family": "kandinsky5-image", "flavour": "tiny" if kind == "t2i" else "tiny-i2i",
             "hub_cache_dir": str(models_dir), **overrides.pop("model", {})}
    cfg = tiny_job_config(tmp_path, model=model, **overrides)
    family = Kandinsky5Family(cfg, torch.device("cpu"), torch.float32)
    family.load()
    return family


def stock_pipeline(models_dir: Path, kind: str = "t2i"):
    from diffusers import Kandinsky5I2IPipeline, Kandinsky5T2IPipeline

    cls = Kandinsky5I2IPipeline if kind == "i2i" else Kandinsky5T2IPipeline
    pipeline = cls.from_pretrained(str(tiny_folder(models_dir, kind)))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def source_image(seed: int, size: int = 64) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("kind", ["t2i", "i2i"])
def test_encode_text_equals_the_stock_encode_prompt(tmp_path: Path, models_dir: Path,
                                                    kind: str) -> None:
    family = load_family(tmp_path, models_dir, kind)
    pipeline = stock_pipeline(models_dir, kind)
    images = [source_image(i) for i in range(len(CAPTIONS))] if kind == "i2i" else None
    ours = family.encode_text(CAPTIONS, images)
    processor = pipeline.tokenizer
    for i, caption in enumerate(CAPTIONS):
        extra = {"image": images[i]} if images else {}
        with torch.no_grad():
            qwen, clip, cu = pipeline.encode_prompt(prompt=caption, device="cpu",
                                                    dtype=torch.float32, **extra)
        length = int(cu[-1])
        assert int(ours[i]["prompt_length"]) == length == ours[i]["prompt_embeds"].shape[0]
        torch.testing.assert_close(ours[i]["prompt_embeds"], qwen[0, :length], atol=1e-6, rtol=0)
        torch.testing.assert_close(ours[i]["pooled_prompt_embeds"], clip[0], atol=1e-6, rtol=0)
        # The first kept token is the caption's first token: the template cut lands on it.
        ids = processor(text=[pipeline.prompt_template.format(caption)],
                        images=[images[i].resize((32, 32))] if images else None,
                        videos=None, return_tensors="pt")["input_ids"][0]
        prompt = processor.tokenizer(caption)["input_ids"]
        start = pipeline.prompt_template_encode_start_idx
        assert ids[start:start + len(prompt)].tolist() == prompt
    if kind == "i2i":
        # The Qwen prompt carries the image: another image, another text embedding.
        other = family.encode_text(CAPTIONS[:1], [source_image(99)])[0]
        assert not torch.allclose(other["prompt_embeds"], ours[0]["prompt_embeds"])


def test_latents_are_the_posterior_mean_times_the_scaling_factor(tmp_path: Path,
                                                                 models_dir: Path) -> None:
    family = load_family(tmp_path, models_dir)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mean = family.vae.encode(pixels).latent_dist.mean
    scaling = family.vae.config.scaling_factor
    assert family.vae.config.shift_factor != 0  # the Flux VAE has one; the pipelines skip it
    torch.testing.assert_close(family.encode_images(pixels), mean * scaling)


def make_batch(family: Kandinsky5Family, count: int = 2, seed: int = 3) -> dict:
    """A batch as job/data/batches.py builds it: Qwen rows zero-padded to the longest."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(count, 3, 64, 64, generator=g) * 2 - 1
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(count)]
    images = [source_image(seed + i) for i in range(count)] if family.i2i else None
    texts = family.encode_text(captions, images)
    longest = max(t["prompt_embeds"].shape[0] for t in texts)
    batch = {"latents": family.encode_images(pixels),
             "text.prompt_embeds": torch.stack([torch.nn.functional.pad(
                 t["prompt_embeds"], (0, 0, 0, longest - t["prompt_embeds"].shape[0]))
                 for t in texts]),
             "text.prompt_length": torch.stack([t["prompt_length"] for t in texts]),
             "text.pooled_prompt_embeds": torch.stack([t["pooled_prompt_embeds"] for t in texts])}
    if family.i2i:
        batch["cond.image_latents"] = family.encode_images(torch.stack([
            torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
            for im in images]))
    return batch


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, models_dir: Path):
    """A LoRA (rank 4, alpha 8) trained 20 steps on one fixed batch."""
    tmp_path = tmp_path_factory.mktemp("trained")
    family = load_family(tmp_path, models_dir, lora={"rank": 4, "alpha": 8.0})
    family.add_lora()
    batch = make_batch(family)
    losses = fit_fixed_batch(family, family.transformer, batch, 20, lr=1e-2)
    return family, batch, losses


def test_lora_overfits_a_fixed_batch(trained) -> None:
    family, _, losses = trained
    assert losses[-1] < 0.8 * losses[0], losses
    trainable = {n for n, p in family.transformer.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # The default targets: the attention projections of the text and the visual blocks.
    assert any(n.startswith("text_transformer_blocks") for n in trainable)
    assert any("cross_attention.to_key" in n for n in trainable)
    assert not any("feed_forward" in n or "modulation" in n for n in trainable)


def test_exported_lora_loads_into_the_stock_pipeline(trained, tmp_path: Path,
                                                     models_dir: Path) -> None:
    family = trained[0]
    pipeline = stock_pipeline(models_dir)
    pipeline.resolutions = [(64, 64)]  # the stock list starts at 1024 px

    def stock_image(pipe) -> np.ndarray:
        return np.asarray(pipe("a red cube", height=64, width=64, guidance_scale=5.0,
                               num_inference_steps=3,
                               generator=torch.Generator().manual_seed(7)).image[0])

    assert_exported_lora_acts_in_the_stock_pipeline(
        family, tmp_path / "final", lambda: family.sample("a red cube", "", 64, 64, 5.0, 3, 7),
        pipeline, stock_image)


def test_samples_come_out_at_the_requested_size(trained) -> None:
    family = trained[0]
    # 96x64 is in no resolution list; the stock pipeline would snap it to an aspect of its
    # own (1408x640 for this one) with only a warning.
    for width, height in ((64, 64), (96, 64)):
        image = family.sample("a red cube", "", width, height, 5.0, 2, seed=1)
        assert image.size == (width, height)


def test_checkpoint_state_round_trips(trained, tmp_path: Path, models_dir: Path) -> None:
    family, batch, _ = trained
    assert_trained_state_round_trips(family, batch, torch.tensor([100, 700]),
                                     lambda **extra: load_family(tmp_path, models_dir, **extra))


def test_lora_targets_that_match_nothing_are_exit_2(tmp_path: Path, models_dir: Path) -> None:
    family = load_family(tmp_path, models_dir, lora={"target_modules": ["to_q", "to_k"]})
    with pytest.raises(ConfigError) as caught:
        family.add_lora()
    assert caught.value.exit_code == 2 and "to_query" in caught.value.hint


def test_i2i_feeds_the_conditioning_latents_and_a_mask(tmp_path: Path, models_dir: Path) -> None:
    """The transformer input is cat(noisy, conditioning latents, ones) along the channels, as
    the I2I pipeline builds it; other conditioning latents change the prediction."""
    family = load_family(tmp_path, models_dir, "i2i")
    batch = make_batch(family)
    seen = []
    family.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["hidden_states"]), with_kwargs=True)
    timesteps, noise = torch.tensor([300, 600]), torch.randn(batch["latents"].shape)
    with torch.no_grad():
        loss = family.eval_loss(batch, timesteps, noise)
        # One call per caption length: row 0's caption is the shorter one, so it runs first.
        assert [x.shape[0] for x in seen] == [1, 1]
        x = torch.cat(seen)
        assert x.shape == (2, 1, 8, 8, 16 + 16 + 1)
        torch.testing.assert_close(x[..., 16:32], batch["cond.image_latents"].permute(0, 2, 3, 1)[:, None])
        assert torch.equal(x[..., 32], torch.ones_like(x[..., 32]))
        other = dict(batch, **{"cond.image_latents": torch.zeros_like(batch["cond.image_latents"])})
        assert not torch.allclose(family.eval_loss(other, timesteps, noise), loss)


def test_i2i_lora_loads_into_the_stock_i2i_pipeline(tmp_path: Path, models_dir: Path) -> None:
    family = load_family(tmp_path, models_dir, "i2i", lora={"rank": 4, "alpha": 4.0},
                         validation={"conditioning_images": ["unused.png"]})
    family.add_lora()
    with torch.no_grad():  # stands in for training: non-zero LoRA up-projections
        for name, param in family.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    family.save_final(tmp_path / "final")
    pipeline = stock_pipeline(models_dir, "i2i")
    pipeline.resolutions = [(64, 64)]
    source = source_image(5)

    def stock_image() -> np.ndarray:
        return np.asarray(pipeline(image=source, prompt="a red cube", height=64, width=64,
                                   num_inference_steps=2,
                                   generator=torch.Generator().manual_seed(0)).image[0])

    plain = stock_image()
    pipeline.load_lora_weights(str(tmp_path / "final"))
    assert np.abs(stock_image().astype(int) - plain).max() > 2


def test_full_fine_tune_exports_a_stock_pipeline_folder(tmp_path: Path, models_dir: Path) -> None:
    from job.models.kandinsky5_output import PIPELINE_PARTS

    family = load_family(tmp_path, models_dir, model={"model_type": "full"})
    params = list(family.transformer.parameters())
    assert all(p.requires_grad and p.dtype == torch.float32 for p in params)
    with torch.no_grad():
        family.transformer.out_layer.out_layer.bias.add_(0.5)  # stands in for training
    family.save_final(tmp_path / "final")
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == sorted(
        ("model_index.json", *PIPELINE_PARTS))
    from diffusers import Kandinsky5T2IPipeline

    loaded = Kandinsky5T2IPipeline.from_pretrained(str(tmp_path / "final"))
    torch.testing.assert_close(loaded.transformer.out_layer.out_layer.bias,
                               family.transformer.out_layer.out_layer.bias)


def test_an_unsharded_copy_exports_in_the_transformers_place(tmp_path: Path,
                                                           models_dir: Path) -> None:
    from diffusers import Kandinsky5Transformer3DModel

    family = load_family(tmp_path, models_dir, model={"model_type": "full"})
    assert_an_unsharded_copy_exports_in_place(
        family, tmp_path / "final",
        lambda folder: Kandinsky5Transformer3DModel.from_pretrained(folder, subfolder="transformer"))


@pytest.mark.parametrize("preset", ["int8-quanto", "int8-torchao"])
def test_lora_trains_on_an_int8_base(tmp_path: Path, models_dir: Path, preset: str) -> None:
    """peft wraps quanto's QLinear (an nn.Linear) and torchao's int8 tensors alike; the LoRA
    trains on either and exports the same keys as on the unquantised base."""
    from job.speedups.quantize import apply_quantization

    family = load_family(tmp_path, models_dir, speedups={"base_model_precision": preset})
    assert apply_quantization(family, family.cfg.speedups) == ["base_model_precision"]
    layer = family.transformer.visual_transformer_blocks[0].self_attention.to_query
    kind = type(layer).__module__ + type(layer.weight).__name__
    assert ("quanto" in kind) if preset.endswith("quanto") else ("Affine" in kind or "Int8" in kind)
    family.add_lora()
    losses = fit_fixed_batch(family, family.transformer, make_batch(family), 6, lr=1e-2)
    assert losses[-1] < 0.9 * losses[0], losses
    plain = load_family(tmp_path, models_dir)
    plain.add_lora()
    assert family.trainable_state_dict().keys() == plain.trainable_state_dict().keys()


def test_model_cpu_offload_keeps_the_vae_in_cpu_memory_except_to_decode(
        tmp_path: Path, models_dir: Path) -> None:
    """On the CPU both places are the same device, so the VAE's moves are recorded."""
    for offload, after_caching in ((False, "meta"), (True, "cpu")):
        family = load_family(tmp_path, models_dir,
                             speedups={"enable_model_cpu_offload": offload})
        family.device = torch.device("meta")  # stands in for the GPU: recorded, never used
        moves = []
        family.vae.to = lambda device, *a, **k: moves.append(str(device))
        family.transformer.to = lambda *a, **k: None
        family.unload_encoders()
        assert moves == [after_caching]
    family.device = torch.device("cpu")
    family._decode(torch.randn(1, 1, 8, 8, 16), 64, 64)
    assert moves[1:] == ["cpu", "cpu"]  # to the device, then back home (both the CPU here)


def test_offload_during_startup_never_has_the_encoders_and_the_vae_on_the_gpu_together(
        tmp_path: Path, models_dir: Path) -> None:
    """Where each component is, tracked through its .to() calls ("meta" stands in for the
    GPU and is only recorded): the text encoders and the VAE take turns."""
    family = load_family(tmp_path, models_dir, "i2i",
                         speedups={"offload_during_startup": True},
                         validation={"conditioning_images": ["unused.png"]})
    family.device = torch.device("meta")
    where = {"text_encoder": "cpu", "text_encoder_2": "cpu", "vae": "cpu"}
    both = []

    def tracking(name):
        def to(device, *args, **kwargs):
            where[name] = str(device)
            encoders = where["text_encoder"] == "meta" or where["text_encoder_2"] == "meta"
            both.append(encoders and where["vae"] == "meta")
        return to

    for name in where:
        getattr(family, name).to = tracking(name)
    family.encode_text(CAPTIONS[:1], [source_image(0)])
    assert where == {"text_encoder": "meta", "text_encoder_2": "meta", "vae": "cpu"}
    family.encode_images(torch.zeros(1, 3, 64, 64))
    assert where == {"text_encoder": "cpu", "text_encoder_2": "cpu", "vae": "meta"}
    family.encode_text(CAPTIONS[:1], [source_image(0)])
    assert both and not any(both)


def test_i2i_sampling_has_the_vae_on_the_device_for_the_pipeline_call(
        tmp_path: Path, models_dir: Path) -> None:
    """With enable_model_cpu_offload the VAE waits in CPU memory, and the I2I pipeline
    encodes the conditioning image with it inside its call: it comes to the device for the
    call ("meta" stands in for the GPU; moves are recorded, the pipeline is a stand-in)."""
    source = tmp_path / "source.png"
    source_image(1).save(source)
    family = load_family(tmp_path, models_dir, "i2i",
                         speedups={"enable_model_cpu_offload": True},
                         validation={"conditioning_images": [str(source)],
                                     "prompt": "a red cube"})
    family.device = torch.device("meta")
    where = {"vae": "cpu"}
    family.vae.to = lambda device, *a, **k: where.update(vae=str(device))
    for encoder in family.text_encoders():
        encoder.to = lambda *a, **k: None
    seen = []

    class Pipeline:
        resolutions: list = []

        def __call__(self, **kwargs):
            seen.append(where["vae"])
            return type("Out", (), {"image": torch.zeros(1, 1, 8, 8, 33)})()

    family._pipeline = Pipeline()
    family._decode = lambda latents, height, width: seen.append("decoded")
    family._autocast = contextlib.nullcontext
    family.sample("a red cube", "", 64, 64, 5.0, 2, seed=0)
    assert seen == ["meta", "decoded"] and where["vae"] == "cpu"
