"""Stage C sampling and export: the stock prior pipeline around the live prior, the stock
Stage B decoder pipeline for images, and the LoRA as a peft adapter.

A mixin of StableCascadeFamily (job/models/stable_cascade.py), which owns the components.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"
LOADER_SNIPPET = "load_lora.py"
# Written beside the adapter; a test runs it. Only stock diffusers and peft calls.
_SNIPPET = '''"""Load this Stage C LoRA into the stock prior (diffusers has no Stable Cascade LoRA
loader, so the adapter is a peft one): inject_adapter_in_model + set_peft_model_state_dict."""
from pathlib import Path

from diffusers import StableCascadePriorPipeline, StableCascadeUNet
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file

FOLDER = Path(__file__).resolve().parent


def load_prior_pipeline(base="{base}", subfolder="{subfolder}", folder=FOLDER, **kwargs):
    prior = StableCascadeUNet.from_pretrained(base, subfolder=subfolder, **kwargs)
    inject_adapter_in_model(LoraConfig.from_pretrained(str(folder)), prior)
    set_peft_model_state_dict(prior, load_file(str(Path(folder) / "{weights}")))
    return StableCascadePriorPipeline.from_pretrained(base, prior=prior, **kwargs)
'''


def load_decoder_pipeline(source: str, subfolder: str, hub: dict[str, Any],
                          dtype: torch.dtype, text_encoder=None, tokenizer=None):
    """The stock StableCascadeDecoderPipeline from a folder or hub id in the released layout.

    Built from its components rather than by from_pretrained: the released model_index.json
    names the vqgan's library `wuerstchen`, which diffusers 0.42 moved under
    pipelines/deprecated, so from_pretrained refuses the snapshot even with vqgan passed in.
    The prior's CLIP-G and tokenizer may be passed in: the release's decoder uses the same
    ones, and the prompt embeddings are handed to the pipeline anyway.
    """
    from diffusers import DDPMWuerstchenScheduler, StableCascadeDecoderPipeline, StableCascadeUNet
    from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    index = StableCascadeDecoderPipeline.load_config(source, **hub)
    if tokenizer is None:
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **hub)
    if text_encoder is None:
        text_encoder = CLIPTextModelWithProjection.from_pretrained(
            source, subfolder="text_encoder", dtype=dtype, **hub)
    pipeline = StableCascadeDecoderPipeline(
        decoder=StableCascadeUNet.from_pretrained(source, subfolder=subfolder,
                                                  torch_dtype=dtype, **hub),
        tokenizer=tokenizer, text_encoder=text_encoder,
        scheduler=DDPMWuerstchenScheduler.from_pretrained(source, subfolder="scheduler", **hub),
        vqgan=PaellaVQModel.from_pretrained(source, subfolder="vqgan", torch_dtype=dtype, **hub),
        latent_dim_scale=index.get("latent_dim_scale", 10.67))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def colour_preview(latents: torch.Tensor, width: int, height: int):
    """A PIL preview of prior latents [16, h, w]: the three principal directions of the
    channels as RGB, stretched to [0, 255], upscaled to (width, height)."""
    from PIL import Image

    channels, rows, columns = latents.shape
    flat = latents.float().reshape(channels, -1).T
    flat = flat - flat.mean(dim=0)
    _, _, directions = torch.linalg.svd(flat, full_matrices=False)
    rgb = flat @ directions[:3].T
    low, high = rgb.min(dim=0).values, rgb.max(dim=0).values
    rgb = ((rgb - low) / (high - low).clamp(min=1e-6) * 255).round().to(torch.uint8)
    image = Image.fromarray(rgb.reshape(rows, columns, 3).numpy(), "RGB")
    return image.resize((width, height), Image.NEAREST)


def previewer_module(c_in: int = 16, hidden: int = 512, c_out: int = 3) -> torch.nn.Sequential:
    """The Stable Cascade release's latent previewer (its previewer.safetensors loads into
    this, keys blocks.N.*): a 1x1 lift to `hidden` channels, then three 2x upsamplings that
    halve the width twice, each stage a conv with GELU and BatchNorm, then a 1x1 to RGB;
    a 24x24 latent becomes a 192x192 image in about [0, 1]."""
    from torch import nn

    def act(channels: int) -> list[nn.Module]:
        return [nn.GELU(), nn.BatchNorm2d(channels)]

    widths = [hidden, hidden // 2, hidden // 4, hidden // 4]
    layers: list[nn.Module] = [nn.Conv2d(c_in, hidden, 1), *act(hidden),
                               nn.Conv2d(hidden, hidden, 3, padding=1), *act(hidden)]
    for before, after in zip(widths, widths[1:]):
        layers += [nn.ConvTranspose2d(before, after, 2, stride=2), *act(after),
                   nn.Conv2d(after, after, 3, padding=1), *act(after)]
    layers.append(nn.Conv2d(widths[-1], c_out, 1))
    return nn.Sequential(*layers)


def load_previewer(path: str) -> torch.nn.Sequential:
    """The previewer with the release's weights from `path` (exit 2 when missing or wrong)."""
    from safetensors.torch import load_file

    from job.errors import ConfigError

    try:
        state = load_file(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"stable_cascade.previewer_path = {path!r} cannot be read ({err})",
                          "point it at the release's previewer.safetensors, or leave it unset "
                          "for colour previews") from None
    state = {k.removeprefix("blocks."): v for k, v in state.items()}
    module = previewer_module()
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ConfigError(f"stable_cascade.previewer_path = {path!r} is not the release's "
                          f"previewer ({str(err).splitlines()[0]})",
                          "use previewer.safetensors of the Stable Cascade release") from None
    return module.eval().requires_grad_(False)


