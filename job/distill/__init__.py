"""Distillation objectives on top of a family; `build_objective` picks the configured one."""

from __future__ import annotations

from typing import Any

from job.config import JobConfig

def lcm_validation_defaults(cfg: JobConfig) -> dict[str, float]:
    """What an LCM student is sampled with unless [validation] says otherwise: 4 steps; a
    LoRA student with guidance 0 (CFG off: guidance is distilled in), a full student with
    its guidance embedding at the middle of the distilled w range (guidance_scale = w + 1,
    which the pipeline feeds as the embedding instead of running CFG)."""
    lcm = cfg.distillation.lcm
    guidance = 0.0 if cfg.distillation.student == "lora" else 1 + 0.5 * (lcm.w_min + lcm.w_max)
    return {"num_inference_steps": 4, "guidance": guidance}


def with_method_defaults(cfg: JobConfig) -> tuple[JobConfig, list[str]]:
    """The job with the method's validation defaults for keys the job file leaves unset."""
    if cfg.distillation.method != "lcm":
        return cfg, []
    unset = {k: v for k, v in lcm_validation_defaults(cfg).items()
             if k not in cfg.validation.model_fields_set}
    notes = []
    if unset:
        shown = ", ".join(f"{k} = {v}" for k, v in unset.items())
        notes.append(f"LCM student: validation samples with {shown} (not set in [validation]; "
                     "an LCM student needs 4-8 steps and no classifier-free guidance)")
        cfg = cfg.model_copy(update={"validation": cfg.validation.model_copy(update=unset)})
    lcm, guidance = cfg.distillation.lcm, cfg.validation.guidance
    if cfg.distillation.student == "full" and not lcm.w_min <= guidance - 1 <= lcm.w_max:
        notes.append(f"validation.guidance = {guidance} gives the full LCM student w = "
                     f"{guidance - 1:g} through its guidance embedding, outside the distilled "
                     f"range [{lcm.w_min:g}, {lcm.w_max:g}]")
    return cfg, notes


def build_objective(cfg: JobConfig, family: Any, device: Any):
    """The training objective replacing family.training_loss, or None for plain training."""
    if cfg.distillation.method == "none":
        return None
    from job.distill.lcm import LCMDistillation

    return LCMDistillation(cfg, family, device)
