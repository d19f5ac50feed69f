"""SDXL sampling and export: the stock StableDiffusionXLPipeline around the live UNet.

A mixin of SDXLFamily (job/models/sdxl.py), which owns the components it uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from job.atomic import replace_atomically

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                  "scheduler")


class SDXLSamplingExport:
    """sample() and save_final() of the SDXL family."""

    @property
    def merge_pipeline_class(self):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def _finish_merged(self, pipeline: Any) -> None:
        """The merged pipeline's scheduler predicts what was trained (model.prediction_type,
        as the full fine-tune's export does); an LCM student gets the LCMScheduler it was
        distilled for."""
        wanted = self.cfg.model.prediction_type
        if wanted != "auto":
            pipeline.scheduler = type(pipeline.scheduler).from_config(
                pipeline.scheduler.config, prediction_type=wanted)
        if self.cfg.distillation.method == "lcm":
            from diffusers import LCMScheduler

            from job.distill.lcm import lcm_scheduler_config

            pipeline.scheduler = LCMScheduler.from_config(pipeline.scheduler.config,
                                                          **lcm_scheduler_config(self.cfg))


    def _sampling_pipeline(self):
        """The stock pipeline around the live UNet (built once; it holds references)."""
        if self._pipeline is None:
            from diffusers import StableDiffusionXLPipeline

            self._pipeline = StableDiffusionXLPipeline(
                vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, unet=self.unet,
                scheduler=self.sample_scheduler,
                force_zeros_for_empty_prompt=self._empty_prompt_mode() == "zeros")
            self._pipeline.set_progress_bar_config(disable=True)
        return self._pipeline

    def sample(self, prompt: str, negative_prompt: str, width: int, height: int,
               guidance: float, steps: int, seed: int) -> Any:
        """One PIL image from the stock StableDiffusionXLPipeline around the live UNet."""
        pipeline = self._sampling_pipeline()
        scheduler = self._sampling_scheduler()
        if pipeline.scheduler is not scheduler:
            pipeline.scheduler = scheduler
        generator = torch.Generator("cpu").manual_seed(seed)
        # An empty negative prompt means none, as in the stock pipeline, which then feeds
        # zeros (force_zeros_for_empty_prompt) rather than the encoded "".
        with self._encoders_on_device(), self._autocast():
            latents = pipeline(prompt=prompt, negative_prompt=negative_prompt or None,
                               width=width, height=height, guidance_scale=guidance,
                               num_inference_steps=steps, generator=generator,
                               output_type="latent").images
        return self._decode(latents)

    def _sampling_scheduler(self):
        """LCMScheduler for an LCM student (set up as it was distilled); the model's own
        scheduler otherwise, and for the teacher."""
        if self.cfg.distillation.method != "lcm" or self._as_teacher:
            return self.sample_scheduler
        if self._lcm_scheduler is None:
            from diffusers import LCMScheduler

            from job.distill.lcm import lcm_scheduler_config

            self._lcm_scheduler = LCMScheduler.from_config(self.sample_scheduler.config,
                                                           **lcm_scheduler_config(self.cfg))
        return self._lcm_scheduler

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor) -> Any:
        """The stock pipeline's decode, in fp32 outside autocast: SDXL's VAE overflows in
        fp16, which is why the stock pipeline upcasts it too."""
        config, pipeline = self.vae.config, self._sampling_pipeline()
        latents = latents.to(self.vae.device, torch.float32)
        if getattr(config, "latents_mean", None) is not None and \
                getattr(config, "latents_std", None) is not None:
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        if pipeline.watermark is not None:
            image = pipeline.watermark.apply_watermark(image)
        return pipeline.image_processor.postprocess(image, output_type="pil")[0]

    def save_final(self, out_dir: Path) -> list[Path]:
        """LoRA: a diffusers LoRA file with its alpha; full: a complete pipeline folder."""
        from diffusers import StableDiffusionXLPipeline

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.lora_config is None:
            self._export_pipeline().save_pretrained(str(out_dir), safe_serialization=True)
            return [out_dir / "model_index.json", *(out_dir / part for part in PIPELINE_PARTS)]
        from peft import get_peft_model_state_dict

        # Without the adapter metadata diffusers rebuilds the config from tensor shapes,
        # which sets alpha = rank and silently rescales a LoRA trained with another alpha.
        StableDiffusionXLPipeline.save_lora_weights(
            str(out_dir), unet_lora_layers=get_peft_model_state_dict(self.unet),
            unet_lora_adapter_metadata=self.lora_config.to_dict(), safe_serialization=True)
        path = out_dir / "pytorch_lora_weights.safetensors"
        if self.cfg.distillation.method == "lcm":
            from job.distill.lcm import export_metadata

            add_file_metadata(path, export_metadata(self.cfg))
        return [path]

    def _export_pipeline(self):
        """The trained UNet with the frozen parts; text encoders re-read at their stored
        precision, since the copies in memory may be cast down to bf16/fp16."""
        from diffusers import StableDiffusionXLPipeline
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        hub, parts = self._hub_kwargs(), dict(self._sampling_pipeline().components)
        # An LCM student ships with the LCMScheduler it was distilled for.
        parts["scheduler"] = self._sampling_scheduler()
        if self.dtype != torch.float32:
            for name, cls in (("text_encoder", CLIPTextModel),
                              ("text_encoder_2", CLIPTextModelWithProjection)):
                parts[name] = cls.from_pretrained(self.source, subfolder=name, dtype="auto", **hub)
        return StableDiffusionXLPipeline(
            **parts, force_zeros_for_empty_prompt=self._empty_prompt_mode() == "zeros")


def add_file_metadata(path: Path, extra: dict[str, str]) -> None:
    """Add keys to a safetensors file's header metadata (rewritten, then renamed over)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as handle:
        metadata = dict(handle.metadata() or {})
    tensors = load_file(str(path))
    replace_atomically(path, lambda tmp: save_file(tensors, str(tmp),
                                                   metadata={**metadata, **extra}))
