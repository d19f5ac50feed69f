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


def family_class(name: str) -> type:
    """Import and return the family class (this imports torch)."""
    spec = spec_for(name)
    module = importlib.import_module(spec.module)
    return getattr(module, spec.class_name)
