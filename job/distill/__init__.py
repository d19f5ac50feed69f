"""Distillation objectives on top of a family; `build_objective` picks the configured one."""

from __future__ import annotations

from typing import Any

from job.config import JobConfig

# What an LCM student is sampled with unless [validation] says otherwise.
LCM_VALIDATION_DEFAULTS = {"num_inference_steps": 4, "guidance": 0.0}


def with_method_defaults(cfg: JobConfig) -> tuple[JobConfig, list[str]]:
    """The job with the method's validation defaults for keys the job file leaves unset."""
    if cfg.distillation.method != "lcm":
        return cfg, []
    unset = {k: v for k, v in LCM_VALIDATION_DEFAULTS.items()
             if k not in cfg.validation.model_fields_set}
    if not unset:
        return cfg, []
    validation = cfg.validation.model_copy(update=unset)
    shown = ", ".join(f"{k} = {v}" for k, v in unset.items())
    note = (f"LCM student: validation samples with {shown} (not set in [validation]; an "
            "LCM student needs 4-8 steps and little or no guidance)")
    return cfg.model_copy(update={"validation": validation}), [note]


def build_objective(cfg: JobConfig, family: Any, device: Any):
    """The training objective replacing family.training_loss, or None for plain training."""
    if cfg.distillation.method == "none":
        return None
    from job.distill.lcm import LCMDistillation

    return LCMDistillation(cfg, family, device)