def previewer_image(previewer: torch.nn.Module, latents: torch.Tensor, width: int, height: int):
    """A PIL preview of prior latents [16, h, w] through the release's previewer."""
    from PIL import Image

    with torch.no_grad():
        rgb = previewer(latents[None].float().cpu())[0].clamp(0, 1)
    array = (rgb.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(array, "RGB").resize((width, height), Image.BICUBIC)


class StableCascadeSamplingExport:
    """sample() and save_final() of the Stable Cascade family."""

    final_lora_file = "adapter_config.json"  # a peft adapter folder (save_final)

    def _prior_pipeline(self):
        if self._pipeline is None:
            from diffusers import DDPMWuerstchenScheduler, StableCascadePriorPipeline

            self._pipeline = StableCascadePriorPipeline(
                tokenizer=self.tokenizer, text_encoder=self.text_encoder, prior=self.prior,
                scheduler=DDPMWuerstchenScheduler.from_config(self.scheduler.config))
            self._pipeline.set_progress_bar_config(disable=True)
        return self._pipeline

    def decoder_pipeline(self):
        """The Stage B decoder pipeline (loaded at the first validation)."""
        if self._decoder_pipeline is None:
            s = self.settings
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            hub = {k: v for k, v in self._hub_kwargs().items() if k != "revision"}
            self._decoder_pipeline = load_decoder_pipeline(
                self.decoder_source(), s.decoder_subfolder, hub, dtype,
                text_encoder=self.text_encoder, tokenizer=self.tokenizer)
            for name in ("decoder", "vqgan"):
                getattr(self._decoder_pipeline, name).to(self.device)
            self.log.info("decoder_loaded", source=self.decoder_source(),
                          subfolder=s.decoder_subfolder, dtype=str(dtype))
        return self._decoder_pipeline

    def _prompt_inputs(self, prompt: str) -> dict[str, torch.Tensor]:
        if prompt not in self._prompt_cache:
            home = self.text_encoder.device
            self.text_encoder.to(self.device)
            try:
                self._prompt_cache[prompt] = self.encode_text([prompt])[0] if prompt \
                    else self.empty_text()
            finally:
                self.text_encoder.to(home)
        return self._prompt_cache[prompt]

    def _embeds(self, prompt: str, negative_prompt: str, guidance: float,
                dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Pipeline keyword arguments of the prompts (negatives only under CFG: the
        pipelines concatenate any negative given, guided or not)."""
        out = {}
        names = [("", prompt)] + ([("negative_", negative_prompt)] if guidance > 1 else [])
        for prefix, text in names:
            entry = self._prompt_inputs(text)
            for key in ("prompt_embeds", "prompt_embeds_pooled"):
                out[prefix + key] = entry[key][None].to(self.device, dtype)
        return out

    @torch.no_grad()
    def sample(self, prompt: str, negative_prompt: str, width: int, height: int,
               guidance: float, steps: int, seed: int) -> Any:
        """The prior (stock StableCascadePriorPipeline, prior guidance and steps of
        [stable_cascade]), then the stock decoder pipeline (validation.num_inference_steps,
        the decoder guidance); without the decoder, a preview of the prior latents, which
        are saved beside the validation images."""
        from job.models.stable_cascade_rules import prior_guidance

        s = self.settings
        scale = prior_guidance(self.cfg, guidance)
        dtype = self.prior.dtype if self.dtype == torch.float32 else self.dtype
        generator = torch.Generator("cpu").manual_seed(seed)
        with self._autocast():
            latents = self._prior_pipeline()(
                height=height, width=width, num_inference_steps=s.validation_prior_num_inference_steps,
                guidance_scale=scale, generator=generator, output_type="pt",
                **self._embeds(prompt, negative_prompt, scale, dtype)).image_embeddings
        if not s.use_decoder_for_validation:
            return self._preview(latents[0], prompt, width, height, seed)
        decoder = self.decoder_pipeline()
        decoder_dtype = decoder.decoder.dtype
        return decoder(
            image_embeddings=latents.to(decoder_dtype), num_inference_steps=steps,
            guidance_scale=s.validation_decoder_guidance_scale, generator=generator,
            output_type="pil", **self._embeds(prompt, negative_prompt,
                                              s.validation_decoder_guidance_scale,
                                              decoder_dtype)).images[0]

    def _preview(self, latents: torch.Tensor, prompt: str, width: int, height: int, seed: int):
        """Save the prior latents and return their colour preview (no decoder)."""
        from safetensors.torch import save_file

        folder = Path(self.cfg.output_path()) / "validation" / "prior-latents"
        folder.mkdir(parents=True, exist_ok=True)
        key = hashlib.sha256(prompt.encode()).hexdigest()[:12]
        count = len(list(folder.glob(f"{key}-{width}x{height}-*.safetensors")))
        path = folder / f"{key}-{width}x{height}-{count:04d}.safetensors"
        save_file({"image_embeddings": latents[None].float().cpu().contiguous()}, str(path),
                  metadata={"prompt": prompt, "seed": str(seed)})
        previewer_path = self.cfg.stable_cascade.previewer_path
        self.log.warning("validation_without_decoder", latents=str(path),
                         note="stable_cascade.use_decoder_for_validation = false: the images "
                              "are previews of the prior's latents (" + (
                                  "the release's previewer" if previewer_path else
                                  "a colour projection") + "), not decoded images")
        if previewer_path:
            if getattr(self, "_previewer", None) is None:
                self._previewer = load_previewer(previewer_path)
            return previewer_image(self._previewer, latents, width, height)
        return colour_preview(latents, width, height)

    # -- export -----------------------------------------------------------------------

    def save_final(self, out_dir: Path) -> list[Path]:
        """LoRA: a peft adapter (adapter_model.safetensors + adapter_config.json) and a
        loading snippet; full: the prior pipeline folder in diffusers layout."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.lora_config is None:
            return self._save_pipeline(out_dir, self.prior)
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        layers = {k: v.detach().to("cpu", torch.float32).contiguous()
                  for k, v in get_peft_model_state_dict(self.prior).items()}
        save_file(layers, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config = self.lora_config.to_dict()
        config["target_modules"] = sorted(config["target_modules"])
        config["base_model_name_or_path"] = self.source
        (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str),
                                                     encoding="utf-8")
        (out_dir / LOADER_SNIPPET).write_text(_SNIPPET.format(
            base=self.source, subfolder=self.subfolder, weights=ADAPTER_WEIGHTS), encoding="utf-8")
        return [out_dir / ADAPTER_WEIGHTS, out_dir / "adapter_config.json", out_dir / LOADER_SNIPPET]

    def _save_pipeline(self, out_dir: Path, prior,
                       dtype: torch.dtype | None = None) -> list[Path]:
        from diffusers import StableCascadePriorPipeline
        from transformers import CLIPTextModelWithProjection

        text_encoder = CLIPTextModelWithProjection.from_pretrained(
            self.source, subfolder="text_encoder", dtype=dtype or "auto", **self._hub_kwargs())
        pipeline = StableCascadePriorPipeline(tokenizer=self.tokenizer, text_encoder=text_encoder,
                                              prior=prior, scheduler=self.scheduler)
        pipeline.save_pretrained(str(out_dir), safe_serialization=True)
        return [out_dir / "model_index.json", out_dir / "prior"]

    def export_merged(self, adapter_dir: Path, out_dir: Path,
                      dtype: torch.dtype = torch.float32) -> list[Path]:
        """The base prior with the adapter in `adapter_dir` merged in, as a
        StableCascadePriorPipeline folder (loads with from_pretrained)."""
        from diffusers import StableCascadeUNet
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
        from peft.tuners.tuners_utils import BaseTunerLayer
        from safetensors.torch import load_file

        adapter_dir = Path(adapter_dir)
        if not hasattr(self, "tokenizer"):  # `tunejob export` builds the family unloaded
            self.load()  # for the tokenizer and scheduler of the saved pipeline
        base = StableCascadeUNet.from_pretrained(self.source, subfolder=self.subfolder,
                                                 torch_dtype=torch.float32, **self._hub_kwargs())
        config = base.config
        inject_adapter_in_model(LoraConfig.from_pretrained(str(adapter_dir)), base)
        set_peft_model_state_dict(base, load_file(str(adapter_dir / ADAPTER_WEIGHTS)))
        for module in base.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
        merged = StableCascadeUNet.from_config(config)
        state = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items()
                 if "lora_" not in k}
        merged.load_state_dict(state, strict=True)
        return self._save_pipeline(Path(out_dir), merged.to(dtype), dtype)
