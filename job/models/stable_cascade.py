"""Stable Cascade Stage C: the text-to-image prior over EfficientNet latents.

Latents come from the release's EfficientNet encoder (job/models/stable_cascade_effnet.py),
conditioning follows StableCascadePriorPipeline.encode_prompt, the diffusion math lives in
job/models/stable_cascade_diffusion.py, sampling and export in stable_cascade_output.py.
StableCascadeUNet has no diffusers adapter mixin, so the LoRA is injected with peft.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from job.config import JobConfig
from job.errors import ConfigError
from job.log import get_logger
from job.models import stable_cascade_diffusion as diffusion
from job.models.base import PreparedImage
from job.models.common import (FamilyCommon, config_hash, error_detail, tokenizer_hash,
                               weights_source)
from job.models.stable_cascade_effnet import EFFNET_FILE, load_effnet
from job.models.stable_cascade_output import StableCascadeSamplingExport
from job.train import distributed

PRIOR_SUBFOLDERS = {"stage-c": "prior", "stage-c-lite": "prior_lite", "tiny": "prior"}
RELEASED_DECODER = "stabilityai/stable-cascade"
# The prompt cache is fp16: CLIP-G's 77 x 1280 hidden states and its pooled 1280, 195 KiB.
TEXT_CACHE_DTYPE = torch.float16
# Kept unquantised: the small input/output and conditioning maps set every token's scale.
_UNQUANTISED = ("embedding", "clf", "clip_txt_mapper", "clip_txt_pooled_mapper",
                "clip_img_mapper", "clip_norm")


def _quantisable_prior_layer(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.Linear) and not name.startswith(_UNQUANTISED)


def _any_linear(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.Linear)


class TrainingObjective:
    """family.training_loss as an object, so the trainer checkpoints the adaptive loss
    weight's state beside the weights (objective.safetensors); empty for P2."""

    def __init__(self, family: "StableCascadeFamily") -> None:
        self.family = family

    def __call__(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        return self.family.weighted_training_loss(batch, generator)

    def state_dict(self) -> dict[str, torch.Tensor]:
        adaptive = self.family.adaptive_weight
        return adaptive.state_dict() if adaptive is not None else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.family.adaptive_weight.load_state_dict(state)

    def state_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.state_dict().values())


