"""Latent consistency distillation: LCM (arXiv 2310.04378) with a LoRA student (LCM-LoRA,
arXiv 2311.05556), on top of a family that declares `supports_lcm`.

One step, per sample, with the teacher's DDPM schedule alpha_bar(t):

    n ~ U{0..N-1} on the skipped grid t_n = (n + 1) k - 1, k = T // N (N = num_ddim_timesteps)
    s = t_n, e = max(t_n - k, 0);  x_s = sqrt(alpha_bar(s)) x0 + sqrt(1 - alpha_bar(s)) noise
    w ~ U[w_min, w_max];  the teacher (the UNet without its LoRA) runs conditioned (c) and
        unconditioned (u), each giving x0 and eps;  x0 = x0_c + w (x0_c - x0_u), likewise eps
    x_e = sqrt(alpha_bar(e)) x0 + sqrt(1 - alpha_bar(e)) eps               (one DDIM step)
    f(x, t) = c_skip(t) x + c_out(t) x0_student(x, t), with c_skip = 0.25 / ((10t)^2 + 0.25)
        and c_out = 10t / sqrt((10t)^2 + 0.25) (10 = timestep_scaling_factor, sigma_data 0.5)
    loss = d(f(x_s, s), stopgrad f(x_e, e)),  d = l2 or sqrt((p - y)^2 + c^2) - c

LoRA student (LCM-LoRA): the target f(x_e, e) is the student itself under no grad.
Full student (LCM): the student is a copy of the UNet that also takes w through a guidance
embedding (time_cond_proj_dim, sinusoidal embedding of 1000 w, as the pipelines' guidance
embedding), in both of its calls; the target is an EMA copy of the student (decay
distillation.target_ema_decay after every optimizer step), also given w.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import torch

from job.config import JobConfig
from job.errors import ConfigError
from job.log import get_logger
from job.models.base import Family
from job.train import distributed

# The consistency models' data standard deviation, as LCMScheduler fixes it.
SIGMA_DATA = 0.5
# Width of a full student's guidance embedding (LCM-SDXL's time_cond_proj_dim).
TIME_COND_DIM = 256


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of 1000 w: sin half then cos half, frequencies
    10000^(-i / (dim/2 - 1)); what the pipelines feed a UNet with time_cond_proj_dim for
    guidance_scale = w + 1."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device)
                      * -(math.log(10000.0) / (half - 1)))
    angles = (w.float() * 1000.0)[:, None] * freqs[None, :]
    out = torch.cat([angles.sin(), angles.cos()], dim=1)
    return torch.nn.functional.pad(out, (0, 1)) if dim % 2 else out


def lcm_scheduler_config(cfg: JobConfig) -> dict[str, Any]:
    """LCMScheduler settings that match how the student was distilled."""
    lcm = cfg.distillation.lcm
    return {"timestep_scaling": lcm.timestep_scaling_factor,
            "original_inference_steps": lcm.num_ddim_timesteps}


def export_metadata(cfg: JobConfig) -> dict[str, str]:
    """safetensors header entries that tell a user how to sample the exported student."""
    lcm = cfg.distillation.lcm
    return {"distillation": "lcm",
            "lcm_scheduler_config": json.dumps(lcm_scheduler_config(cfg), sort_keys=True),
            "lcm_guidance_w": json.dumps([lcm.w_min, lcm.w_max])}


def boundary_scalings(timesteps: torch.Tensor, timestep_scaling: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip(t), c_out(t) of the consistency function (LCMScheduler's definition)."""
    scaled = timesteps.double() * timestep_scaling
    c_skip = SIGMA_DATA ** 2 / (scaled ** 2 + SIGMA_DATA ** 2)
    c_out = scaled / (scaled ** 2 + SIGMA_DATA ** 2).sqrt()
    return c_skip.float(), c_out.float()


