"""Cross-field rules of the kandinsky5-image family, torch-free (`tunejob validate` runs them).

The family repeats the route check at load time against the loaded transformer's depth,
which also covers an explicit model path whose depth is not known here.
"""

from __future__ import annotations

from job.config import JobConfig, TreadRoute
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


def resolve_routes(routes: list[TreadRoute], depth: int) -> list[tuple[int, int, float]]:
    """(first, last, ratio) per route with negative indices counted from the end; routes
    must lie inside the `depth` blocks, in order, and not overlap."""
    resolved = []
    for i, route in enumerate(routes):
        first = route.start_layer_idx + depth if route.start_layer_idx < 0 else route.start_layer_idx
        last = route.end_layer_idx + depth if route.end_layer_idx < 0 else route.end_layer_idx
        where = f"tread.routes[{i}]"
        if not 0 <= first <= last < depth:
            raise ConfigError(
                f"{where} covers blocks {route.start_layer_idx}..{route.end_layer_idx}, which "
                f"is blocks {first}..{last} of a transformer with {depth} visual blocks",
                f"use indices in 0..{depth - 1} (or -{depth}..-1 from the end) with "
                "start_layer_idx <= end_layer_idx, e.g. 2 and -2")
        if resolved and first <= resolved[-1][1]:
            raise ConfigError(f"{where} starts at block {first}, inside the previous route "
                              f"(which ends at block {resolved[-1][1]})",
                              "list routes in block order without overlaps")
        resolved.append((first, last, route.selection_ratio))
    return resolved
