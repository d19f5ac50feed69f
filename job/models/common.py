"""What every family shares: where weights come from, hashes for cache fingerprints, and
a mixin with the hub settings, dtypes, autocast, the LoRA config and the trained state."""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from job.config import JobConfig
from job.errors import ConfigError
from job.models.registry import spec_for
from job.speedups.checkpointing import enable_checkpointing

_OFFLINE_VALUES = {"1", "true", "yes", "on"}


def weights_source(cfg: JobConfig) -> tuple[str, Path | None]:
    """(hub id or folder to load from, folder to build the tiny model in or None)."""
    model = cfg.model
    if model.pretrained_model_name_or_path:
        return model.pretrained_model_name_or_path, None
    spec = spec_for(model.family)
    hub_id = spec.flavours[model.flavour or spec.default_flavour]
    if hub_id is not None:
        return hub_id, None
    folder = Path(model.hub_cache_dir) / "tunejob-tiny" / spec.name
    return str(folder), folder


def config_hash(config: Any) -> str:
    """Hash of a diffusers/transformers config, without paths and library versions."""
    items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    skip = {"transformers_version", "torch_dtype", "dtype"}
    kept = {k: v for k, v in items.items() if not k.startswith("_") and k not in skip}
    return _digest(kept)


def tokenizer_hash(tokenizer: Any) -> str:
    """Hash of everything that decides token ids: vocabulary, merges, rules, length."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else tokenizer.get_vocab()
    return _digest({"tokenizer": body, "max_length": tokenizer.model_max_length,
                    "pad": str(tokenizer.pad_token)})


def error_detail(err: Exception) -> str:
    """The first line of an exception's message (its type when it has none)."""
    return (str(err).strip() or type(err).__name__).splitlines()[0]


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class FamilyCommon:
    """Methods the families share. A family sets cfg, device, dtype, revision and
    lora_config, and its denoiser() is the trained module, the attribute named
    `denoiser_attribute` (also the component's name in its diffusers pipeline)."""

    denoiser_attribute: str

    def _hub_kwargs(self) -> dict[str, Any]:
        """Revision, cache folder, and offline mode read now (not at import time)."""
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _OFFLINE_VALUES
        return {"revision": self.revision, "local_files_only": offline,
                "cache_dir": str(Path(self.cfg.model.hub_cache_dir) / "hub")}

    def _trainable_dtype(self) -> torch.dtype:
        """fp32 master weights, except bf16 ones for the Kahan-compensated adamw_bf16."""
        return torch.bfloat16 if self.cfg.optimizer.name == "adamw_bf16" else torch.float32

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype,
                              enabled=self.dtype != torch.float32)

    @contextmanager
    def _on_device(self, modules) -> Iterator[None]:
        """`modules` on the device for the block, then back where they were (e.g. text
        encoders, which wait on the CPU after caching)."""
        homes = [(m, m.device) for m in modules]
        for module, _ in homes:
            module.to(self.device)
        try:
            yield
        finally:
            for module, home in homes:
                module.to(home)
            if self.device.type == "cuda" and any(h.type != "cuda" for _, h in homes):
                torch.cuda.empty_cache()  # what went back to CPU memory

    def _encoders_on_device(self):
        """The family's text_encoders() on the device for the block (_on_device)."""
        return self._on_device(self.text_encoders())

    @contextmanager
    def swapped_denoiser(self, module: torch.nn.Module) -> Iterator[None]:
        """`module` in the denoiser's place (training calls, sampling and export) for the
        block, in the sampling pipeline too once it exists."""
        name, pipeline = self.denoiser_attribute, getattr(self, "_pipeline", None)
        live = getattr(self, name)
        setattr(self, name, module)
        if pipeline is not None:
            setattr(pipeline, name, module)
        try:
            yield
        finally:
            setattr(self, name, live)
            if pipeline is not None:
                setattr(pipeline, name, live)

    def _enable_checkpointing(self) -> None:
        """[train] gradient_checkpointing on the denoiser: every block, or the share
        gradient_checkpointing_ratio asks for (job/speedups/checkpointing.py)."""
        if self.cfg.train.gradient_checkpointing:
            enable_checkpointing(self.denoiser(), self.cfg.train.gradient_checkpointing_ratio)

    def _base_dtype(self) -> torch.dtype:
        """Frozen base: base_model_default_dtype (auto: the weight dtype); a fully trained
        denoiser: its trainable dtype."""
        if self.cfg.model.model_type == "full":
            return self._trainable_dtype()
        wanted = self.cfg.speedups.base_model_default_dtype
        return {"auto": self.dtype, "bf16": torch.bfloat16, "fp32": torch.float32}[wanted]

    def _weights_setting(self) -> str:
        """The job setting that named the weights, for load errors."""
        m = self.cfg.model
        if m.pretrained_model_name_or_path:
            return "model.pretrained_model_name_or_path"
        return f"model.flavour = {m.flavour or spec_for(m.family).default_flavour!r}"

    def _new_lora_config(self):
        """peft's LoraConfig from [lora] (alpha defaults to the rank)."""
        from peft import LoraConfig

        lora = self.cfg.lora
        return LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha if lora.alpha is not None else lora.rank,
            lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
            init_lora_weights="gaussian")

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's peft state dict (LoRA) or the denoiser's state dict (full)."""
        if self.lora_config is None:
            return self.denoiser().state_dict()
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.denoiser())

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Put checkpointed trained weights back; other names or shapes are an error."""
        expected = {k: tuple(v.shape) for k, v in self.trainable_state_dict().items()}
        given = {k: tuple(v.shape) for k, v in state.items()}
        if given != expected:
            missing, extra = len(expected.keys() - given), len(given.keys() - expected)
            reshaped = sum(1 for k in expected.keys() & given if expected[k] != given[k])
            raise ConfigError(
                f"the checkpoint's trained weights do not fit this model ({missing} missing, "
                f"{extra} unexpected, {reshaped} of another shape)", "resume with the same "
                '[lora] rank, target_modules, model.flavour and model_type, or set '
                'checkpoint.resume_from = "none"')
        if self.lora_config is None:
            self.denoiser().load_state_dict(state, strict=True)
            return
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.denoiser(), state)
