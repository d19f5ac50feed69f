"""Cross-field rules of the stable_cascade family, torch-free (`tunejob validate` runs them)."""

from __future__ import annotations

from job.config import JobConfig
from job.errors import ConfigError

PRECISION_MESSAGE = 'Stable Cascade Stage C requires mixed_precision = "no"'


def check_stable_cascade(cfg: JobConfig) -> list[str]:
    """Raise ConfigError on a refused Stage C setting; return warnings."""
    notes = _check_precision(cfg)
    if cfg.model.prediction_type != "auto":
        raise ConfigError(f'model.prediction_type = "{cfg.model.prediction_type}" does not apply '
                          "to stable_cascade: Stage C predicts the noise (epsilon) of its "
                          "cosine schedule", 'leave prediction_type out (or "auto")')
    if cfg.train.snr_gamma is not None:
        notes.append(f"train.snr_gamma = {cfg.train.snr_gamma} is ignored: Stage C weights its "
                     "loss by stable_cascade.loss_weighting (p2 or adaptive)")
    if cfg.speedups.base_model_precision != "no_change":
        notes.append(f'speedups.base_model_precision = "{cfg.speedups.base_model_precision}" '
                     "quantises the Stage C prior that the LoRA trains on: this saves memory but "
                     "may cost quality (the exported adapter is unquantised)")
    for key in ("text_encoder_2_precision", "text_encoder_3_precision"):
        if getattr(cfg.speedups, key) != "no_change":
            notes.append(f"speedups.{key} is ignored: Stage C has one text encoder (CLIP-G), "
                         "set by text_encoder_1_precision")
    return notes + _check_validation(cfg)


def _check_precision(cfg: JobConfig) -> list[str]:
    """fp32 unless job.i_know_what_i_am_doing (the release trained under bf16 autocast, so
    bf16 is a legitimate, if riskier, override)."""
    precision = cfg.train.mixed_precision
    if precision == "no":
        return []
    if not cfg.job.i_know_what_i_am_doing:
        raise ConfigError(f'{PRECISION_MESSAGE}; train.mixed_precision = "{precision}"',
                          'set train.mixed_precision = "no" (fp32; adamw_bf16 still keeps the '
                          'LoRA weights in bf16), or set job.i_know_what_i_am_doing = true to '
                          f'train under {precision} autocast anyway and watch for NaNs')
    return [f'{PRECISION_MESSAGE}; training under {precision} autocast anyway '
            "(job.i_know_what_i_am_doing = true): watch for NaN losses"]


def _check_validation(cfg: JobConfig) -> list[str]:
    """Which guidance samples the prior, said aloud when two settings compete."""
    s, v, notes = cfg.stable_cascade, cfg.validation, []
    if s.validation_prior_guidance_scale is not None and "guidance" in v.model_fields_set:
        notes.append(f"validation.guidance = {v.guidance} is ignored: "
                     "stable_cascade.validation_prior_guidance_scale = "
                     f"{s.validation_prior_guidance_scale} sets the prior's guidance")
    if not s.use_decoder_for_validation:
        for key in ("decoder_model_name_or_path", "decoder_subfolder",
                    "validation_decoder_guidance_scale"):
            if key in s.model_fields_set:
                notes.append(f"stable_cascade.{key} is ignored: use_decoder_for_validation = "
                             "false saves prior latents and previews instead of images")
    return notes


def prior_guidance(cfg: JobConfig, guidance: float) -> float:
    """The prior's CFG scale: the [stable_cascade] one if set, else validation.guidance."""
    chosen = cfg.stable_cascade.validation_prior_guidance_scale
    return guidance if chosen is None else chosen