class StableCascadeFamily(FamilyCommon, StableCascadeSamplingExport):
    """Stage C through diffusers' StableCascadePriorPipeline components."""

    name = "stable_cascade"
    supports_lcm = False
    denoiser_attribute = "prior"

    def __init__(self, cfg: JobConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        self.settings = cfg.stable_cascade
        self.source, self.tiny_folder = weights_source(cfg)
        self.flavour = cfg.model.flavour or "stage-c"
        self.subfolder = PRIOR_SUBFOLDERS[self.flavour]
        self.revision = cfg.model.revision
        self.log = get_logger()
        self.lora_config = None
        self.effnet = None
        self._pipeline = None
        self._decoder_pipeline = None
        self._prompt_cache: dict[str, dict[str, torch.Tensor]] = {}
        self.adaptive_weight = (diffusion.AdaptiveLossWeight()
                                if self.settings.loss_weighting == "adaptive" else None)
        self.training_loss = TrainingObjective(self)

    @classmethod
    def around(cls, cfg: JobConfig, prior: nn.Module, device: torch.device,
               dtype: torch.dtype) -> "StableCascadeFamily":
        """The training math around a given prior, without encoders (bench/stage_c_step.py)."""
        family = cls(cfg, device, dtype)
        family.prior = prior
        return family

    # -- loading ----------------------------------------------------------------------

    def decoder_source(self) -> str:
        """The decoder pipeline's hub id or folder (the tiny flavour's own in place of the
        released one)."""
        s = self.settings
        if self.tiny_folder is not None and s.decoder_model_name_or_path == RELEASED_DECODER:
            from job.models.stable_cascade_tiny import ensure_tiny_decoder

            return str(ensure_tiny_decoder(self.tiny_folder.with_name("stable_cascade_decoder")))
        return s.decoder_model_name_or_path

    def load(self) -> None:
        """Tokenizer, CLIP-G, the prior and its scheduler, frozen and on the device; the
        EfficientNet encoder is loaded when latents are first encoded."""
        from diffusers import DDPMWuerstchenScheduler, StableCascadeUNet
        from huggingface_hub.utils import HFValidationError
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        if self.tiny_folder is not None:
            from job.models.stable_cascade_tiny import ensure_tiny_prior

            ensure_tiny_prior(self.tiny_folder)
        hub, src = self._hub_kwargs(), self.source
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **hub)
            self.text_encoder = CLIPTextModelWithProjection.from_pretrained(
                src, subfolder="text_encoder", dtype=self.dtype, **hub)
            self.prior = StableCascadeUNet.from_pretrained(
                src, subfolder=self.subfolder, torch_dtype=self._base_dtype(), **hub)
            self.scheduler = DDPMWuerstchenScheduler.from_pretrained(
                src, subfolder="scheduler", **hub)
        except (OSError, HFValidationError) as err:
            raise self._load_error(err) from None
        full = self.cfg.model.model_type == "full"
        self.text_encoder.requires_grad_(False).eval().to(self.device)
        self.prior.requires_grad_(full).train().to(self.device)
        self._enable_checkpointing()

    def _load_error(self, err: Exception) -> ConfigError:
        m = self.cfg.model
        key = self._weights_setting()
        detail = error_detail(err)
        return ConfigError(
            f"cannot load the Stage C prior {self.source!r} (subfolder {self.subfolder}, from "
            f"{key}, revision {m.revision or 'main'}): {detail}",
            f"put the weights under model.hub_cache_dir ({m.hub_cache_dir}), e.g. "
            f"`HF_HOME={m.hub_cache_dir} hf download {self.source}`, or set "
            "model.pretrained_model_name_or_path to a local StableCascadePriorPipeline folder")

    def effnet_path(self) -> tuple[Path, str]:
        """Where effnet_encoder.safetensors is, and the setting that says so."""
        if self.settings.effnet_encoder_path:
            return Path(self.settings.effnet_encoder_path), "stable_cascade.effnet_encoder_path"
        source, where = self.decoder_source(), "stable_cascade.decoder_model_name_or_path"
        if Path(source).is_dir():
            return Path(source) / EFFNET_FILE, where
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        hub = self._hub_kwargs()
        try:
            return Path(hf_hub_download(source, EFFNET_FILE, revision=None,
                                        cache_dir=hub["cache_dir"],
                                        local_files_only=hub["local_files_only"])), where
        except (EntryNotFoundError, LocalEntryNotFoundError, OSError, ValueError):
            return Path(hub["cache_dir"]) / source / EFFNET_FILE, where

    def _ensure_effnet(self) -> None:
        if self.effnet is None:
            path, where = self.effnet_path()
            self.effnet = load_effnet(path, self.tiny_folder is not None, where).to(self.device)
            self.log.info("effnet_loaded", path=str(path))

    def denoiser(self) -> nn.Module:
        return self.prior

    def quantisation_targets(self) -> dict[str, tuple[nn.Module, Callable[[nn.Module, str], bool]]]:
        return {"base_model_precision": (self.prior, _quantisable_prior_layer),
                "text_encoder_1_precision": (self.text_encoder, _any_linear)}

    def fingerprint(self, part: str) -> dict[str, Any]:
        """What changes the cached text embeddings (`text`) or latents (`latent`)."""
        base = {"family": self.name, "revision": self.revision}
        if part == "text":
            return {**base, "model": self.source, "text_encoder": config_hash(self.text_encoder.config),
                    "tokenizer": tokenizer_hash(self.tokenizer), "layer": "last_hidden_state",
                    "attention_mask": True, "cache_dtype": str(TEXT_CACHE_DTYPE),
                    "precision": self.cfg.speedups.text_encoder_1_precision,
                    "dtype": str(self.dtype)}
        if part == "latent":
            path, _ = self.effnet_path()
            stat = path.stat() if path.is_file() else None
            return {**base, "effnet": str(path), "effnet_size": stat.st_size if stat else None,
                    "effnet_mtime": stat.st_mtime_ns if stat else None,
                    "resize": "ceil(side/42.67)*32 bilinear antialias", "normalise": "imagenet"}
        raise ValueError(f"unknown fingerprint part {part!r}; expected 'text' or 'latent'")

    # -- encoding ---------------------------------------------------------------------

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        """Per caption, prompt_embeds [77, width] (CLIP-G's last hidden state, before the
        final layer norm, with the attention mask) and prompt_embeds_pooled [1, projection]
        (text_embeds as one token), as encode_prompt; fp16 on the CPU."""
        tokens = self.tokenizer(captions, padding="max_length", truncation=True,
                                max_length=self.tokenizer.model_max_length, return_tensors="pt")
        device = self.text_encoder.device
        output = self.text_encoder(tokens.input_ids.to(device),
                                   attention_mask=tokens.attention_mask.to(device),
                                   output_hidden_states=True)
        embeds = output.hidden_states[-1].to(TEXT_CACHE_DTYPE).cpu()
        pooled = output.text_embeds.unsqueeze(1).to(TEXT_CACHE_DTYPE).cpu()
        return [{"prompt_embeds": e.clone(), "prompt_embeds_pooled": p.clone()}
                for e, p in zip(embeds, pooled)]

    def text_entry_bytes(self) -> int:
        """Bytes of one cached prompt (tensor data; the file adds a small header)."""
        config = self.text_encoder.config
        width, length = config.hidden_size, self.tokenizer.model_max_length
        return (length * width + config.projection_dim) * TEXT_CACHE_DTYPE.itemsize

    def empty_text(self) -> dict[str, torch.Tensor]:
        """The encoded empty prompt: the pipeline's unconditional input without a negative."""
        return self.encode_text([""])[0]

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """EfficientNet latents [B, 16, ceil(H/42.67), ceil(W/42.67)] (fp32, CPU)."""
        self._ensure_effnet()
        return self.effnet.encode(pixels).cpu()

    def image_conditioning(self, image: PreparedImage) -> dict[str, torch.Tensor]:
        return {}

    def unload_encoders(self) -> None:
        """CLIP-G and the EfficientNet to the CPU; sample() brings CLIP-G back."""
        self.text_encoder.to("cpu")
        if self.effnet is not None:
            self.effnet.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.log.info("encoders_unloaded", moved=["text_encoder", "effnet"], to="cpu")

    def text_encoders(self) -> tuple[nn.Module]:
        return (self.text_encoder,)

    # -- training ---------------------------------------------------------------------

    def add_lora(self) -> None:
        """peft injection on the prior's [lora] target modules; only it is trainable."""
        from peft import inject_adapter_in_model

        self.lora_config = self._new_lora_config()
        self.prior.requires_grad_(False)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*get_apply_tensor_subclass.*")
            inject_adapter_in_model(self.lora_config, self.prior, adapter_name="default")
        for name, param in self.prior.named_parameters():
            if "lora_" in name:
                param.requires_grad_(True)
                param.data = param.data.to(self._trainable_dtype())

    def weighted_training_loss(self, batch: dict[str, torch.Tensor],
                               generator: torch.Generator) -> torch.Tensor:
        """Per-sample loss [B]: t ~ U(0, 1), then noise, drawn from `generator` on the CPU
        for the global batch, weighted by P2 or the adaptive weight."""
        latents = batch["latents"]
        t = distributed.rand(latents.shape[0], generator)  # stays on the CPU for the weights
        noise = distributed.randn(latents.shape, generator, device=latents.device)
        losses = self._losses(batch, distributed.to_device(t, latents.device), noise)
        if self.adaptive_weight is None:
            weights = diffusion.p2_weight(t)
        else:
            weights = self.adaptive_weight.weight(t)
            all_t, all_losses = _gathered(t, losses.detach().float())
            self.adaptive_weight.update(all_t, all_losses)
        return losses * distributed.to_device(weights, losses.device)

    def eval_loss(self, batch: dict[str, torch.Tensor], timesteps: torch.Tensor,
                  noise: torch.Tensor) -> torch.Tensor:
        """Unweighted loss [B] at t = timestep / 1000."""
        device = batch["latents"].device
        t = timesteps.to(device, torch.float32) / 1000
        return self._losses(batch, t, noise.to(device, torch.float32))

    def _losses(self, batch: dict[str, torch.Tensor], t: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
        """Per-sample MSE (fp32) between predicted and true noise."""
        latents = batch["latents"].float()
        noisy = diffusion.noisy_latents(latents, noise, t)
        prediction = self.denoise(noisy, t, batch)
        error = F.mse_loss(prediction.float(), noise, reduction="none")
        return error.mean(dim=tuple(range(1, error.ndim)))

    def denoise(self, noisy: torch.Tensor, t: torch.Tensor,
                batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The prior's noise prediction with zero image embeddings, as the pipeline feeds a
        text-only prompt."""
        dtype = self.prior.dtype if self.dtype == torch.float32 else self.dtype
        text = batch["text.prompt_embeds"].to(dtype)
        image = torch.zeros(noisy.shape[0], 1, self.prior.config.clip_image_in_channels,
                            device=noisy.device, dtype=dtype)
        with self._autocast():
            return self.prior(sample=noisy.to(dtype), timestep_ratio=t.to(dtype),
                              clip_text_pooled=batch["text.prompt_embeds_pooled"].to(dtype),
                              clip_text=text, clip_img=image, return_dict=False)[0]

def _gathered(t: torch.Tensor, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (t, loss) in rank order, so the adaptive weight's state stays the same
    on every rank and equals a one-process run's."""
    topology = distributed.topology()
    if not topology.distributed:
        return t, losses.cpu()
    import torch.distributed as dist

    local = torch.stack([t.to(losses.device), losses])
    parts = [torch.empty_like(local) for _ in range(topology.world)]
    dist.all_gather(parts, local)
    joined = torch.cat(parts, dim=1).cpu()
    return joined[0], joined[1]
