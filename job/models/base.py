"""The family protocol: everything family-specific goes through these methods.

The training loop, the caches and validation know nothing of a family's math; they
call a `Family`. A batch is a dict of stacked tensors built by job/data/batches.py
from cached samples:

    latents                 [B, C, h, w]   scaled VAE latents (the family's scaling)
    text.<name>             [B, ...]       the family's text tensors (encode_text keys)
    cond.<name>             [B, ...]       per-image conditioning (image_conditioning keys)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ContextManager, Protocol

import torch
from torch import nn

from job.config import JobConfig


class PreparedImage(Protocol):
    """What the data layer hands the family for one image (job/data/transforms.py)."""

    pixels: torch.Tensor  # [3, H, W] in [-1, 1]
    original_size: tuple[int, int]  # (height, width) before any resize
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image
    target_size: tuple[int, int]  # (height, width) of the bucket


class Family(Protocol):
    """A model family: loading, encoding, loss, sampling and export."""

    name: str
    supports_lcm: bool

    def __init__(self, cfg: JobConfig, device: torch.device, dtype: torch.dtype) -> None: ...

    def load(self) -> None:
        """Load every component from the hub id or local path (HF_HUB_OFFLINE honoured)."""

    def denoiser(self) -> nn.Module:
        """The module that is trained (UNet or transformer)."""

    def fingerprint(self, part: str) -> dict[str, Any]:
        """Identity of `text` or `latent` encoding: anything that changes the output."""

    def encode_text(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        """Per caption, the text tensors the denoiser takes (on CPU)."""

    def empty_text(self) -> dict[str, torch.Tensor]:
        """What the stock pipeline feeds for an empty prompt (caption dropout)."""

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, C, h, w] (on CPU) of pixels [B, 3, H, W] in [-1, 1]."""

    def image_conditioning(self, image: PreparedImage) -> dict[str, torch.Tensor]:
        """Per-image conditioning stored beside the latent (e.g. SDXL time ids)."""

    def unload_encoders(self) -> None:
        """Free the text encoders and VAE encoder that training no longer needs."""

    def add_lora(self) -> None:
        """Inject the [lora] adapter into the denoiser; only it stays trainable."""

    def training_loss(self, batch: dict[str, torch.Tensor],
                      generator: torch.Generator) -> torch.Tensor:
        """Per-sample loss [B] with noise and timesteps drawn from `generator`."""

    def eval_loss(self, batch: dict[str, torch.Tensor], timesteps: torch.Tensor,
                  noise: torch.Tensor) -> torch.Tensor:
        """Per-sample loss [B] at the given timesteps and noise (no grad by the caller)."""

    # LCM distillation (job/distill/lcm.py) needs these from families with supports_lcm.

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor,
                batch: dict[str, torch.Tensor],
                timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        """The denoiser's raw prediction (of the trained prediction type), under autocast;
        `timestep_cond` is a guidance embedding for a denoiser that takes one."""

    def unconditional_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch as the unconditional branch of the guided teacher."""

    def ddpm_schedule(self) -> tuple[torch.Tensor, str]:
        """alphas_cumprod [num_train_timesteps] (fp32, CPU) and the prediction type."""

    def teacher(self) -> ContextManager[None]:
        """For the block, the frozen teacher: the denoiser without its LoRA (or the frozen
        original beside a full student), sampled with the model's own scheduler."""

    def make_consistency_student(self, time_cond_dim: int) -> None:
        """Replace the trainable denoiser by a full copy that takes a guidance embedding of
        width `time_cond_dim`; keep the original, frozen, as the teacher."""

    def sample(self, prompt: str, negative_prompt: str, width: int, height: int,
               guidance: float, steps: int, seed: int) -> Any:
        """One PIL image from the family's stock diffusers pipeline around the live weights."""

    def swapped_denoiser(self, module: nn.Module) -> ContextManager[None]:
        """For the block, `module` in the denoiser's place (training calls, sampling and
        export): the LCM teacher and target, an FSDP2 run's unsharded export copy."""

    def save_final(self, out_dir: Path) -> list[Path]:
        """Write the final weights (diffusers LoRA file or full weights); return the paths."""

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights, for checkpoints (adapter only for LoRA)."""

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Put checkpointed trained weights back."""

    # Optional features, present where the family's registry spec lists them (features).

    def quantisation_targets(self) -> dict[str, tuple[nn.Module, Callable[[nn.Module, str], bool]]]:
        """"quantisation": [speedups] precision key -> (frozen module, which of its layers
        may be quantised), for job/speedups/quantize.py."""

    # "sageattention": an attention processor that sample() swaps in (None: the default).
    sampling_attention: Any
