"""Kandinsky 5.0 Image Lite (t2i and i2i): Qwen2.5-VL + CLIP-L conditioning, the Flux VAE,
a flow-matching DiT (diffusers' Kandinsky5Transformer3DModel).

Text conditioning is the stock pipeline's own encode_prompt, called per caption (so padding
never enters an embedding); latents are the VAE posterior mean times scaling_factor only,
as the stock pipelines scale them (no shift factor). The flow-matching math is SD3's
(job/models/sd3_flow.py: the same rectified flow, x_t = (1 - t) x0 + t noise, velocity
noise - x0, timestep t * 1000). Sampling and export live in kandinsky5_output.py, token
routing in job/speedups/tread.py, group offload in job/speedups/offload.py.

Known upstream behaviour kept on purpose: the stock I2I pipeline cuts 54 leading Qwen tokens
while its template's prefix is about 49 tokens with the real tokenizer, so the first ~5
tokens of an i2i prompt never reach the model (kandinskylab/kandinsky-5 issue #92). Training
encodes through the same encode_prompt, so it sees what inference sees; an i2i caption's
first words are best kept unimportant. The tiny i2i model's tokenizer is built so that the
cut lands on the prompt's first token (job/models/kandinsky5_tiny.py).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

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
from job.models.kandinsky5_output import Kandinsky5SamplingExport
from job.models.kandinsky5_rules import is_i2i
from job.models.merge import StockPipelineMerge
from job.models.tread_rules import resolve_routes
from job.train import distributed

# Kept unquantised: embedders, modulations and the output layer set every token's scale.
_UNQUANTISED = ("time_embeddings", "text_embeddings", "pooled_text_embeddings",
                "visual_embeddings", "out_layer")


# The Kandinsky attention names ([lora] target_modules' default names SDXL/SD3 layers);
# "out_layer" alone would also match the feed-forward, modulation and final layers.
DEFAULT_LORA_TARGETS = ("to_query", "to_key", "to_value", "self_attention.out_layer",
                        "cross_attention.out_layer")


def _quantisable_base_layer(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.Linear) and not name.startswith(_UNQUANTISED) \
        and "modulation" not in name


def _any_linear(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.Linear)


class Kandinsky5Family(FamilyCommon, Kandinsky5SamplingExport, StockPipelineMerge):
    """Kandinsky 5.0 Image through diffusers' Kandinsky5T2IPipeline / Kandinsky5I2IPipeline."""

    name = "kandinsky5-image"
    supports_lcm = False
    denoiser_attribute = "transformer"

    def __init__(self, cfg: JobConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        self.settings = cfg.kandinsky5
        self.i2i = is_i2i(cfg)
        self.source, self.tiny_folder = weights_source(cfg)
        self.revision = cfg.model.revision
        self.log = get_logger()
        self.lora_config = None
        self.router = None  # job/speedups/tread.py, when [tread] has routes
        self._pipeline = None
        self._prompt_cache: dict[Any, dict[str, torch.Tensor]] = {}
        self._conditioning: dict[tuple, Any] = {}  # validation conditioning images
        self.sampling_attention = None

    @classmethod
    def around(cls, cfg: JobConfig, transformer: nn.Module, scheduler: Any,
               device: torch.device, dtype: torch.dtype) -> "Kandinsky5Family":
        """The training math around a given transformer and scheduler, without encoders or
        VAE (bench/kandinsky5_step.py times training steps on random weights)."""
        family = cls(cfg, device, dtype)
        family.transformer, family.scheduler = transformer, scheduler
        return family

    # -- loading ----------------------------------------------------------------------

    @property
    def pipeline_class(self):
        from diffusers import Kandinsky5I2IPipeline, Kandinsky5T2IPipeline

        return Kandinsky5I2IPipeline if self.i2i else Kandinsky5T2IPipeline

    merge_pipeline_class = pipeline_class

    def _weights_source(self) -> str:
        """The weights' hub id or folder; the tiny flavour's t2i or i2i model is built on
        first use."""
        if self.tiny_folder is not None:
            from job.models.kandinsky5_tiny import ensure_tiny_kandinsky5

            kind = "i2i" if self.i2i else "t2i"
            folder = self.tiny_folder.with_name(f"{self.tiny_folder.name}-{kind}")
            self.source = str(ensure_tiny_kandinsky5(folder, kind))
        return self.source

    def load(self) -> None:
        """Every component from the hub id or local folder, frozen. The transformer waits in
        CPU memory when it is group-offloaded or while offload_during_startup caches."""
        from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler,
                               Kandinsky5Transformer3DModel)
        from huggingface_hub.utils import HFValidationError
        from transformers import (CLIPTextModel, CLIPTokenizer,
                                  Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor)

        hub, src = self._hub_kwargs(), self._weights_source()
        try:
            self.pipeline_config = self.pipeline_class.load_config(src, **hub)
            self.tokenizer = Qwen2VLProcessor.from_pretrained(src, subfolder="tokenizer", **hub)
            self.tokenizer_2 = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2", **hub)
            self.text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                src, subfolder="text_encoder", dtype=self.dtype, **hub)
            self.text_encoder_2 = CLIPTextModel.from_pretrained(
                src, subfolder="text_encoder_2", dtype=self.dtype, **hub)
            # fp32 VAE: cached latents do not depend on train.mixed_precision.
            self.vae = AutoencoderKL.from_pretrained(src, subfolder="vae",
                                                     torch_dtype=torch.float32, **hub)
            self.transformer = Kandinsky5Transformer3DModel.from_pretrained(
                src, subfolder="transformer", torch_dtype=self._base_dtype(), **hub)
            self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
                src, subfolder="scheduler", **hub)
        except (OSError, HFValidationError) as err:
            raise self._load_error(err) from None
        self._check_loaded()
        self._place_and_freeze()
        self._report_sizes()

    def _report_sizes(self) -> None:
        """Say at start which validation sizes the model was not trained at (they are
        sampled as asked, where the stock pipeline would silently snap them)."""
        from job.config import validation_sizes

        trained = set(self._sampling_pipeline().resolutions)
        other = [f"{w}x{h}" for w, h in validation_sizes(self.cfg) if (w, h) not in trained]
        if other and self.cfg.validation.enabled:
            self.log.warning("validation_size_untrained", sizes=other,
                             trained=[f"{w}x{h}" for w, h in sorted(trained)],
                             note="sampled at the sizes asked for; the stock pipeline would "
                                  "snap them to the nearest trained aspect")

    def _check_loaded(self) -> None:
        """The flavour matches the weights, and the routes fit the loaded depth."""
        takes_image = bool(self.transformer.config.visual_cond)
        if takes_image != self.i2i:
            kind = "image-to-image" if takes_image else "text-to-image"
            raise ConfigError(
                f"the transformer of {self.source!r} is {kind}, but model.flavour = "
                f"{self.cfg.model.flavour or 't2i-lite-sft'!r} says otherwise",
                f"set model.flavour to an {'i2i' if takes_image else 't2i'} flavour")
        self.routes = resolve_routes(self.cfg.tread.routes,
                                     len(self.transformer.visual_transformer_blocks))
        if len(self.tokenizer.tokenizer) < 10 or len(self.tokenizer_2) < 10:
            raise ConfigError(f"the tokenizers of {self.source!r} are empty or missing",
                              "point model.pretrained_model_name_or_path at a complete "
                              "Kandinsky 5 folder (tokenizer/ and tokenizer_2/ included)")

    def _place_and_freeze(self) -> None:
        s = self.cfg.speedups
        full = self.cfg.model.model_type == "full"
        self.transformer.requires_grad_(full).train()
        for module in (self.text_encoder, self.text_encoder_2, self.vae):
            module.requires_grad_(False).eval()
        self._enable_checkpointing()
        # Offloaded or deferred: the transformer joins the GPU after caching (unload_encoders).
        if not (s.enable_group_offload or s.offload_during_startup):
            self.transformer.to(self.device)
        if not s.offload_during_startup:
            for module in (self.text_encoder, self.text_encoder_2, self.vae):
                module.to(self.device)

    def _load_error(self, err: Exception) -> ConfigError:
        m = self.cfg.model
        key = self._weights_setting()
        offline = " with HF_HUB_OFFLINE=1" if self._hub_kwargs()["local_files_only"] else ""
        detail = error_detail(err)
        return ConfigError(
            f"cannot load Kandinsky 5 weights {self.source!r} (from {key}, revision "
            f"{m.revision or 'main'}){offline}: {detail}",
            f"put the weights under model.hub_cache_dir ({m.hub_cache_dir}), e.g. "
            f"`HF_HOME={m.hub_cache_dir} hf download {self.source}`, or set "
            "model.pretrained_model_name_or_path to a local folder in the diffusers layout")

    def denoiser(self) -> nn.Module:
        """The DiT (trained)."""
        return self.transformer

    def token_router(self):
        """TREAD's router on the visual blocks for the resolved routes (job/speedups/tread.py)."""
        from job.speedups.tread import TokenRouter

        return TokenRouter(self.transformer.visual_transformer_blocks, self.routes)

    def quantisation_targets(self) -> dict[str, tuple[nn.Module, Callable[[nn.Module, str], bool]]]:
        """[speedups] precision key -> (module, which of its layers may be quantised)."""
        return {"base_model_precision": (self.transformer, _quantisable_base_layer),
                "text_encoder_1_precision": (self.text_encoder, _any_linear),
                "text_encoder_2_precision": (self.text_encoder_2, _any_linear)}

    def fingerprint(self, part: str) -> dict[str, Any]:
        """What changes the cached text embeddings (`text`) or latents (`latent`)."""
        base = {"family": self.name, "model": self.source, "revision": self.revision}
        if part == "text":
            speed = self.cfg.speedups
            return {**base, "text_encoder": config_hash(self.text_encoder.config),
                    "text_encoder_2": config_hash(self.text_encoder_2.config),
                    "tokenizer": tokenizer_hash(self.tokenizer.tokenizer),
                    "tokenizer_2": tokenizer_hash(self.tokenizer_2),
                    "template": self._encoder_pipeline().prompt_template,
                    "max_length": self.max_sequence_length, "dtype": str(self.dtype),
                    "precision": [speed.text_encoder_1_precision, speed.text_encoder_2_precision]}
        if part == "latent":
            c = self.vae.config
            return {**base, "vae": config_hash(c), "scaling_factor": c.scaling_factor,
                    "shift_factor": None, "vae_dtype": "float32", "latent": "posterior_mean",
                    "conditioning": self.i2i}
        raise ValueError(f"unknown fingerprint part {part!r}; expected 'text' or 'latent'")

    # -- encoding ---------------------------------------------------------------------

    @property
    def max_sequence_length(self) -> int:
        """Qwen tokens kept after the template: [kandinsky5] or the pipeline's default."""
        return self.settings.tokenizer_max_length or (1024 if self.i2i else 512)

    def _encoder_pipeline(self):
        """The stock pipeline holding only the text encoders: its encode_prompt is the
        conditioning the model was trained and is sampled with."""
        if getattr(self, "_encoders", None) is None:
            self._encoders = self.pipeline_class(
                transformer=None, vae=None, text_encoder=self.text_encoder,
                tokenizer=self.tokenizer, text_encoder_2=self.text_encoder_2,
                tokenizer_2=self.tokenizer_2, scheduler=None)
        return self._encoders

    @torch.no_grad()
    def encode_text(self, captions: list[str], images: list[Any] | None = None
                    ) -> list[dict[str, torch.Tensor]]:
        """Per caption: prompt_embeds [L, Qwen width] (L varies), prompt_length [] and
        pooled_prompt_embeds [CLIP width], on the CPU. i2i: with its conditioning image
        (PIL), which the Qwen prompt carries as vision tokens."""
        if self.i2i and images is None:
            raise ValueError("the i2i flavours encode each caption with its conditioning image")
        with self._resident("text"):
            pipeline, out = self._encoder_pipeline(), []
            for i, caption in enumerate(captions):
                extra = {"image": images[i]} if self.i2i else {}
                qwen, clip, cu = pipeline.encode_prompt(
                    prompt=caption, max_sequence_length=self.max_sequence_length,
                    device=self.text_encoder.device, dtype=self.dtype, **extra)
                length = int(cu[-1])
                out.append({"prompt_embeds": qwen[0, :length].cpu().clone(),
                            "prompt_length": torch.tensor(length),
                            "pooled_prompt_embeds": clip[0].cpu().clone()})
        return out

    def empty_text(self, image: Any = None) -> dict[str, torch.Tensor]:
        """The encoded empty prompt: the stock pipeline's negative prompt without one."""
        return self.encode_text([""], [image] if self.i2i else None)[0]

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """posterior mean * scaling_factor [B, 16, H/8, W/8] (CPU), without a shift factor
        (the stock pipelines apply none)."""
        with self._resident("vae"):
            posterior = self.vae.encode(pixels.to(self.vae.device, torch.float32)).latent_dist
            return (posterior.mode() * self.vae.config.scaling_factor).cpu()

    def image_conditioning(self, image: PreparedImage) -> dict[str, torch.Tensor]:
        """None beside the latent; i2i conditioning latents come from the paired image."""
        return {}

    @contextmanager
    def _resident(self, part: str) -> Iterator[None]:
        """With offload_during_startup, the block's encoder alone on the GPU: the VAE for
        `vae`, the text encoders for `text` (the others wait in CPU memory)."""
        if not self.cfg.speedups.offload_during_startup:
            yield
            return
        wanted = [self.vae] if part == "vae" else [self.text_encoder, self.text_encoder_2]
        for module in (self.text_encoder, self.text_encoder_2, self.vae):
            if module not in wanted:
                module.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        for module in wanted:
            module.to(self.device)
        yield

    def unload_encoders(self) -> None:
        """Text encoders to the CPU (sampling brings them back for new prompts); the VAE
        stays for decoding (with enable_model_cpu_offload it waits in CPU memory too); a
        deferred transformer joins the GPU now."""
        for encoder in self.text_encoders():
            encoder.to("cpu")
        # enable_model_cpu_offload: the VAE too waits in CPU memory (_decode brings it).
        self.vae.to("cpu" if self.cfg.speedups.enable_model_cpu_offload else self.device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if not self.cfg.speedups.enable_group_offload:
            self.transformer.to(self.device)
        self.log.info("encoders_unloaded", moved=["text_encoder", "text_encoder_2"], to="cpu")

    def text_encoders(self) -> tuple[nn.Module, nn.Module]:
        return self.text_encoder, self.text_encoder_2

    # -- training ---------------------------------------------------------------------

    def add_lora(self) -> None:
        """A peft LoRA on the transformer's [lora] target modules (left out: every attention
        projection of the text and visual blocks); only it is trainable."""
        self.lora_config = self._new_lora_config()
        if "target_modules" not in self.cfg.lora.model_fields_set:
            self.lora_config.target_modules = set(DEFAULT_LORA_TARGETS)
        self.transformer.requires_grad_(False)
        from peft.utils.error import NoMatchingPeftModuleError

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*get_apply_tensor_subclass.*")
            try:
                self.transformer.add_adapter(self.lora_config)
            except NoMatchingPeftModuleError:
                raise ConfigError(
                    f"[lora] target_modules = {sorted(self.lora_config.target_modules)} matches "
                    "no layer of the Kandinsky 5 transformer",
                    "leave target_modules out (the attention projections: "
                    f"{', '.join(DEFAULT_LORA_TARGETS)}), or name Kandinsky 5 layers such as "
                    '"feed_forward.in_layer"') from None
        for param in self.transformer.parameters():
            if param.requires_grad:
                param.data = param.data.to(self.device, self._trainable_dtype())

    def training_loss(self, batch: dict[str, torch.Tensor],
                      generator: torch.Generator) -> torch.Tensor:
        """Per-sample velocity MSE [B] at shifted logit-normal (or uniform) sigmas; noise,
        sigmas and TREAD's token choice drawn from `generator` on the CPU."""
        latents = batch["latents"]
        s = self.settings
        sigmas = flow.static_shift(
            flow.sample_sigmas(latents.shape[0], generator, s.flow_use_uniform_schedule,
                               s.logit_mean, s.logit_std), s.flow_schedule_shift)
        noise = distributed.randn(latents.shape, generator, device=latents.device)
        routing = self.router.draw(latents, generator) if self.router else None
        return self._losses(batch, distributed.to_device(sigmas, latents.device), noise, routing)

    def eval_loss(self, batch: dict[str, torch.Tensor], timesteps: torch.Tensor,
                  noise: torch.Tensor) -> torch.Tensor:
        """Per-sample loss [B] at sigma = timestep / 1000 (unshifted, never routed)."""
        device = batch["latents"].device
        sigmas = timesteps.to(device, torch.float32) / flow.NUM_TRAIN_TIMESTEPS
        return self._losses(batch, sigmas, noise.to(device, torch.float32), None)

    def _losses(self, batch, sigmas, noise, routing) -> torch.Tensor:
        latents = batch["latents"].float()
        noisy = flow.noisy_latents(latents, noise, sigmas)
        prediction = self.denoise(noisy, flow.timesteps_of(sigmas), batch, routing=routing)
        error = F.mse_loss(prediction.float(), flow.flow_target(latents, noise), reduction="none")
        return error.mean(dim=tuple(range(1, error.ndim)))

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor,
                batch: dict[str, torch.Tensor], routing: Any = None) -> torch.Tensor:
        """The velocity [B, 16, h, w] under autocast. Captions of different lengths run as
        separate same-length groups: the transformer has no text attention mask, so padding
        would change the prediction."""
        lengths = batch["text.prompt_length"].tolist()
        out = torch.empty_like(noisy)
        for length in sorted(set(lengths)):
            rows = [i for i, n in enumerate(lengths) if n == length]
            index = torch.tensor(rows, device=noisy.device)
            part = self._forward(noisy[index], timesteps[index],
                                 batch["text.prompt_embeds"][index, :length],
                                 batch["text.pooled_prompt_embeds"][index],
                                 batch["cond.image_latents"][index] if self.i2i else None,
                                 routing.rows(rows) if routing is not None else None)
            out = out.index_copy(0, index, part.to(out.dtype))
        return out

    def _forward(self, noisy, timesteps, text, pooled, image_latents, routing) -> torch.Tensor:
        """One same-length group through the transformer, in its layout: [B, 1, h, w, C]
        latents (i2i: noisy, conditioning latents and a ones mask along C, as the I2I
        pipeline builds them), rope positions over frames, rows and columns of 2x2 patches,
        and over the text tokens."""
        b, _, h, w = noisy.shape
        x = noisy.permute(0, 2, 3, 1)[:, None]
        if image_latents is not None:
            cond = image_latents.permute(0, 2, 3, 1)[:, None].to(x.dtype)
            x = torch.cat([x, cond, torch.ones_like(x[..., :1])], dim=-1)
        patch = self.transformer.config.patch_size
        device = noisy.device
        rope = [torch.arange(1, device=device), torch.arange(h // patch[1], device=device),
                torch.arange(w // patch[2], device=device)]
        with self._autocast():
            # A TREAD routing travels as sparse_params (job/speedups/tread.py); None: dense.
            velocity = self.transformer(
                hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                timestep=timesteps, visual_rope_pos=rope,
                text_rope_pos=torch.arange(text.shape[1], device=device),
                scale_factor=(1.0, 1.0, 1.0), sparse_params=routing, return_dict=False)
        # return_dict=False returns the tensor itself here, not a tuple.
        return velocity[:, 0].permute(0, 3, 1, 2)
