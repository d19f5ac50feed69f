"""SDXL: two CLIP text encoders, micro-conditioning time ids, an epsilon/v UNet.

Every piece of SDXL math (text conditioning, time ids, noise, target, Min-SNR) lives here;
the rest of the job reaches it through the protocol in job/models/base.py.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from job.config import JobConfig
from job.errors import ConfigError
from job.log import get_logger
from job.models.base import PreparedImage
from job.models.common import (FamilyCommon, config_hash, error_detail, tokenizer_hash,
                               weights_source)
from job.models.merge import StockPipelineMerge
from job.models.sdxl_output import SDXLSamplingExport
from job.train import distributed


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float,
                    prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for the given timesteps."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "v_prediction":
        # The v loss already equals the epsilon loss times (snr + 1).
        return clipped / (snr + 1)
    # min(snr, gamma) / snr tends to 1 as snr -> 0 (a zero-terminal-SNR step).
    return torch.where(snr > 0, clipped / snr.clamp(min=1e-20), torch.ones_like(snr))


class SDXLFamily(FamilyCommon, SDXLSamplingExport, StockPipelineMerge):
    """Stable Diffusion XL through diffusers' StableDiffusionXLPipeline components."""

    name = "sdxl"
    supports_lcm = True
    denoiser_attribute = "unet"

    def __init__(self, cfg: JobConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        self.source, self.tiny_folder = weights_source(cfg)
        self.revision = cfg.model.revision
        self.log = get_logger()
        self.lora_config = None
        self._pipeline = None
        self._lcm_scheduler = None
        self._as_teacher = False
        self.teacher_unet = None  # a full LCM student's frozen teacher

    # -- loading ----------------------------------------------------------------------

    def load(self) -> None:
        """Load every component from the hub id or local folder, frozen and on the device."""
        import diffusers
        from diffusers import (AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline,
                               UNet2DConditionModel)
        from huggingface_hub.utils import HFValidationError
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        if self.tiny_folder is not None:
            from job.models.sdxl_tiny import ensure_tiny_sdxl

            ensure_tiny_sdxl(self.tiny_folder)
        hub, src = self._hub_kwargs(), self.source
        try:
            # model_index.json first: a missing model fails here with a clear error, where
            # CLIPTokenizer.from_pretrained would quietly return an empty tokenizer.
            self.pipeline_config = StableDiffusionXLPipeline.load_config(src, **hub)
            self.tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **hub)
            self.tokenizer_2 = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2", **hub)
            self.text_encoder = CLIPTextModel.from_pretrained(
                src, subfolder="text_encoder", dtype=self.dtype, **hub)
            self.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                src, subfolder="text_encoder_2", dtype=self.dtype, **hub)
            # fp32 VAE always: SDXL's VAE overflows in fp16, and fp32 latents are the same
            # whatever train.mixed_precision says, so the latent cache stays valid across it.
            self.vae = AutoencoderKL.from_pretrained(
                src, subfolder="vae", torch_dtype=torch.float32, **hub)
            self.unet = UNet2DConditionModel.from_pretrained(
                src, subfolder="unet", torch_dtype=self._unet_dtype(), **hub)
            # Training noise math needs only the beta schedule, which DDPM reads from the
            # folder's (Euler) config; sampling uses the folder's own scheduler class, as
            # the stock pipeline's from_pretrained does.
            self.noise_scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler", **hub)
            self.prediction_type = self._prediction_type()
            sampler = self.pipeline_config.get("scheduler", [None, "EulerDiscreteScheduler"])[1]
            self.sample_scheduler = getattr(diffusers, sampler).from_pretrained(
                src, subfolder="scheduler", prediction_type=self.prediction_type, **hub)
        except (OSError, HFValidationError) as err:
            raise self._load_error(err) from None
        self._place_and_freeze()

    def _unet_dtype(self) -> torch.dtype:
        """Frozen base in the weight dtype; a fully trained UNet in its trainable dtype."""
        return self._trainable_dtype() if self.cfg.model.model_type == "full" else self.dtype

    def _prediction_type(self) -> str:
        """The training target: model.prediction_type, or the scheduler config's for auto."""
        native = self.noise_scheduler.config.prediction_type
        wanted = self.cfg.model.prediction_type
        if wanted == "auto":
            return native
        if wanted != native:
            self.log.warning("prediction_type_override", trained=wanted, model_scheduler=native,
                             note="validation samples with the trained type; the stock pipeline "
                                  "needs its scheduler's prediction_type set the same way")
        return wanted

    def _place_and_freeze(self) -> None:
        full = self.cfg.model.model_type == "full"
        for module in (self.text_encoder, self.text_encoder_2, self.vae):
            module.requires_grad_(False).eval().to(self.device)
        self.unet.requires_grad_(full).train().to(self.device)
        self._enable_checkpointing()
        if len(self.tokenizer) < 10 or len(self.tokenizer_2) < 10:
            raise ConfigError(f"the tokenizers of {self.source!r} are empty or missing",
                              "point model.pretrained_model_name_or_path at a complete SDXL "
                              "folder (tokenizer/ and tokenizer_2/ included)")

    def _load_error(self, err: Exception) -> ConfigError:
        """Which model could not be loaded, and where to put it."""
        m = self.cfg.model
        key = self._weights_setting()
        folder = Path(self.source).expanduser()
        if folder.is_absolute() or self.source.startswith((".", "~")) or folder.exists():
            # A path, not a hub id: downloading cannot help, and the hub's text says little.
            what = ("does not exist" if not folder.exists() else "has no model_index.json"
                    if not (folder / "model_index.json").is_file() else "is incomplete")
            return ConfigError(
                f"cannot load SDXL weights from the local folder {self.source!r} (from {key}): "
                f"it {what}", "mount the volume that holds the weights or fix the path; the "
                "folder needs the diffusers layout (model_index.json, unet/, vae/, "
                "text_encoder/, tokenizer/, ...) that save_pretrained writes")
        offline = self._hub_kwargs()["local_files_only"]
        detail = error_detail(err)
        return ConfigError(
            f"cannot load SDXL weights {self.source!r} (from {key}, revision "
            f"{m.revision or 'main'}){' with HF_HUB_OFFLINE=1' if offline else ''}: {detail}",
            f"put the weights under model.hub_cache_dir ({m.hub_cache_dir}), e.g. "
            f"`HF_HOME={m.hub_cache_dir} hf download {self.source}`, "
            + ("or unset HF_HUB_OFFLINE to download them, " if offline else "")
            + "or set model.pretrained_model_name_or_path to a local folder in the diffusers "
            "layout")

    def denoiser(self) -> nn.Module:
        """The UNet (trained)."""
        return self.unet

    def text_encoders(self) -> tuple[nn.Module, nn.Module]:
        return self.text_encoder, self.text_encoder_2

    def fingerprint(self, part: str) -> dict[str, Any]:
        """What changes the cached text embeddings (`text`) or latents (`latent`)."""
        base = {"family": self.name, "model": self.source, "revision": self.revision}
        if part == "text":
            return {**base, "text_encoder": config_hash(self.text_encoder.config),
                    "text_encoder_2": config_hash(self.text_encoder_2.config),
                    "tokenizer": tokenizer_hash(self.tokenizer),
                    "tokenizer_2": tokenizer_hash(self.tokenizer_2),
                    "max_length": self.tokenizer.model_max_length, "layer": "penultimate",
                    "dtype": str(self.dtype), "empty_prompt": self._empty_prompt_mode()}
        if part == "latent":
            return {**base, "vae": config_hash(self.vae.config),
                    "scaling_factor": self.vae.config.scaling_factor, "vae_dtype": "float32",
                    "latent": "posterior_mean"}
        raise ValueError(f"unknown fingerprint part {part!r}; expected 'text' or 'latent'")

    # -- encoding ---------------------------------------------------------------------

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        """Per caption, prompt_embeds [77, te1+te2 hidden] and pooled_prompt_embeds (CPU)."""
        hidden = []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder),
                                   (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            output = encoder(ids.to(encoder.device), output_hidden_states=True)
            # SDXL conditions on the penultimate layer of both encoders, side by side.
            hidden.append(output.hidden_states[-2])
        embeds = torch.cat(hidden, dim=-1).to(self.text_encoder_2.dtype).cpu()
        pooled = output.text_embeds.cpu()  # text_encoder_2's projected pooled output
        return [{"prompt_embeds": e.clone(), "pooled_prompt_embeds": p.clone()}
                for e, p in zip(embeds, pooled)]

    def _empty_prompt_mode(self) -> str:
        # SDXL's pipeline defaults to zeros when model_index.json does not say.
        zeros = self.pipeline_config.get("force_zeros_for_empty_prompt", True)
        return "zeros" if zeros else "encoded"

    def empty_text(self) -> dict[str, torch.Tensor]:
        """What the stock pipeline feeds the unconditional branch when no negative prompt."""
        encoded = self.encode_text([""])[0]
        if self._empty_prompt_mode() == "zeros":
            return {k: torch.zeros_like(v) for k, v in encoded.items()}
        return encoded

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, 4, H/8, W/8] (CPU) of pixels in [-1, 1]."""
        # The posterior mean, not a sample: a sample drawn once at cache time is a frozen
        # perturbation (no augmentation), would depend on batch order and cache resumes,
        # and SDXL's posterior std is tiny next to the latent scale. The mean depends on
        # the image alone.
        posterior = self.vae.encode(pixels.to(self.vae.device, torch.float32)).latent_dist
        return (posterior.mode() * self.vae.config.scaling_factor).cpu()

    def image_conditioning(self, image: PreparedImage) -> dict[str, torch.Tensor]:
        """SDXL micro-conditioning: original size, crop top-left, target size (h, w order)."""
        ids = (*image.original_size, *image.crop_top_left, *image.target_size)
        return {"time_ids": torch.tensor(ids, dtype=torch.float32)}

    def unload_encoders(self) -> None:
        """Move both text encoders to the CPU; sample() brings them back while it runs.

        The VAE stays on the device: its decoder is needed for every validation image and
        it is about 1% of the UNet's memory.
        """
        self.text_encoder.to("cpu")
        self.text_encoder_2.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.log.info("encoders_unloaded", moved=["text_encoder", "text_encoder_2"], to="cpu")

    # -- training ---------------------------------------------------------------------

    def add_lora(self) -> None:
        """A peft LoRA on the UNet's [lora] target modules; only it is trainable."""
        self.lora_config = self._new_lora_config()
        self.unet.requires_grad_(False)
        self.unet.add_adapter(self.lora_config)
        # The adapter is created in the base weights' dtype (bf16 under mixed precision);
        # updates that small need fp32 master weights unless adamw_bf16 compensates.
        for param in self.unet.parameters():
            if param.requires_grad:
                param.data = param.data.to(self._trainable_dtype())

    def _losses(self, batch: dict[str, torch.Tensor], timesteps: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
        """Per-sample MSE (fp32) between the UNet's prediction and the target."""
        latents = batch["latents"].float()
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        prediction = self.denoise(noisy, timesteps, batch)
        error = F.mse_loss(prediction.float(), target.float(), reduction="none")
        return error.mean(dim=tuple(range(1, error.ndim)))

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor,
                batch: dict[str, torch.Tensor],
                timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's prediction (of self.prediction_type) with SDXL's added conditioning;
        `timestep_cond` feeds a UNet with a guidance embedding (time_cond_proj_dim)."""
        with self._autocast():
            return self.unet(
                noisy, timesteps, timestep_cond=timestep_cond,
                encoder_hidden_states=batch["text.prompt_embeds"],
                added_cond_kwargs={"text_embeds": batch["text.pooled_prompt_embeds"],
                                   "time_ids": batch["cond.time_ids"]}).sample

    def unconditional_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch as LCM's unconditional teacher branch: zero prompt and pooled embeddings,
        the same micro-conditioning (time ids describe the image, not the prompt)."""
        out = dict(batch)
        for key in ("text.prompt_embeds", "text.pooled_prompt_embeds"):
            out[key] = torch.zeros_like(batch[key])
        return out

    def ddpm_schedule(self) -> tuple[torch.Tensor, str]:
        """alphas_cumprod [num_train_timesteps] (fp32, CPU) and the trained prediction type."""
        return self.noise_scheduler.alphas_cumprod.float().clone(), self.prediction_type

    @contextmanager
    def teacher(self) -> Iterator[None]:
        """The frozen teacher for the block, sampled with the model's own scheduler: the UNet
        with its LoRA adapters disabled, or the frozen original beside a full student."""
        self._as_teacher = True
        try:
            if self.lora_config is not None:
                self.unet.disable_adapters()
                try:
                    yield
                finally:
                    # Enabling restores requires_grad on the adapters disabling turned off.
                    self.unet.enable_adapters()
            elif self.teacher_unet is not None:
                with self.swapped_denoiser(self.teacher_unet):
                    yield
            else:
                raise RuntimeError("teacher() needs a student: a LoRA, or a full student from "
                                   "make_consistency_student()")
        finally:
            self._as_teacher = False

    def make_consistency_student(self, time_cond_dim: int) -> None:
        """A full LCM student: a copy of the UNet that also takes the guidance w through a
        `time_cond_proj_dim` embedding (as LCM-SDXL does). The original stays, frozen in the
        weight dtype, as the teacher. The new projection starts at zero, so the student
        starts as exactly the teacher evaluated without guidance."""
        import copy

        from diffusers.models.embeddings import TimestepEmbedding

        if self.cfg.model.model_type != "full" or self.lora_config is not None:
            raise RuntimeError("a full consistency student needs model.model_type = 'full'")
        teacher = self.unet
        student = copy.deepcopy(teacher)
        if teacher.config.time_cond_proj_dim is None:
            embedding: TimestepEmbedding = student.time_embedding
            embedding.cond_proj = nn.Linear(time_cond_dim, embedding.linear_1.in_features,
                                            bias=False)
            nn.init.zeros_(embedding.cond_proj.weight)
            student.register_to_config(time_cond_proj_dim=time_cond_dim)
        student.to(self.device, self._trainable_dtype()).train().requires_grad_(True)
        teacher.requires_grad_(False).eval().to(self.dtype)
        self.teacher_unet, self.unet = teacher, student
        if self._pipeline is not None:
            self._pipeline.unet = student
        self.log.info("consistency_student", kind="full",
                      time_cond_proj_dim=student.config.time_cond_proj_dim,
                      teacher_dtype=str(self.dtype), student_dtype=str(self._trainable_dtype()))

    def training_loss(self, batch: dict[str, torch.Tensor],
                      generator: torch.Generator) -> torch.Tensor:
        """Per-sample loss [B] at random timesteps, Min-SNR weighted when snr_gamma is set."""
        latents = batch["latents"]
        # Drawn on the CPU generator and then moved, so CPU and GPU runs see the same draws;
        # drawn for the global batch and sliced per rank (job/train/distributed.py).
        noise = distributed.randn(latents.shape, generator, device=latents.device)
        timesteps = distributed.randint(0, self.noise_scheduler.config.num_train_timesteps,
                                        latents.shape[0], generator, device=latents.device)
        losses = self._losses(batch, timesteps, noise)
        gamma = self.cfg.train.snr_gamma
        if gamma is not None:
            losses = losses * min_snr_weights(self.noise_scheduler.alphas_cumprod, timesteps,
                                              gamma, self.prediction_type)
        return losses

    def eval_loss(self, batch: dict[str, torch.Tensor], timesteps: torch.Tensor,
                  noise: torch.Tensor) -> torch.Tensor:
        """Per-sample unweighted loss [B] at the given timesteps and noise."""
        device = batch["latents"].device
        return self._losses(batch, timesteps.to(device), noise.to(device, torch.float32))
