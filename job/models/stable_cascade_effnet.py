"""The EfficientNet encoder whose features Stage C is trained to generate.

As in the Stable Cascade release: torchvision's efficientnet_v2_s `features`, then a 1x1
Conv2d(1280, 16, bias=False) and a BatchNorm2d(16, affine=False), in eval mode, loaded
from the release's `effnet_encoder.safetensors` (keys `backbone.*` and `mapper.*`). A
randomly initialised mapper gives latents the Stage B decoder has never seen, so there is
no fallback: without the file, caching is refused (exit 2 naming it).

The input is the bucket image in [0, 1], resized to (ceil(H/42.67)*32, ceil(W/42.67)*32)
and ImageNet-normalised: the backbone downsamples 32x, so the latent grid is
(ceil(H/42.67), ceil(W/42.67)), the grid StableCascadePriorPipeline samples at (H, W)
(its resolution_multiple), with no interpolation of latents.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from job.errors import ConfigError

EFFNET_FILE = "effnet_encoder.safetensors"
LATENT_CHANNELS = 16
BACKBONE_CHANNELS = 1280
# StableCascadePriorPipeline's resolution_multiple: pixels of the image per latent cell.
RESOLUTION_MULTIPLE = 42.67
BACKBONE_STRIDE = 32
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def latent_grid(height: int, width: int) -> tuple[int, int]:
    """The prior's latent (rows, columns) for an image of (height, width) pixels."""
    return math.ceil(height / RESOLUTION_MULTIPLE), math.ceil(width / RESOLUTION_MULTIPLE)


def effnet_input_size(height: int, width: int) -> tuple[int, int]:
    """(ceil(H/42.67)*32, ceil(W/42.67)*32): 768x768 for 1024x1024, 672x864 for 896x1152."""
    rows, columns = latent_grid(height, width)
    return rows * BACKBONE_STRIDE, columns * BACKBONE_STRIDE


def released_backbone() -> nn.Module:
    """torchvision efficientnet_v2_s features (20M parameters), untrained: the weights
    come from the release's file."""
    from torchvision.models import efficientnet_v2_s

    return efficientnet_v2_s(weights=None).features


def tiny_backbone() -> nn.Module:
    """The same torchvision blocks (fused and plain MBConv, batch norm eps 1e-3) at toy
    widths and depths, with the released 32x stride and 1280 output channels."""
    from functools import partial

    from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig, MBConvConfig

    settings = [FusedMBConvConfig(1, 3, 1, 8, 8, 1), FusedMBConvConfig(2, 3, 2, 8, 16, 1),
                FusedMBConvConfig(2, 3, 2, 16, 16, 1), MBConvConfig(2, 3, 2, 16, 24, 1),
                MBConvConfig(2, 3, 2, 24, 32, 1)]
    return EfficientNet(settings, dropout=0.0, norm_layer=partial(nn.BatchNorm2d, eps=1e-3),
                        last_channel=BACKBONE_CHANNELS).features


class EfficientNetEncoder(nn.Module):
    """backbone -> mapper: [B, 3, 32h, 32w] normalised pixels -> [B, 16, h, w] latents."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.mapper = nn.Sequential(
            nn.Conv2d(BACKBONE_CHANNELS, LATENT_CHANNELS, kernel_size=1, bias=False),
            nn.BatchNorm2d(LATENT_CHANNELS, affine=False))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.mapper(self.backbone(images))

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents [B, 16, h, w] of bucket pixels [B, 3, H, W] in [-1, 1] (fp32)."""
        weight = self.mapper[0].weight
        images = (pixels.to(weight.device, torch.float32) + 1) / 2
        size = effnet_input_size(*images.shape[-2:])
        if tuple(images.shape[-2:]) != size:
            # Antialiased: the resize is always a downscale by about 3/4.
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False,
                                   antialias=True)
        mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return self((images - mean) / std)


def load_effnet(path: Path, tiny: bool, where: str) -> EfficientNetEncoder:
    """The encoder with the released weights from `path`, frozen and in eval mode; exit 2
    naming the file (and the setting `where` it came from) when it is missing or does not
    fit."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise ConfigError(
            f"{EFFNET_FILE} not found at {path} (from {where}): Stage C latents need the "
            "released EfficientNet encoder weights, and a randomly initialised encoder would "
            "give latents the Stage B decoder cannot decode",
            f"download it, e.g. `HF_HOME=/data/models hf download stabilityai/stable-cascade "
            f"{EFFNET_FILE}`, or set stable_cascade.effnet_encoder_path to the file")
    encoder = EfficientNetEncoder(tiny_backbone() if tiny else released_backbone())
    state = load_file(str(path))
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ConfigError(f"{path} (from {where}) is not an effnet_encoder.safetensors of the "
                          f"Stable Cascade release: {str(err).splitlines()[0]}",
                          "use the release's file (keys backbone.* and mapper.*)") from None
    return encoder.requires_grad_(False).eval()
