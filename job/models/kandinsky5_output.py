"""Kandinsky 5 sampling and export: the stock Kandinsky5T2IPipeline / Kandinsky5I2IPipeline
around the live transformer.

A mixin of Kandinsky5Family (job/models/kandinsky5.py), which owns the components.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from job.errors import ConfigError
from job.models.kandinsky5_rules import DEFAULT_GUIDANCE

PIPELINE_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                  "tokenizer_2", "scheduler")


class Kandinsky5SamplingExport:
    """sample() and save_final() of the Kandinsky 5 family."""

    def _sampling_pipeline(self):
        """The stock pipeline around the live transformer (built once; it holds references)."""
        if self._pipeline is None:
            from diffusers import FlowMatchEulerDiscreteScheduler

            # Its own scheduler object: sampling moves the scheduler's step state.
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
            self._pipeline = self.pipeline_class(
                transformer=self.transformer, vae=self.vae, text_encoder=self.text_encoder,
                tokenizer=self.tokenizer, text_encoder_2=self.text_encoder_2,
                tokenizer_2=self.tokenizer_2, scheduler=scheduler)
            self._pipeline.set_progress_bar_config(disable=True)
        return self._pipeline

    def sample(self, prompt: str, negative_prompt: str, width: int, height: int,
               guidance: float, steps: int, seed: int) -> Any:
        """One PIL image at exactly width x height from the stock pipeline around the live
        transformer (i2i: from the prompt's validation.conditioning_images entry).

        The stock pipelines snap any size outside their resolution list to the nearest
        listed aspect with only a warning; the requested size is added to this pipeline
        object's list, so the image comes out at the size the job asks for (sizes the model
        was not trained at are reported once, at load, by check_validation_sizes).
        Without validation.guidance in the job file, the model's recommended 5.0 is used.
        """
        if "guidance" not in self.cfg.validation.model_fields_set:
            guidance = DEFAULT_GUIDANCE
        pipeline = self._sampling_pipeline()
        pipeline.resolutions = [(width, height)] + [r for r in pipeline.resolutions
                                                    if r != (width, height)]
        image = self._conditioning_image(prompt, width, height) if self.i2i else None
        positive = self._prompt_inputs(prompt, image)
        negative = self._prompt_inputs(negative_prompt, image)
        extra = {"image": image, "height": height, "width": width} if self.i2i \
            else {"height": height, "width": width}
        generator = torch.Generator("cpu").manual_seed(seed)
        device = self.device
        # The I2I pipeline encodes the conditioning image with the VAE itself (which waits in
        # CPU memory with enable_model_cpu_offload).
        with self._autocast(), self._on_device([self.vae]) if self.i2i else nullcontext():
            latents = pipeline(
                prompt_embeds_qwen=positive["prompt_embeds"][None].to(device),
                prompt_embeds_clip=positive["pooled_prompt_embeds"][None].to(device),
                prompt_cu_seqlens=_cu_seqlens(positive, device),
                negative_prompt_embeds_qwen=negative["prompt_embeds"][None].to(device),
                negative_prompt_embeds_clip=negative["pooled_prompt_embeds"][None].to(device),
                negative_prompt_cu_seqlens=_cu_seqlens(negative, device),
                guidance_scale=guidance, num_inference_steps=steps, generator=generator,
                output_type="latent", **extra).image
        return self._decode(latents, height, width)

    def _prompt_inputs(self, prompt: str, image: Any) -> dict[str, torch.Tensor]:
        """encode_text of a prompt (with its conditioning image for i2i), kept per prompt:
        bringing the 7B Qwen2.5-VL to the GPU for every image would move ~15 GB each time."""
        key = (prompt, id(image))
        if key not in self._prompt_cache:
            with self._encoders_on_device():
                self._prompt_cache[key] = self.encode_text(
                    [prompt], [image] if self.i2i else None)[0]
        return self._prompt_cache[key]

    def _conditioning_image(self, prompt: str, width: int, height: int) -> Any:
        """validation.conditioning_images' entry for the prompt, at the sample's size."""
        from PIL import Image

        from job.data.transforms import open_oriented
        from job.validate import prompt_library

        paths = self.cfg.validation.conditioning_images
        prompts = list(prompt_library(self.cfg).values())
        if len(paths) not in (1, len(prompts)):
            raise ConfigError(f"validation.conditioning_images has {len(paths)} images for "
                              f"{len(prompts)} validation prompts",
                              "give one image per prompt (validation.prompt first, then the "
                              "library's, in order), or one image for all")
        path = paths[0] if len(paths) == 1 else paths[prompts.index(prompt)]
        key = (path, width, height)
        if key not in self._conditioning:
            try:
                image = open_oriented(path)
            except OSError as err:
                raise ConfigError(f"validation.conditioning_images entry {path!r} cannot be "
                                  f"read: {err}", "point it at a readable image file") from None
            self._conditioning[key] = image.resize((width, height), Image.Resampling.LANCZOS)
        return self._conditioning[key]

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor, height: int, width: int) -> Any:
        """The stock pipeline's decode ([B, 1, h, w, C] -> unscale -> VAE), in fp32."""
        pipeline = self._sampling_pipeline()
        channels = self.transformer.config.out_visual_dim
        with self._on_device([self.vae]):  # in CPU memory with enable_model_cpu_offload
            latents = latents[..., :channels].to(self.device, torch.float32)
            latents = latents[:, 0].permute(0, 3, 1, 2) / self.vae.config.scaling_factor
            image = self.vae.decode(latents, return_dict=False)[0]
        return pipeline.image_processor.postprocess(image, output_type="pil")[0]

    def save_final(self, out_dir: Path) -> list[Path]:
        """LoRA: a diffusers LoRA file (with its alpha) that
        Kandinsky5T2IPipeline.load_lora_weights reads; full: a complete pipeline folder."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.lora_config is None:
            self._export_pipeline().save_pretrained(str(out_dir), safe_serialization=True)
            return [out_dir / "model_index.json", *(out_dir / part for part in PIPELINE_PARTS)]
        from peft import get_peft_model_state_dict

        layers = {k: v.detach().to("cpu").contiguous()
                  for k, v in get_peft_model_state_dict(self.transformer).items()}
        self.pipeline_class.save_lora_weights(
            str(out_dir), transformer_lora_layers=layers,
            transformer_lora_adapter_metadata=self.lora_config.to_dict(), safe_serialization=True)
        return [out_dir / "pytorch_lora_weights.safetensors"]

    def _export_pipeline(self):
        """The trained transformer with the frozen parts re-read at their stored precision."""
        from transformers import CLIPTextModel, Qwen2_5_VLForConditionalGeneration

        hub, parts = self._hub_kwargs(), dict(self._sampling_pipeline().components)
        for name, cls in (("text_encoder", Qwen2_5_VLForConditionalGeneration),
                          ("text_encoder_2", CLIPTextModel)):
            parts[name] = cls.from_pretrained(self.source, subfolder=name, dtype="auto", **hub)
        return self.pipeline_class(**parts)


def _cu_seqlens(inputs: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """[0, length]: the pipeline's cumulative sequence lengths of one prompt."""
    return torch.tensor([0, int(inputs["prompt_length"])], dtype=torch.int32, device=device)
