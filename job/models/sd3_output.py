"""SD3 sampling and export: the stock StableDiffusion3Pipeline around the live transformer.

A mixin of SD3Family (job/models/sd3.py), which owns the components it uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

PIPELINE_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
                  "tokenizer", "tokenizer_2", "tokenizer_3", "scheduler")


class SD3SamplingExport:
    """sample() and save_final() of the SD3 family."""

    @property
    def merge_pipeline_class(self):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def _sampling_pipeline(self):
        """The stock pipeline around the live transformer (built once; it holds references)."""
        if self._pipeline is None:
            from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

            # Its own scheduler object: sampling moves the scheduler's step state.
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
            self._pipeline = StableDiffusion3Pipeline(
                transformer=self.transformer, scheduler=scheduler, vae=self.vae,
                text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
                text_encoder_3=self.text_encoder_3, tokenizer_3=self.tokenizer_3)
            self._pipeline.set_progress_bar_config(disable=True)
        return self._pipeline

    def sample(self, prompt: str, negative_prompt: str, width: int, height: int,
               guidance: float, steps: int, seed: int) -> Any:
        """One PIL image from the stock StableDiffusion3Pipeline around the live transformer,
        with [validation]'s skip-layer guidance.

        The prompt is encoded by encode_text (the pipeline's own encoding, plus [sd3]
        t5_padding), and without a negative prompt the unconditional branch gets
        empty_text(), so CFG sees the same unconditional input that caption dropout trained.
        """
        from job.speedups.attention import swapped_processors

        v, pipeline = self.cfg.validation, self._sampling_pipeline()
        positive, negative = self._prompt_inputs(prompt), self._prompt_inputs(negative_prompt)
        # The pipeline's SLG arguments are used as given; it applies them only with
        # guidance > 1 and within the window (checked with warnings in sd3_rules).
        slg = {}
        if v.guidance_skip_layers:
            slg = {"skip_guidance_layers": list(v.guidance_skip_layers),
                   "skip_layer_guidance_scale": v.guidance_skip_scale,
                   "skip_layer_guidance_start": v.guidance_skip_layers_start,
                   "skip_layer_guidance_stop": v.guidance_skip_layers_stop}
        generator = torch.Generator("cpu").manual_seed(seed)
        device = self.device
        with swapped_processors(self.transformer, self.sampling_attention), \
                self._autocast():
            latents = pipeline(
                prompt_embeds=positive["prompt_embeds"][None].to(device),
                pooled_prompt_embeds=positive["pooled_prompt_embeds"][None].to(device),
                negative_prompt_embeds=negative["prompt_embeds"][None].to(device),
                negative_pooled_prompt_embeds=negative["pooled_prompt_embeds"][None].to(device),
                width=width, height=height, guidance_scale=guidance, num_inference_steps=steps,
                generator=generator, output_type="latent", **slg).images
        return self._decode(latents)

    def _prompt_inputs(self, prompt: str) -> dict[str, torch.Tensor]:
        """encode_text of a prompt, or empty_text() for "" (no negative prompt), kept per
        prompt: the encoders are frozen, and bringing T5-XXL to the GPU for every image
        would move about 10 GB each time."""
        if prompt not in self._prompt_cache:
            with self._encoders_on_device():
                self._prompt_cache[prompt] = self.encode_text([prompt])[0] if prompt \
                    else self.empty_text()
        return self._prompt_cache[prompt]

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor) -> Any:
        """The stock pipeline's decode (unscale, unshift, VAE), in fp32 outside autocast."""
        config, pipeline = self.vae.config, self._sampling_pipeline()
        latents = latents.to(self.vae.device, torch.float32)
        latents = latents / config.scaling_factor + config.shift_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        return pipeline.image_processor.postprocess(image, output_type="pil")[0]

    def save_final(self, out_dir: Path) -> list[Path]:
        """LoRA: a diffusers LoRA file with its alpha; full: a complete pipeline folder."""
        from diffusers import StableDiffusion3Pipeline

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.lora_config is None:
            self._export_pipeline().save_pretrained(str(out_dir), safe_serialization=True)
            return [out_dir / "model_index.json", *(out_dir / part for part in PIPELINE_PARTS)]
        from peft import get_peft_model_state_dict

        # Plain tensors whatever the base's quantisation: the adapter weights are ordinary
        # parameters. The metadata keeps alpha (diffusers otherwise assumes alpha = rank).
        layers = {k: v.detach().to("cpu").contiguous()
                  for k, v in get_peft_model_state_dict(self.transformer).items()}
        StableDiffusion3Pipeline.save_lora_weights(
            str(out_dir), transformer_lora_layers=layers,
            transformer_lora_adapter_metadata=self.lora_config.to_dict(), safe_serialization=True)
        return [out_dir / "pytorch_lora_weights.safetensors"]

    def _export_pipeline(self):
        """The trained transformer with the frozen parts; text encoders re-read at their
        stored precision, since the copies in memory may be cast down or quantised."""
        from diffusers import StableDiffusion3Pipeline
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        hub, parts = self._hub_kwargs(), dict(self._sampling_pipeline().components)
        s = self.cfg.speedups
        quantised = any(p != "no_change" for p in (s.text_encoder_1_precision,
                                                   s.text_encoder_2_precision,
                                                   s.text_encoder_3_precision))
        if self.dtype != torch.float32 or quantised:
            for name, cls in (("text_encoder", CLIPTextModelWithProjection),
                              ("text_encoder_2", CLIPTextModelWithProjection),
                              ("text_encoder_3", T5EncoderModel)):
                parts[name] = cls.from_pretrained(self.source, subfolder=name, dtype="auto", **hub)
        parts.pop("image_encoder", None)
        parts.pop("feature_extractor", None)
        return StableDiffusion3Pipeline(**parts)
