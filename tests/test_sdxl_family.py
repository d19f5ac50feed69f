"""The SDXL family on the tiny model: stock-pipeline parity, conditioning, loss math, export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from safetensors import safe_open

from job.errors import ConfigError
from job.models.sdxl import SDXLFamily
from job.models.sdxl_output import PIPELINE_PARTS
from job.models.sdxl_tiny import build_tiny_sdxl, ensure_tiny_sdxl
from helpers import assert_trained_state_round_trips, fit_fixed_batch, tiny_job_config

CAPTIONS = ["a photo of the red circle", "a yellow square on a black background, " * 12]


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hub_cache_dir holding the tiny SDXL, built once for the session."""
    folder = tmp_path_factory.mktemp("models")
    ensure_tiny_sdxl(folder / "tunejob-tiny" / "sdxl")
    return folder


@pytest.fixture(scope="session")
def tiny_dir(models_dir: Path) -> Path:
    return models_dir / "tunejob-tiny" / "sdxl"


def load_family(tmp_path: Path, models_dir: Path, dtype: torch.dtype = torch.float32,
                **overrides) -> SDXLFamily:
    model = {"hub_cache_dir": str(models_dir), **overrides.pop("model", {})}
    cfg = tiny_job_config(tmp_path, model=model, **overrides)
    family = SDXLFamily(cfg, torch.device("cpu"), dtype)
    family.load()
    return family