def x0_and_eps(output: torch.Tensor, noisy: torch.Tensor, alpha_bar: torch.Tensor,
               prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean latent and the noise a prediction implies (alpha_bar shaped [B, 1, 1, 1])."""
    alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction_type == "epsilon":
        return (noisy - sigma * output) / alpha, output
    if prediction_type == "v_prediction":
        return alpha * noisy - sigma * output, alpha * output + sigma * noisy
    raise ConfigError(f"LCM distillation cannot use prediction_type {prediction_type!r}",
                      'set model.prediction_type to "epsilon" or "v_prediction"')


def consistency_distance(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
                         huber_c: float) -> torch.Tensor:
    """Per-sample l2 or pseudo-Huber distance [B], in fp32."""
    diff = pred.float() - target.float()
    if loss_type == "huber":
        error = (diff ** 2 + huber_c ** 2).sqrt() - huber_c
    else:
        error = diff ** 2
    return error.mean(dim=tuple(range(1, error.ndim)))


class DDIMGrid:
    """The teacher's skipped timestep grid t_n = (n + 1) k - 1, and one DDIM step down it."""

    def __init__(self, alphas_cumprod: torch.Tensor, num_ddim_timesteps: int,
                 device: torch.device) -> None:
        total = alphas_cumprod.shape[0]
        if num_ddim_timesteps > total:
            raise ConfigError(f"distillation.lcm.num_ddim_timesteps = {num_ddim_timesteps} "
                              f"exceeds the model's {total} training timesteps",
                              f"use at most {total} (50 is usual)")
        self.skip = total // num_ddim_timesteps
        self.timesteps = (torch.arange(1, num_ddim_timesteps + 1) * self.skip - 1).to(device)
        self.alphas_cumprod = alphas_cumprod.float().to(device)

    def start_and_end(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t_n, t_n - k) of grid indices; the first point steps down to t = 0."""
        start = self.timesteps[index]
        return start, (start - self.skip).clamp(min=0)

    def alpha_bar(self, timesteps: torch.Tensor) -> torch.Tensor:
        """alpha_bar(t) shaped [B, 1, 1, 1]."""
        return self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)

    def ddim_step(self, x0: torch.Tensor, eps: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        """The deterministic DDIM step to t_end, given the guided x0 and noise."""
        alpha_bar = self.alpha_bar(end)
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps


class LCMDistillation:
    """The LCM objective in place of family.training_loss: per-sample loss [B]."""

    def __init__(self, cfg: JobConfig, family: Family, device: torch.device) -> None:
        self.cfg, self.family, self.settings = cfg, family, cfg.distillation.lcm
        alphas_cumprod, self.prediction_type = family.ddpm_schedule()
        self.grid = DDIMGrid(alphas_cumprod, self.settings.num_ddim_timesteps, device)
        self.full = cfg.distillation.student == "full"
        # A full student's EMA target network; a LoRA student is its own target.
        self.target: torch.nn.Module | None = None
        self.cond_dim: int | None = None
        if self.full:
            family.make_consistency_student(TIME_COND_DIM)
            student = family.denoiser()
            self.cond_dim = student.config.time_cond_proj_dim
            self.target = copy.deepcopy(student).requires_grad_(False)
        s, log = self.settings, get_logger()
        log.info("distillation", method="lcm", student=cfg.distillation.student,
                 teacher=("the frozen original UNet" if self.full
                          else "the same UNet with its LoRA adapters disabled"),
                 target=(f"EMA of the student, decay {cfg.distillation.target_ema_decay}"
                         if self.full else "the student under no grad"), skip=self.grid.skip,
                 grid_points=s.num_ddim_timesteps, w=[s.w_min, s.w_max], loss=s.loss_type,
                 timestep_scaling=s.timestep_scaling_factor, prediction_type=self.prediction_type)
        if cfg.train.snr_gamma is not None:
            log.warning("setting_ignored", key="train.snr_gamma",
                        reason="the LCM loss is unweighted (Min-SNR applies to plain training)")

    def __call__(self, batch: dict[str, torch.Tensor],
                 generator: torch.Generator) -> torch.Tensor:
        """Per-sample loss [B] with noise, grid index and w drawn from `generator`."""
        latents, s = batch["latents"], self.settings
        device = latents.device
        # Drawn on the CPU generator and then moved, so CPU and GPU runs see the same draws.
        # Global-batch draws sliced per rank (job/train/distributed.py).
        noise = distributed.randn(latents.shape, generator, device=device)
        index = distributed.randint(0, s.num_ddim_timesteps, latents.shape[0], generator,
                                    device=device)
        w = distributed.rand(latents.shape[0], generator, device=device) * (s.w_max - s.w_min) \
            + s.w_min
        return self.losses(batch, noise, index, w)

    def losses(self, batch: dict[str, torch.Tensor], noise: torch.Tensor, index: torch.Tensor,
               w: torch.Tensor) -> torch.Tensor:
        """Per-sample LCM loss [B] at the given noise, grid indices [B] and guidance w [B]."""
        latents = batch["latents"].float()
        start, end = self.grid.start_and_end(index)
        alpha_start = self.grid.alpha_bar(start)
        noisy = alpha_start.sqrt() * latents + (1 - alpha_start).sqrt() * noise
        # Teacher and target first, so the adapters are toggled before any graph exists.
        cond = guidance_embedding(w, self.cond_dim) if self.cond_dim else None
        with torch.no_grad():
            x0, eps = self._guided_teacher(noisy, start, batch, w.float().view(-1, 1, 1, 1))
            x_end = self.grid.ddim_step(x0, eps, end)
            if self.target is not None:
                with self.family.swapped_denoiser(self.target):
                    target = self._consistency(x_end, end, batch, cond)
            else:
                target = self._consistency(x_end, end, batch, cond)
        prediction = self._consistency(noisy, start, batch, cond)
        return consistency_distance(prediction, target, self.settings.loss_type,
                                    self.settings.huber_c)

    def eval_loss(self, batch: dict[str, torch.Tensor], timesteps: torch.Tensor,
                  noise: torch.Tensor) -> torch.Tensor:
        """The LCM loss at the grid points nearest `timesteps`, w at the middle of its range."""
        grid = self.grid.timesteps
        index = (grid.view(1, -1) - timesteps.to(grid.device).view(-1, 1)).abs().argmin(dim=1)
        w = torch.full_like(index, 0.5 * (self.settings.w_min + self.settings.w_max),
                            dtype=torch.float32)
        return self.losses(batch, noise.to(grid.device, torch.float32), index, w)

    def _guided_teacher(self, noisy: torch.Tensor, timesteps: torch.Tensor,
                        batch: dict[str, torch.Tensor], w: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Guided x0 and eps of the teacher: cond + w (cond - uncond), i.e. CFG scale w + 1."""
        unconditional = self.family.unconditional_batch(batch)
        # Both branches in one call: one UNet pass of 2B instead of two of B.
        both = {key: torch.cat([batch[key], unconditional[key]]) for key in batch}
        with self.family.teacher():
            output = self.family.denoise(noisy.repeat(2, 1, 1, 1), timesteps.repeat(2), both)
        alpha_bar = self.grid.alpha_bar(timesteps).repeat(2, 1, 1, 1)
        x0, eps = x0_and_eps(output.float(), noisy.repeat(2, 1, 1, 1), alpha_bar,
                             self.prediction_type)
        (x0_c, x0_u), (eps_c, eps_u) = x0.chunk(2), eps.chunk(2)
        return x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u)

    def _consistency(self, noisy: torch.Tensor, timesteps: torch.Tensor,
                     batch: dict[str, torch.Tensor],
                     cond: torch.Tensor | None) -> torch.Tensor:
        """f(x, t) = c_skip(t) x + c_out(t) x0_student(x, t)."""
        output = self.family.denoise(noisy, timesteps, batch, timestep_cond=cond).float()
        x0, _ = x0_and_eps(output, noisy, self.grid.alpha_bar(timesteps), self.prediction_type)
        c_skip, c_out = boundary_scalings(timesteps, self.settings.timestep_scaling_factor)
        return c_skip.view(-1, 1, 1, 1) * noisy + c_out.view(-1, 1, 1, 1) * x0

    # -- the full student's target network (Trainer hooks) --------------------------------

    @torch.no_grad()
    def after_step(self) -> None:
        """Target <- decay target + (1 - decay) student, after each optimizer step."""
        if self.target is None:
            return
        decay = self.cfg.distillation.target_ema_decay
        targets = list(self.target.parameters())
        students = [p.detach() for p in self.family.denoiser().parameters()]
        torch._foreach_lerp_(targets, students, 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold besides the student: the target network."""
        if self.target is None:
            return {}
        return {f"target.{k}": v for k, v in self.target.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Put a checkpointed target network back."""
        if self.target is None:
            return
        self.target.load_state_dict({k.removeprefix("target."): v for k, v in state.items()},
                                    strict=True)

    def state_bytes(self) -> int:
        """Checkpoint bytes of state_dict()."""
        if self.target is None:
            return 0
        return sum(p.numel() * p.element_size() for p in self.target.parameters())
