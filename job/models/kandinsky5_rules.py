"""Cross-field rules of the kandinsky5-image family, torch-free (`tunejob validate` runs them).

The family repeats the route check at load time against the loaded transformer's depth,
which also covers an explicit model path whose depth is not known here.
"""

from __future__ import annotations

from job.config import JobConfig
from job.models.tread_rules import resolve_routes
from job.errors import ConfigError

# Visual blocks of the flavours' default weights (their transformer/config.json).
FLAVOUR_DEPTHS = {"t2i-lite-sft": 50, "t2i-lite-pretrain": 50, "i2i-lite-sft": 50,
                  "i2i-lite-pretrain": 50, "tiny": 4, "tiny-i2i": 4}
DEFAULT_GUIDANCE = 5.0


def is_i2i(cfg: JobConfig) -> bool:
    """Whether the flavour is an image-to-image one (the flavour decides, also for a path)."""
    return (cfg.model.flavour or "t2i-lite-sft").startswith(("i2i", "tiny-i2i"))


def check_kandinsky5(cfg: JobConfig) -> list[str]:
    """Raise ConfigError on an impossible setting; return warnings."""
    if cfg.model.prediction_type != "auto":
        raise ConfigError(f'model.prediction_type = "{cfg.model.prediction_type}" does not apply '
                          "to kandinsky5-image, which predicts the flow velocity (noise - x0)",
                          'leave prediction_type out (or "auto")')
    notes = []
    if cfg.train.snr_gamma is not None:
        notes.append(f"train.snr_gamma = {cfg.train.snr_gamma} is ignored: Min-SNR weighting is "
                     "for epsilon/v models, and kandinsky5-image learns a flow velocity")
    conditioned = [ds.id for ds in cfg.enabled_datasets() if ds.conditioning_data_dir]
    if is_i2i(cfg) and not conditioned:
        raise ConfigError(f"model.flavour = {cfg.model.flavour!r} edits a conditioning image, "
                          "but no enabled dataset has conditioning_data_dir",
                          "set conditioning_data_dir in [[datasets]] to a folder of source "
                          "images with the same relative file names as the training images, "
                          'or use a t2i flavour (e.g. "t2i-lite-sft")')
    v = cfg.validation
    if is_i2i(cfg) and v.enabled and (v.prompt or v.prompt_library) \
            and not v.conditioning_images:
        raise ConfigError(f"model.flavour = {cfg.model.flavour!r} samples validation images "
                          "from a conditioning image, and validation.conditioning_images is "
                          "empty", 'set validation.conditioning_images = ["/data/val/source.png"]'
                          " (one per prompt, or one for all), or remove the validation prompts")
    if not is_i2i(cfg) and v.conditioning_images:
        notes.append("validation.conditioning_images is ignored: the flavour is text-to-image")
    if not is_i2i(cfg) and conditioned:
        notes.append(f"conditioning_data_dir of dataset(s) {', '.join(conditioned)} is ignored: "
                     f"flavour {cfg.model.flavour or 't2i-lite-sft'!r} is text-to-image")
    if cfg.model.pretrained_model_name_or_path is None:
        resolve_routes(cfg.tread.routes, FLAVOUR_DEPTHS[cfg.model.flavour or "t2i-lite-sft"])
    if cfg.speedups.enable_group_offload and cfg.model.model_type == "full":
        raise ConfigError('speedups.enable_group_offload = true with model.model_type = "full": '
                          "every weight trains, so none can wait in CPU memory",
                          'train a LoRA (model_type = "lora"), or set enable_group_offload = '
                          "false")
    if not cfg.speedups.enable_group_offload and cfg.speedups.group_offload_use_stream:
        notes.append("speedups.group_offload_use_stream is ignored: enable_group_offload is off")
    if cfg.speedups.enable_group_offload and not cfg.train.gradient_checkpointing:
        raise ConfigError("speedups.enable_group_offload = true with "
                          "train.gradient_checkpointing = false: autograd would keep every "
                          "block's weights on the GPU for the backward pass, so offloading "
                          "would save no memory", "set train.gradient_checkpointing = true (the "
                          "backward pass then reloads one block at a time), or "
                          "enable_group_offload = false")
    return notes