def stock_pipeline(folder: Path) -> StableDiffusionXLPipeline:
    pipeline = StableDiffusionXLPipeline.from_pretrained(str(folder))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def make_batch(family: SDXLFamily, sizes: list[tuple]) -> dict[str, torch.Tensor]:
    """A batch as job/data/batches.py builds it, one sample per (orig, crop, target) triple."""
    pixels = torch.rand(len(sizes), 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    texts = family.encode_text([CAPTIONS[i % len(CAPTIONS)] for i in range(len(sizes))])
    conds = [family.image_conditioning(SimpleNamespace(original_size=o, crop_top_left=c,
                                                       target_size=t)) for o, c, t in sizes]
    return {"latents": family.encode_images(pixels),
            "text.prompt_embeds": torch.stack([t["prompt_embeds"] for t in texts]),
            "text.pooled_prompt_embeds": torch.stack([t["pooled_prompt_embeds"] for t in texts]),
            "cond.time_ids": torch.stack([c["time_ids"] for c in conds])}


SIZES = [((96, 128), (0, 16), (64, 64)), ((128, 96), (8, 0), (64, 64))]


def test_tiny_model_loads_like_real_weights(tmp_path: Path, models_dir: Path,
                                            tiny_dir: Path) -> None:
    family = load_family(tmp_path, models_dir)
    assert family.source == str(tiny_dir)
    assert sorted(p.name for p in tiny_dir.iterdir()) == sorted(("model_index.json",
                                                                 *PIPELINE_PARTS))
    size = sum(f.stat().st_size for f in tiny_dir.rglob("*") if f.is_file())
    assert size < 7 * 2**20, size
    pipeline = stock_pipeline(tiny_dir)
    assert pipeline.config.force_zeros_for_empty_prompt is True
    assert pipeline.scheduler.config.timestep_spacing == "leading"
    unet = UNet2DConditionModel.from_pretrained(str(tiny_dir), subfolder="unet")
    assert unet.config.cross_attention_dim == 64 and unet.config.addition_embed_type == "text_time"
    # The local BPE merges are real: known words are one token each, unknown ones bytes.
    ids = pipeline.tokenizer("a photo of zq").input_ids
    assert len(ids) == 2 + 3 + 2 and ids[0] == pipeline.tokenizer.bos_token_id
    assert pipeline.tokenizer_2.pad_token == "!"
    # Deterministic per seed; another seed gives other weights.
    weights = "unet/diffusion_pytorch_model.safetensors"
    again, other = build_tiny_sdxl(tmp_path / "again"), build_tiny_sdxl(tmp_path / "other", 1)
    assert (again / weights).read_bytes() == (tiny_dir / weights).read_bytes()
    assert (other / weights).read_bytes() != (tiny_dir / weights).read_bytes()


def test_encode_text_equals_pipeline_encode_prompt(tmp_path: Path, models_dir: Path,
                                                   tiny_dir: Path) -> None:
    family = load_family(tmp_path, models_dir)
    ours = family.encode_text(CAPTIONS)
    embeds, _, pooled, _ = stock_pipeline(tiny_dir).encode_prompt(
        CAPTIONS, device="cpu", do_classifier_free_guidance=False)
    assert ours[0]["prompt_embeds"].shape == (77, 64)
    for i, entry in enumerate(ours):
        torch.testing.assert_close(entry["prompt_embeds"], embeds[i], atol=1e-6, rtol=0)
        torch.testing.assert_close(entry["pooled_prompt_embeds"], pooled[i], atol=1e-6, rtol=0)
    assert not torch.allclose(ours[0]["prompt_embeds"], ours[1]["prompt_embeds"])


@pytest.mark.parametrize("force_zeros", [True, False])
def test_empty_text_is_the_pipelines_unconditional_input(tmp_path: Path, models_dir: Path,
                                                         tiny_dir: Path, force_zeros: bool) -> None:
    folder = tiny_dir
    if not force_zeros:
        folder = Path(shutil.copytree(tiny_dir, tmp_path / "no-zeros"))
        index = json.loads((folder / "model_index.json").read_text())
        index["force_zeros_for_empty_prompt"] = False
        (folder / "model_index.json").write_text(json.dumps(index))
    family = load_family(tmp_path, models_dir, model={"pretrained_model_name_or_path": str(folder)})
    empty = family.empty_text()
    _, negative, _, negative_pooled = stock_pipeline(folder).encode_prompt(
        "", device="cpu", do_classifier_free_guidance=True, negative_prompt=None)
    torch.testing.assert_close(empty["prompt_embeds"], negative[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(empty["pooled_prompt_embeds"], negative_pooled[0], atol=1e-6,
                               rtol=0)
    assert bool(empty["prompt_embeds"].abs().sum() == 0) is force_zeros


def test_unet_gets_each_samples_crop_time_ids(tmp_path: Path, models_dir: Path,
                                              tiny_dir: Path) -> None:
    family = load_family(tmp_path, models_dir)
    batch = make_batch(family, SIZES)
    # Same order as the stock pipeline's own micro-conditioning.
    reference = stock_pipeline(tiny_dir)._get_add_time_ids(
        (96, 128), (0, 16), (64, 64), torch.float32, text_encoder_projection_dim=32)
    torch.testing.assert_close(batch["cond.time_ids"][0], reference[0])
    seen = []
    family.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["added_cond_kwargs"]), with_kwargs=True)
    family.training_loss(batch, torch.Generator().manual_seed(0))
    assert torch.equal(seen[0]["time_ids"], torch.tensor([[96, 128, 0, 16, 64, 64],
                                                          [128, 96, 8, 0, 64, 64]]).float())
    assert torch.equal(seen[0]["text_embeds"], batch["text.pooled_prompt_embeds"])


def zero_prediction(family: SDXLFamily, timesteps: list[torch.Tensor]) -> None:
    """The UNet predicts zeros (so the loss is the target's mean square); records t."""
    def pre(module, args, kwargs):
        timesteps.append(args[1])

    def post(module, args, kwargs, output):
        return UNet2DConditionOutput(sample=torch.zeros_like(output.sample))

    family.unet.register_forward_pre_hook(pre, with_kwargs=True)
    family.unet.register_forward_hook(post, with_kwargs=True)


def test_epsilon_and_v_targets_follow_the_scheduler(tmp_path: Path, models_dir: Path) -> None:
    losses = {}
    for kind in ("epsilon", "v_prediction"):
        family = load_family(tmp_path, models_dir, model={"prediction_type": kind})
        zero_prediction(family, [])
        batch = make_batch(family, SIZES)
        timesteps = torch.tensor([50, 900])
        noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(1))
        losses[kind] = family.eval_loss(batch, timesteps, noise)
    alpha_bar = family.noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    velocity = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * batch["latents"]
    torch.testing.assert_close(losses["epsilon"], noise.pow(2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(losses["v_prediction"], velocity.pow(2).mean(dim=(1, 2, 3)))
    assert not torch.allclose(losses["epsilon"], losses["v_prediction"], rtol=1e-2)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_the_formula(tmp_path: Path, models_dir: Path, kind: str) -> None:
    losses, seen = {}, []
    for gamma in (None, 1.0):
        family = load_family(tmp_path, models_dir, model={"prediction_type": kind},
                             train={"snr_gamma": gamma})
        family.unet.register_forward_pre_hook(lambda m, a, k: seen.append(a[1]), with_kwargs=True)
        batch = make_batch(family, SIZES * 4)
        losses[gamma] = family.training_loss(batch, torch.Generator().manual_seed(5))
    assert torch.equal(seen[0], seen[1])  # same generator seed: same timesteps and noise
    alpha_bar = family.noise_scheduler.alphas_cumprod[seen[0]]
    snr = alpha_bar / (1 - alpha_bar)
    expected = snr.clamp(max=1.0) / (snr if kind == "epsilon" else snr + 1)
    torch.testing.assert_close(losses[1.0] / losses[None], expected.float())
    assert (expected < 0.999).any()  # some timesteps really are down-weighted


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, models_dir: Path):
    """A rank-4, alpha-8 LoRA after 30 AdamW steps (lr 1e-3) on one fixed batch and noise."""
    family = load_family(tmp_path_factory.mktemp("trained"), models_dir,
                         lora={"rank": 4, "alpha": 8.0})
    family.add_lora()
    batch = make_batch(family, SIZES)
    losses = fit_fixed_batch(family, family.unet, batch, 30, lr=1e-3)
    return family, batch, losses


def test_lora_overfits_a_fixed_batch(trained) -> None:
    family, _, losses = trained
    assert losses[-1] < 0.9 * losses[0], losses
    trainable = {n: p for n, p in family.unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32
                             for n, p in trainable.items())


def test_exported_lora_keeps_alpha_in_the_stock_pipeline(trained, tmp_path: Path,
                                                         tiny_dir: Path) -> None:
    family = trained[0]
    [path] = family.save_final(tmp_path / "final")
    with safe_open(str(path), "pt") as handle:
        assert json.loads(handle.metadata()["lora_adapter_metadata"])["unet.lora_alpha"] == 8
    family.unload_encoders()
    ours = np.asarray(family.sample("a red circle", "", 64, 64, 5.0, 3, seed=7))

    def stock_image(pipeline: StableDiffusionXLPipeline) -> np.ndarray:
        return np.asarray(pipeline("a red circle", width=64, height=64, guidance_scale=5.0,
                                   num_inference_steps=3,
                                   generator=torch.Generator().manual_seed(7)).images[0])

    pipeline = stock_pipeline(tiny_dir)
    plain = stock_image(pipeline)
    pipeline.load_lora_weights(str(tmp_path / "final"))
    assert np.abs(stock_image(pipeline).astype(int) - plain).max() > 2  # the LoRA acts
    np.testing.assert_array_equal(stock_image(pipeline), ours)
    # What a lost alpha would give (scale 1 instead of 8/4): visibly another image.
    pipeline.set_adapters(pipeline.get_active_adapters(), adapter_weights=[0.5])
    assert not np.array_equal(stock_image(pipeline), ours)


def test_merged_export_equals_the_stock_pipeline_with_the_lora(trained, tmp_path: Path,
                                                               tiny_dir: Path) -> None:
    """`tunejob export --merge`: the LoRA fused at its trained scale (alpha/rank = 2), no
    LoRA layers left, the same images as the stock pipeline with load_lora_weights."""
    family = trained[0]
    family.save_final(tmp_path / "final")
    family.export_merged(tmp_path / "final", tmp_path / "merged")

    def image(pipeline: StableDiffusionXLPipeline) -> np.ndarray:
        out = pipeline("a red circle", width=64, height=64, guidance_scale=5.0,
                       num_inference_steps=3, generator=torch.Generator().manual_seed(7))
        return np.asarray(out.images[0]).astype(int)

    merged = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "merged"))
    merged.set_progress_bar_config(disable=True)
    assert not any("lora" in k for k in merged.unet.state_dict())
    stock = stock_pipeline(tiny_dir)
    plain = image(stock)
    stock.load_lora_weights(str(tmp_path / "final"))
    with_lora = image(stock)
    assert np.abs(with_lora - plain).max() > 2  # the LoRA acts
    assert np.abs(image(merged) - with_lora).max() <= 1  # fused == applied, up to rounding
    stock.set_adapters(stock.get_active_adapters(), adapter_weights=[0.5])  # alpha lost
    assert np.abs(image(merged) - image(stock)).max() > 2
    # A model.prediction_type override reaches the merged pipeline's scheduler.
    assert merged.scheduler.config.prediction_type == "epsilon"
    v_cfg = family.cfg.model_copy(update={"model": family.cfg.model.model_copy(
        update={"prediction_type": "v_prediction"})})
    SDXLFamily(v_cfg, torch.device("cpu"), torch.float32).export_merged(
        tmp_path / "final", tmp_path / "merged-v")
    config = json.loads((tmp_path / "merged-v" / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction"


def test_checkpoint_state_round_trips(trained, tmp_path: Path, models_dir: Path) -> None:
    family, batch, _ = trained
    assert_trained_state_round_trips(family, batch, torch.tensor([10, 700]),
                                     lambda **extra: load_family(tmp_path, models_dir, **extra))


def test_bf16_keeps_lora_fp32_and_fingerprints_the_dtype(tmp_path: Path,
                                                          models_dir: Path) -> None:
    fp32 = load_family(tmp_path, models_dir)
    bf16 = load_family(tmp_path, models_dir, torch.bfloat16, train={"mixed_precision": "bf16"})
    bf16.add_lora()
    assert bf16.unet.conv_in.weight.dtype == torch.bfloat16 and bf16.vae.dtype == torch.float32
    batch = make_batch(bf16, SIZES)
    bf16.training_loss(batch, torch.Generator().manual_seed(0)).mean().backward()
    lora = [p for p in bf16.unet.parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 and p.grad is not None for p in lora)
    assert bf16.sample("a red circle", "", 64, 64, 5.0, 2, seed=1).size == (64, 64)
    assert fp32.fingerprint("text") != bf16.fingerprint("text")
    assert fp32.fingerprint("latent") == bf16.fingerprint("latent")
    json.dumps([fp32.fingerprint("text"), fp32.fingerprint("latent")])


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_full_fine_tune_exports_a_stock_pipeline_folder(tmp_path: Path, models_dir: Path,
                                                        tiny_dir: Path, precision: str) -> None:
    dtype = {"no": torch.float32, "bf16": torch.bfloat16}[precision]
    family = load_family(tmp_path, models_dir, dtype, model={"model_type": "full"},
                         train={"mixed_precision": precision})
    params = list(family.unet.parameters())
    assert all(p.requires_grad and p.dtype == torch.float32 for p in params)
    with torch.no_grad():
        family.unet.conv_out.bias.add_(0.5)  # stands in for training
    family.save_final(tmp_path / "final")
    loaded, original = stock_pipeline(tmp_path / "final"), stock_pipeline(tiny_dir)
    torch.testing.assert_close(loaded.unet.conv_out.bias, family.unet.conv_out.bias)
    # The frozen text encoders are exported as stored, not as the bf16 copies trained with.
    for name in ("text_encoder", "text_encoder_2"):
        for ours, theirs in zip(getattr(loaded, name).parameters(),
                                getattr(original, name).parameters()):
            assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


@pytest.mark.parametrize("source, says, fix", [
    ("tunejob-test/no-such-model", "HF_HUB_OFFLINE", "hub_cache_dir"),
    # A local path: no download advice, the folder is missing.
    ("/nonexistent/sdxl-folder", "does not exist", "diffusers layout")])
def test_missing_weights_offline_is_a_config_error(tmp_path: Path, monkeypatch, source: str,
                                                   says: str, fix: str) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = tiny_job_config(tmp_path, model={"pretrained_model_name_or_path": source})
    with pytest.raises(ConfigError) as caught:
        SDXLFamily(cfg, torch.device("cpu"), torch.float32).load()
    assert caught.value.exit_code == 2
    assert source in caught.value.message and says in caught.value.message
    assert fix in caught.value.hint
    assert ("hf download" in caught.value.hint) == (not source.startswith("/"))
