"""SD3 / SD3.5: CLIP-L + CLIP-G + T5 conditioning, a rectified-flow MMDiT transformer.

Text conditioning follows StableDiffusion3Pipeline.encode_prompt; the flow-matching math
lives in job/models/sd3_flow.py; sampling and export in job/models/sd3_output.py.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from job.config import JobConfig
from job.errors import ConfigError
from job.log import get_logger
from job.models import sd3_flow as flow
from job.models.base import PreparedImage
from job.models.common import (FamilyCommon, config_hash, error_detail, tokenizer_hash,
                               weights_source)
from job.models.merge import StockPipelineMerge
from job.models.sd3_output import SD3SamplingExport
from job.models.sd3_rules import check_skip_layer_guidance
from job.models.tread_rules import resolve_routes
from job.train import distributed

# Kept unquantised: the input/output projections and embedders are small, and their
# precision sets the precision of every token (SD3.5 Large is known to destabilise).
_UNQUANTISED = ("pos_embed", "time_text_embed", "context_embedder", "norm_out", "proj_out")


def _quantisable_base_layer(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.Linear) and not name.startswith(_UNQUANTISED)


def _any_linear(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.Linear)


class SD3Family(FamilyCommon, SD3SamplingExport, StockPipelineMerge):
    """Stable Diffusion 3 / 3.5 through diffusers' StableDiffusion3Pipeline components."""

    name = "sd3"
    supports_lcm = False
    denoiser_attribute = "transformer"

    def __init__(self, cfg: JobConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        self.settings = cfg.sd3
        self.source, self.tiny_folder = weights_source(cfg)
        self.revision = cfg.model.revision
        self.log = get_logger()
        self.lora_config = None
        self._pipeline = None
        # An attention processor for sampling only (job/speedups/attention.py); None: SDPA.
        self.sampling_attention = None
        self.routes: list[tuple[int, int, float]] = []  # [tread], resolved at load
        self.router = None  # job/speedups/tread.py, when [tread] has routes
        self._prompt_cache: dict[str, dict[str, torch.Tensor]] = {}  # validation prompts

    @classmethod
    def around(cls, cfg: JobConfig, transformer: nn.Module, scheduler: Any,
               device: torch.device, dtype: torch.dtype) -> "SD3Family":
        """The family's training math around a given transformer and scheduler, without
        text encoders or VAE (bench/sd3_step.py times training steps on random weights)."""
        family = cls(cfg, device, dtype)
        family.transformer, family.scheduler = transformer, scheduler
        family.routes = resolve_routes(cfg.tread.routes, transformer.config.num_layers,
                                       "transformer blocks")
        return family

    # -- loading ----------------------------------------------------------------------

    def load(self) -> None:
        """Load every component from the hub id or local folder, frozen and on the device."""
        from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler,
                               SD3Transformer2DModel, StableDiffusion3Pipeline)
        from huggingface_hub.utils import HFValidationError
        from transformers import (CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel,
                                  T5TokenizerFast)

        if self.tiny_folder is not None:
            from job.models.sd3_tiny import ensure_tiny_sd3

            ensure_tiny_sd3(self.tiny_folder)
        hub, src = self._hub_kwargs(), self.source
        try:
            # model_index.json first: a missing model fails here with a clear error.
            self.pipeline_config = StableDiffusion3Pipeline.load_config(src, **hub)
            self.tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **hub)
            self.tokenizer_2 = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2", **hub)
            self.tokenizer_3 = T5TokenizerFast.from_pretrained(src, subfolder="tokenizer_3", **hub)
            self.text_encoder = CLIPTextModelWithProjection.from_pretrained(
                src, subfolder="text_encoder", dtype=self.dtype, **hub)
            self.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                src, subfolder="text_encoder_2", dtype=self.dtype, **hub)
            self.text_encoder_3 = T5EncoderModel.from_pretrained(
                src, subfolder="text_encoder_3", dtype=self.dtype, **hub)
            # fp32 VAE: latents do not depend on train.mixed_precision, so the latent cache
            # stays valid across it, and decoding never overflows.
            self.vae = AutoencoderKL.from_pretrained(
                src, subfolder="vae", torch_dtype=torch.float32, **hub)
            self.transformer = SD3Transformer2DModel.from_pretrained(
                src, subfolder="transformer", torch_dtype=self._base_dtype(), **hub)
            self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
                src, subfolder="scheduler", **hub)
        except (OSError, HFValidationError) as err:
            raise self._load_error(err) from None
        # The transformer skips only layer indices it has; others would be silently ignored.
        check_skip_layer_guidance(self.cfg, self.transformer.config.num_layers)
        self.routes = resolve_routes(self.cfg.tread.routes, self.transformer.config.num_layers,
                                     "transformer blocks")
        self._place_and_freeze()

    def _place_and_freeze(self) -> None:
        full = self.cfg.model.model_type == "full"
        for module in (self.text_encoder, self.text_encoder_2, self.text_encoder_3, self.vae):
            module.requires_grad_(False).eval().to(self.device)
        self.transformer.requires_grad_(full).train().to(self.device)
        self._enable_checkpointing()
        if min(len(self.tokenizer), len(self.tokenizer_2), len(self.tokenizer_3)) < 10:
            raise ConfigError(f"the tokenizers of {self.source!r} are empty or missing",
                              "point model.pretrained_model_name_or_path at a complete SD3 "
                              "folder (tokenizer/, tokenizer_2/ and tokenizer_3/ included)")

    def _load_error(self, err: Exception) -> ConfigError:
        """Which model could not be loaded, and where to put it."""
        m = self.cfg.model
        key = self._weights_setting()
        offline = " with HF_HUB_OFFLINE=1" if self._hub_kwargs()["local_files_only"] else ""
        detail = error_detail(err)
        return ConfigError(
            f"cannot load SD3 weights {self.source!r} (from {key}, revision "
            f"{m.revision or 'main'}){offline}: {detail}",
            f"accept the model's licence on the hub and put the weights under "
            f"model.hub_cache_dir ({m.hub_cache_dir}), e.g. `HF_HOME={m.hub_cache_dir} hf "
            f"download {self.source}`, or set model.pretrained_model_name_or_path to a local "
            "folder in the diffusers layout")

    def denoiser(self) -> nn.Module:
        """The MMDiT transformer (trained)."""
        return self.transformer

    def quantisation_targets(self) -> dict[str, tuple[nn.Module, Callable[[nn.Module, str], bool]]]:
        """[speedups] precision key -> (module, which of its layers may be quantised)."""
        return {"base_model_precision": (self.transformer, _quantisable_base_layer),
                "text_encoder_1_precision": (self.text_encoder, _any_linear),
                "text_encoder_2_precision": (self.text_encoder_2, _any_linear),
                "text_encoder_3_precision": (self.text_encoder_3, _any_linear)}

    def fingerprint(self, part: str) -> dict[str, Any]:
        """What changes the cached text embeddings (`text`) or latents (`latent`)."""
        base = {"family": self.name, "model": self.source, "revision": self.revision}
        s, speed = self.settings, self.cfg.speedups
        if part == "text":
            return {**base, **{f"text_encoder{i}": config_hash(e.config) for i, e in
                               (("", self.text_encoder), ("_2", self.text_encoder_2),
                                ("_3", self.text_encoder_3))},
                    **{f"tokenizer{i}": tokenizer_hash(t) for i, t in
                       (("", self.tokenizer), ("_2", self.tokenizer_2), ("_3", self.tokenizer_3))},
                    "clip_length": self.tokenizer.model_max_length, "layer": "penultimate",
                    "t5_length": s.tokenizer_max_length, "t5_padding": s.t5_padding,
                    "clip_uncond": s.clip_uncond_behaviour, "t5_uncond": s.t5_uncond_behaviour,
                    "precision": [speed.text_encoder_1_precision, speed.text_encoder_2_precision,
                                  speed.text_encoder_3_precision], "dtype": str(self.dtype)}
        if part == "latent":
            c = self.vae.config
            return {**base, "vae": config_hash(c), "scaling_factor": c.scaling_factor,
                    "shift_factor": c.shift_factor, "vae_dtype": "float32",
                    "latent": "posterior_mean"}
        raise ValueError(f"unknown fingerprint part {part!r}; expected 'text' or 'latent'")

    # -- encoding ---------------------------------------------------------------------

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        """Per caption, prompt_embeds [77 + T5 length, T5 width] and pooled_prompt_embeds
        [CLIP-L + CLIP-G projection] (CPU), as StableDiffusion3Pipeline.encode_prompt."""
        hidden, pooled = [], []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder),
                                   (self.tokenizer_2, self.text_encoder_2)):
            # Both CLIPs at the first tokenizer's length, as the pipeline does.
            ids = tokenizer(captions, padding="max_length", max_length=self.clip_length,
                            truncation=True, return_tensors="pt").input_ids
            output = encoder(ids.to(encoder.device), output_hidden_states=True)
            pooled.append(output.text_embeds)  # the projected pooled output
            hidden.append(output.hidden_states[-2].to(self.text_encoder.dtype))
        t5 = self._t5_embeds(captions)
        clip = torch.cat(hidden, dim=-1)
        # CLIP features zero-padded to T5's width, then T5's tokens after CLIP's.
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        embeds = torch.cat([clip, t5.to(clip.device)], dim=-2).cpu()
        pooled_embeds = torch.cat(pooled, dim=-1).cpu()
        return [{"prompt_embeds": e.clone(), "pooled_prompt_embeds": p.clone()}
                for e, p in zip(embeds, pooled_embeds)]

    @property
    def clip_length(self) -> int:
        return self.tokenizer.model_max_length

    def _t5_embeds(self, captions: list[str]) -> torch.Tensor:
        tokens = self.tokenizer_3(captions, padding="max_length",
                                  max_length=self.settings.tokenizer_max_length, truncation=True,
                                  add_special_tokens=True, return_tensors="pt")
        encoder = self.text_encoder_3
        embeds = encoder(tokens.input_ids.to(encoder.device))[0].to(encoder.dtype)
        if self.settings.t5_padding == "zero":
            embeds = embeds * tokens.attention_mask.to(embeds.device, embeds.dtype).unsqueeze(-1)
        return embeds

    def empty_text(self) -> dict[str, torch.Tensor]:
        """The unconditional input (caption dropout; CFG without a negative prompt): the
        encoded empty caption, with the CLIP and/or T5 parts zeroed as [sd3] says."""
        empty = self.encode_text([""])[0]
        embeds, pooled = empty["prompt_embeds"], empty["pooled_prompt_embeds"]
        if self.settings.clip_uncond_behaviour == "zero":
            embeds[:self.clip_length] = 0
            pooled.zero_()
        if self.settings.t5_uncond_behaviour == "zero":
            embeds[self.clip_length:] = 0
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(posterior mean - shift_factor) * scaling_factor [B, 16, H/8, W/8] (CPU)."""
        # The posterior mean, not a sample: it depends on the image alone, so cached latents
        # do not depend on batch order or cache resumes.
        posterior = self.vae.encode(pixels.to(self.vae.device, torch.float32)).latent_dist
        c = self.vae.config
        return ((posterior.mode() - c.shift_factor) * c.scaling_factor).cpu()

    def image_conditioning(self, image: PreparedImage) -> dict[str, torch.Tensor]:
        """None: SD3 has no per-image conditioning beside the latent."""
        return {}

    def unload_encoders(self) -> None:
        """Move the three text encoders to the CPU; sample() brings them back while it runs
        (it encodes the validation prompts). The VAE stays for decoding."""
        for encoder in self.text_encoders():
            encoder.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.log.info("encoders_unloaded", moved=["text_encoder", "text_encoder_2",
                                                  "text_encoder_3"], to="cpu")

    def text_encoders(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return self.text_encoder, self.text_encoder_2, self.text_encoder_3

    # -- training ---------------------------------------------------------------------

    def add_lora(self) -> None:
        """A peft LoRA on the transformer's [lora] target modules; only it is trainable."""
        self.lora_config = self._new_lora_config()
        self.transformer.requires_grad_(False)
        with warnings.catch_warnings():
            # peft's note on a torchao-quantised base that merging needs the quantisation
            # recipe: the adapter is never merged here, it is exported on its own.
            warnings.filterwarnings("ignore", message=".*get_apply_tensor_subclass.*")
            self.transformer.add_adapter(self.lora_config)
        # Created in the base dtype (bf16 under mixed precision); updates that small need
        # fp32 master weights unless adamw_bf16 compensates.
        for param in self.transformer.parameters():
            if param.requires_grad:
                param.data = param.data.to(self._trainable_dtype())

    def training_sigmas(self, batch_size: int, latent_size: tuple[int, int],
                        generator: torch.Generator) -> torch.Tensor:
        """Shifted training sigmas [B] (CPU): logit-normal or uniform, then the static
        shift, or the resolution-dependent one with flow_schedule_auto_shift."""
        s = self.settings
        sigmas = flow.sample_sigmas(batch_size, generator, s.flow_use_uniform_schedule,
                                    s.logit_mean, s.logit_std)
        if s.flow_schedule_auto_shift:
            return flow.dynamic_shift(sigmas, self.auto_shift_mu(*latent_size))
        return flow.static_shift(sigmas, s.flow_schedule_shift)

    def auto_shift_mu(self, latent_height: int, latent_width: int) -> float:
        """mu for the image's token count, from the scheduler config's line."""
        c = self.scheduler.config
        seq_len = flow.image_seq_len(latent_height, latent_width,
                                     self.transformer.config.patch_size)
        return flow.dynamic_shift_mu(seq_len, c.base_image_seq_len, c.max_image_seq_len,
                                     c.base_shift, c.max_shift)

    def token_router(self):
        """TREAD's router on the transformer blocks for the resolved routes
        (job/speedups/tread.py)."""
        from job.speedups.tread import JointTokenRouter

        return JointTokenRouter(self.transformer.transformer_blocks, self.routes)

    def training_loss(self, batch: dict[str, torch.Tensor],
                      generator: torch.Generator) -> torch.Tensor:
        """Per-sample loss [B]: sigmas, then noise, then TREAD's token choice (with routes),
        drawn from `generator` on the CPU (so CPU and GPU runs see the same draws),
        weighted by [sd3] loss_weighting."""
        latents = batch["latents"]
        sigmas = self.training_sigmas(latents.shape[0], tuple(latents.shape[-2:]), generator)
        noise = distributed.randn(latents.shape, generator, device=latents.device)
        patch = self.transformer.config.patch_size
        routing = self.router.draw(latents, generator, (patch, patch)) if self.router else None
        losses = self._losses(batch, distributed.to_device(sigmas, latents.device), noise,
                              routing)
        weights = flow.loss_weights(self.settings.loss_weighting, sigmas)
        return losses * distributed.to_device(weights, losses.device)

    def eval_loss(self, batch: dict[str, torch.Tensor], timesteps: torch.Tensor,
                  noise: torch.Tensor) -> torch.Tensor:
        """Per-sample unweighted loss [B] at sigma = timestep / 1000 (unshifted, so the
        number does not move when the shift settings do)."""
        device = batch["latents"].device
        sigmas = timesteps.to(device, torch.float32) / flow.NUM_TRAIN_TIMESTEPS
        return self._losses(batch, sigmas, noise.to(device, torch.float32))

    def _losses(self, batch: dict[str, torch.Tensor], sigmas: torch.Tensor,
                noise: torch.Tensor, routing=None) -> torch.Tensor:
        """Per-sample MSE (fp32) between the predicted and the true velocity, over every
        token (a TREAD `routing` only narrows which tokens run the routed blocks)."""
        latents = batch["latents"].float()
        noisy = flow.noisy_latents(latents, noise, sigmas)
        prediction = self.denoise(noisy, flow.timesteps_of(sigmas), batch, routing)
        error = F.mse_loss(prediction.float(), flow.flow_target(latents, noise),
                           reduction="none")
        return error.mean(dim=tuple(range(1, error.ndim)))

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor,
                batch: dict[str, torch.Tensor], routing=None) -> torch.Tensor:
        """The transformer's velocity prediction, under autocast; a TREAD routing travels
        as joint_attention_kwargs (job/speedups/tread.py; None: every token everywhere)."""
        with self._autocast():
            return self.transformer(
                hidden_states=noisy, timestep=timesteps,
                encoder_hidden_states=batch["text.prompt_embeds"],
                pooled_projections=batch["text.pooled_prompt_embeds"],
                joint_attention_kwargs=routing, return_dict=False)[0]
