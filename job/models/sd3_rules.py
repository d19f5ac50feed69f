"""Cross-field rules of the sd3 family's settings, torch-free (`tunejob validate` runs them).

The family repeats the layer check at load time against the loaded transformer's depth,
which also covers an explicit model path whose depth is not known here.
"""

from __future__ import annotations

from job.config import JobConfig
from job.errors import ConfigError
from job.models.tread_rules import resolve_routes

# Transformer blocks of the flavours' default weights (their transformer/config.json).
FLAVOUR_DEPTHS = {"large": 38, "medium": 24, "3.0-medium": 24, "tiny": 4}
# SD3.5 was trained with 77 and 256 T5 tokens at different stages (its model card); 256 is
# also the stock pipeline's max_sequence_length.
T5_TRAINED_MAX = 256


def check_sd3(cfg: JobConfig) -> list[str]:
    """Raise ConfigError on an impossible [sd3]/SLG setting; return warnings."""
    if cfg.model.prediction_type != "auto":
        raise ConfigError(f'model.prediction_type = "{cfg.model.prediction_type}" does not apply '
                          "to sd3, which predicts the flow velocity (noise - x0)",
                          'leave prediction_type out (or "auto") for family sd3')
    notes = _check_text(cfg)
    if cfg.train.snr_gamma is not None:
        notes.append(f"train.snr_gamma = {cfg.train.snr_gamma} is ignored: Min-SNR weighting is "
                     "for epsilon/v models; sd3 weights its flow loss by sd3.loss_weighting")
    s = cfg.sd3
    if s.flow_schedule_auto_shift and "flow_schedule_shift" in s.model_fields_set:
        notes.append(f"sd3.flow_schedule_shift = {s.flow_schedule_shift} is ignored: "
                     "flow_schedule_auto_shift = true computes the shift from each batch's "
                     "image size; remove one of the two")
    depth = known_depth(cfg)
    if depth is not None:  # an explicit path: checked against the loaded depth
        resolve_routes(cfg.tread.routes, depth, "transformer blocks")
    return notes + check_skip_layer_guidance(cfg, depth)


def known_depth(cfg: JobConfig) -> int | None:
    """The transformer depth of the flavour's default weights; None for an explicit path."""
    if cfg.model.pretrained_model_name_or_path:
        return None
    return FLAVOUR_DEPTHS.get(cfg.model.flavour or "medium")


def _check_text(cfg: JobConfig) -> list[str]:
    length = cfg.sd3.tokenizer_max_length
    if length <= T5_TRAINED_MAX:
        return []
    if not cfg.job.i_know_what_i_am_doing:
        raise ConfigError(
            f"sd3.tokenizer_max_length = {length} is above {T5_TRAINED_MAX}, the longest T5 "
            "length SD3.5 was trained with (77 and 256 at different stages) and the stock "
            "pipeline's default", f"use at most {T5_TRAINED_MAX} (154 is the default, 77 saves "
            "cache space), or set job.i_know_what_i_am_doing = true to train on longer T5 "
            "sequences anyway")
    return [f"sd3.tokenizer_max_length = {length} is above the {T5_TRAINED_MAX} T5 tokens "
            "SD3.5 was trained with (allowed by job.i_know_what_i_am_doing)"]


def check_skip_layer_guidance(cfg: JobConfig, depth: int | None) -> list[str]:
    """Layer indices inside the transformer (exit 2); guidance and the step window that
    make skip-layer guidance act at all (warnings)."""
    v = cfg.validation
    layers = v.guidance_skip_layers
    if not layers:
        return []
    bad = [i for i in layers if i < 0 or (depth is not None and i >= depth)]
    if bad:
        where = f"the transformer has {depth} layers (0-{depth - 1})" if depth else \
            "layer indices start at 0"
        # The transformer skips only indices it has; others would be silently ignored.
        raise ConfigError(f"validation.guidance_skip_layers = {layers}: {bad} not a layer of "
                          f"the model; {where}", "use layer indices below the model's depth "
                          "(SD3.5 Medium: [7, 8, 9])")
    notes = []
    if v.guidance <= 1:
        notes.append(f"validation.guidance_skip_layers has no effect: validation.guidance = "
                     f"{v.guidance} <= 1 turns classifier-free guidance off, and skip-layer "
                     "guidance only acts with it")
    elif not slg_steps(v.num_inference_steps, v.guidance_skip_layers_start,
                       v.guidance_skip_layers_stop):
        notes.append(f"validation.guidance_skip_layers has no effect: no step of "
                     f"{v.num_inference_steps} lies strictly between start "
                     f"{v.guidance_skip_layers_start} and stop {v.guidance_skip_layers_stop} of "
                     "them; widen the window or sample more steps")
    return notes


def slg_steps(steps: int, start: float, stop: float) -> list[int]:
    """Step indices where the stock pipeline applies skip-layer guidance: start*n < i < stop*n."""
    return [i for i in range(steps) if start * steps < i < stop * steps]
