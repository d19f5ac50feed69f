"""The family registry: names, flavours and where each family's code lives.

Torch-free on purpose: `tunejob validate` checks `model.family` and `model.flavour`
against this table without importing torch or diffusers.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FamilySpec:
    """What the config layer needs to know about a family before any import."""

    name: str
    module: str
    class_name: str
    flavours: dict[str, str | None]
    default_flavour: str
    aliases: tuple[str, ...] = ()
    # Pixel alignment of image sizes: the VAE's downsampling times the patch size.
    alignment: int = 8
    # Whether the family implements what LCM distillation needs (job/distill/lcm.py); the
    # config layer checks [distillation] against this before torch is imported.
    supports_lcm: bool = False
    # Optional abilities the config layer checks settings against: "quantisation"
    # ([speedups] *_precision), "skip_layer_guidance" and "sageattention" (validation),
    # "fp8_matmuls" ([speedups] fp8_base_matmuls: the block linears are in
    # job/speedups/float8.py's TARGETS).
    features: tuple[str, ...] = ()
    # The family's own table in the job file ([sd3]); set for another family it is ignored.
    settings_table: str | None = None
    # "module:function" of torch-free cross-field rules of the family's settings, called by
    # config.check_rules with the job; it raises ConfigError or returns warnings.
    rules: str | None = None
    notes: dict[str, str] = field(default_factory=dict)


FAMILIES: dict[str, FamilySpec] = {
    "sdxl": FamilySpec(
        name="sdxl",
        module="job.models.sdxl",
        class_name="SDXLFamily",
        flavours={
            "base-1.0": "stabilityai/stable-diffusion-xl-base-1.0",
            # Built locally from the real diffusers/transformers classes at tiny sizes.
            "tiny": None,
        },
        default_flavour="base-1.0",
        alignment=8,
        supports_lcm=True,
        features=("channels_last", "fp32_attention"),
    ),
    "sd3": FamilySpec(
        name="sd3",
        module="job.models.sd3",
        class_name="SD3Family",
        flavours={
            "large": "stabilityai/stable-diffusion-3.5-large",
            "medium": "stabilityai/stable-diffusion-3.5-medium",
            "3.0-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
            "tiny": None,
        },
        default_flavour="medium",
        # 8x VAE times 2x2 patches.
        alignment=16,
        features=("quantisation", "skip_layer_guidance", "sageattention", "fp8_matmuls", "tread"),
        settings_table="sd3",
        rules="job.models.sd3_rules:check_sd3",
    ),
    "stable_cascade": FamilySpec(
        name="stable_cascade",
        module="job.models.stable_cascade",
        class_name="StableCascadeFamily",
        # One hub repository; the flavour picks its subfolder (prior, prior_lite).
        flavours={
            "stage-c": "stabilityai/stable-cascade-prior",
            "stage-c-lite": "stabilityai/stable-cascade-prior",
            "tiny": None,
        },
        default_flavour="stage-c",
        # Any size samples (latent grid ceil(side / 42.67)); 32 keeps buckets tidy.
        alignment=32,
        # "bf16_weights_fp32_compute": adamw_bf16 with mixed_precision = "no" (bf16 LoRA
        # weights in an fp32 prior), the release's recommended Stage C setting.
        features=("quantisation", "bf16_weights_fp32_compute", "channels_last", "fp32_attention"),
        settings_table="stable_cascade",
        rules="job.models.stable_cascade_rules:check_stable_cascade",
    ),
    "kandinsky5-image": FamilySpec(
        name="kandinsky5-image",
        module="job.models.kandinsky5",
        class_name="Kandinsky5Family",
        flavours={
            "t2i-lite-sft": "kandinskylab/Kandinsky-5.0-T2I-Lite-sft-Diffusers",
            "t2i-lite-pretrain": "kandinskylab/Kandinsky-5.0-T2I-Lite-pretrain-Diffusers",
            "i2i-lite-sft": "kandinskylab/Kandinsky-5.0-I2I-Lite-sft-Diffusers",
            "i2i-lite-pretrain": "kandinskylab/Kandinsky-5.0-I2I-Lite-pretrain-Diffusers",
            "tiny": None,
            "tiny-i2i": None,
        },
        default_flavour="t2i-lite-sft",
        aliases=("kandinsky5_image",),
        # 8x Flux VAE times 2x2 patches.
        alignment=16,
        # "offload": [speedups] group offload and offload_during_startup; "tread": [tread];
        # "conditioning": [[datasets]] conditioning_data_dir (the i2i flavours).
        features=("quantisation", "offload", "tread", "conditioning", "fp8_matmuls"),
        settings_table="kandinsky5",
        rules="job.models.kandinsky5_rules:check_kandinsky5",
    ),
}


def family_names() -> list[str]:
    """Every accepted `model.family` value, aliases included."""
    names = []
    for spec in FAMILIES.values():
        names.append(spec.name)
        names.extend(spec.aliases)
    return names


def spec_for(name: str) -> FamilySpec:
    """The spec of a family by name or alias; KeyError when unknown."""
    for spec in FAMILIES.values():
        if name == spec.name or name in spec.aliases:
            return spec
    raise KeyError(name)


def family_rules(name: str):
    """The family's torch-free rule function (job -> warnings), or None."""
    spec = spec_for(name)
    if spec.rules is None:
        return None
    module, function = spec.rules.split(":")
    return getattr(importlib.import_module(module), function)


def family_class(name: str) -> type:
    """Import and return the family class (this imports torch)."""
    spec = spec_for(name)
    module = importlib.import_module(spec.module)
    return getattr(module, spec.class_name)
