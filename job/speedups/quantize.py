"""Weight quantisation of frozen components ([speedups] *_precision).

Presets: int8-torchao (weight-only int8; the tested path, CPU and GPU), fp8-torchao
(weight-only fp8, GPUs with fp8: compute capability 8.9+), and the optimum-quanto presets
of the source documents (int8/int4/int2/fp8-quanto, extra `tunejob[quanto]`). Only frozen
weights are quantised; a LoRA added afterwards trains in its own dtype on top (peft wraps
torchao and quanto linears) and is exported as plain tensors.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from job.config import SpeedupsTable
from job.errors import ConfigError
from job.log import get_logger

PRECISION_KEYS = ("base_model_precision", "text_encoder_1_precision", "text_encoder_2_precision",
                  "text_encoder_3_precision")
TESTED_PRESET = "int8-torchao"


def apply_quantization(family, settings: SpeedupsTable) -> list[str]:
    """Quantise the components the settings name; returns the keys that were applied."""
    wanted = {k: getattr(settings, k) for k in PRECISION_KEYS if getattr(settings, k) != "no_change"}
    if not wanted:
        return []
    for key, preset in wanted.items():
        check_preset(key, preset, family.device)
    targets = family.quantisation_targets()
    done = []
    for key, preset in wanted.items():
        if key not in targets:
            # e.g. text_encoder_3_precision on a family with two text encoders.
            get_logger().warning("setting_ignored", key=f"speedups.{key}", value=preset,
                                 reason=f"family {family.name!r} has no such component")
            continue
        module, may_quantise = targets[key]
        count = quantise(module, preset, may_quantise)
        get_logger().info("speedup_active", speedup="quantisation", component=key,
                          preset=preset, layers=count)
        done.append(key)
    return done


def check_preset(key: str, preset: str, device: torch.device) -> None:
    """The hardware and package the preset needs, or exit 2 naming what to use instead."""
    where = f'speedups.{key} = "{preset}"'
    if preset.startswith("fp8"):
        capability = torch.cuda.get_device_capability() if device.type == "cuda" else None
        if capability is None or capability < (8, 9):
            seen = f"a GPU of compute capability {capability}" if capability else "no CUDA GPU"
            raise ConfigError(f"{where} needs a GPU with fp8 (compute capability 8.9+: Ada, "
                              f"Hopper, Blackwell), and this job runs on {seen}",
                              f'use {key} = "{TESTED_PRESET}"')
    if preset.endswith("-torchao") and not _importable("torchao"):
        raise ConfigError(f"{where} needs the torchao package, which is not installed",
                          "install the extra: pip install 'tunejob[torchao]'")
    if preset.endswith("-quanto") and not _importable("optimum.quanto"):
        raise ConfigError(f"{where} needs optimum-quanto, which is not installed",
                          f'use {key} = "{TESTED_PRESET}" (the tested path), or install the '
                          "extra: pip install 'tunejob[quanto]'")


def quantise(module: nn.Module, preset: str,
             may_quantise: Callable[[nn.Module, str], bool]) -> int:
    """Quantise the weights of `module`'s layers that `may_quantise(layer, name)` accepts;
    returns how many layers were quantised."""
    names = [n for n, m in module.named_modules() if n and may_quantise(m, n)]
    if preset.endswith("-torchao"):
        from torchao.quantization import (Float8WeightOnlyConfig, Int8WeightOnlyConfig,
                                          quantize_)

        config = Int8WeightOnlyConfig() if preset.startswith("int8") else Float8WeightOnlyConfig()
        chosen = set(names)
        quantize_(module, config, filter_fn=lambda m, fqn: fqn in chosen)
    else:
        from optimum.quanto import freeze, qfloat8, qint2, qint4, qint8, quantize

        weights = {"int8": qint8, "int4": qint4, "int2": qint2, "fp8": qfloat8}[
            preset.split("-")[0]]
        quantize(module, weights=weights, include=names)
        freeze(module)
    return len(names)


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True
