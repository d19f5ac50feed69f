"""Lifecycle step 6: the training loop, its step, and what it saves."""

from __future__ import annotations

import functools
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from job.config import JobConfig
from job.data.batches import BatchLoader
from job.data.prepare import PreparedData, Sample
from job.data.sampler import BucketBatchSampler
from job.errors import DivergedError, Preempted
from job.log import Progress, get_logger
from job.metrics import MetricsWriter
from job.models.base import Family
from job.speedups.compile import begin_step
from job.train import distributed, fsdp
from job.train.checkpoint import CheckpointManager
from job.train.checkpoint_io import CheckpointIO
from job.train.ema import EMA
from job.train.optimizers import build_optimizer
from job.train.schedules import build_lr_scheduler
from job.train.state import RandomStreams, TrainState


@dataclass
class StepResult:
    """What one optimizer step reports."""

    loss: float
    grad_norm: float
    applied: bool


class Trainer(CheckpointIO):
    """Owns the optimizer, schedule, EMA, data position and checkpoints of one run."""

    def __init__(self, cfg: JobConfig, family: Family, data: PreparedData, out_dir: Path,
                 metrics: MetricsWriter, should_stop: Callable[[], bool],
                 on_validate: Callable[[int], None], device: torch.device,
                 objective: Callable[[dict[str, torch.Tensor], torch.Generator],
                                     torch.Tensor] | None = None) -> None:
        self.cfg, self.family, self.data, self.metrics = cfg, family, data, metrics
        # Per-sample loss [B] of a batch: the family's own unless a distillation replaces it.
        self.objective = objective if objective is not None else family.training_loss
        self.should_stop, self.on_validate, self.device = should_stop, on_validate, device
        self.log = get_logger()
        self.params = [p for p in family.denoiser().parameters() if p.requires_grad]
        # Sharded by apply_fsdp2 (strategy fsdp2): FSDP reduces the gradients, every rank
        # writes checkpoints and validates.
        self.sharded = fsdp.is_sharded(family.denoiser())
        o = cfg.optimizer
        self.topology = distributed.topology()
        self.learning_rate = o.learning_rate * (
            self.topology.world if cfg.distributed.scale_lr else 1)
        self.optimizer = build_optimizer(self.params, o.name, self.learning_rate, o.beta1,
                                         o.beta2, o.weight_decay, o.epsilon)
        # Global batches (per-GPU batch x processes) from one bucket each; every rank takes
        # its slice, so the run does not depend on how many processes share it.
        self.sampler = BucketBatchSampler([s.bucket for s in data.train],
                                          cfg.train.batch_size * self.topology.world,
                                          cfg.train.seed, [s.repeats for s in data.train])
        self.total_steps = self._total_steps()
        self.lr_scheduler = build_lr_scheduler(self.optimizer, o.lr_scheduler, o.lr_warmup_steps,
                                               self.total_steps, o.lr_num_cycles, o.lr_power)
        self.ema = self._build_ema()
        self.scaler = torch.amp.GradScaler("cuda") if self._fp16_scaling() else None
        self.state = TrainState(world_size=self.topology.world)
        self.rng = RandomStreams.seeded(cfg.train.seed)
        self.batches = BatchLoader(data, device)
        self.checkpoints = CheckpointManager(out_dir / "checkpoints", cfg.checkpoint.total_limit)
        # Set from the per-step agreement, so every rank stops at the same step.
        self._stop_agreed = False
        self.saved: list[str] = []
        self.train_time_s = 0.0
        self.samples_trained = 0
        # The GPU's allocation peak before training (model loading, caching, sharding), GiB;
        # the train rows report the peak since training began.
        self.setup_peak_gib: float | None = None
        self.last_checkpoint_s: float | None = None
        self._epoch_batches: tuple[int, list[list[int]]] | None = None

    def _total_steps(self) -> int:
        """max_train_steps, else epochs times optimizer steps per epoch."""
        if self.cfg.train.max_train_steps:
            return self.cfg.train.max_train_steps
        per_epoch = self.sampler.num_batches_per_epoch() // self.cfg.train.gradient_accumulation_steps
        return self.cfg.train.num_train_epochs * max(1, per_epoch)

    def _build_ema(self) -> EMA | None:
        if not self.cfg.train.use_ema:
            return None
        return EMA(self.named_trainable(), decay=self.cfg.train.ema_decay,
                   update_interval=self.cfg.train.ema_update_interval)

    def _fp16_scaling(self) -> bool:
        """Loss scaling only for fp16 autocast on CUDA (bf16 has fp32's exponent range)."""
        return self.cfg.train.mixed_precision == "fp16" and self.device.type == "cuda"

    def named_trainable(self) -> dict[str, torch.nn.Parameter]:
        """Trainable parameters by name."""
        return {n: p for n, p in self.family.denoiser().named_parameters() if p.requires_grad}

    # -- the loop ---------------------------------------------------------------------

    def train(self) -> None:
        """Run optimizer steps until the total, saving and validating on schedule."""
        c = self.cfg
        if self.device.type == "cuda":
            self.setup_peak_gib = gpu_peak_gib(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.log.info("training", total_steps=self.total_steps, start_step=self.state.step,
                      setup_peak_gpu_memory_gib=self.setup_peak_gib,
                      batch_size=c.train.batch_size, accumulation=c.train.gradient_accumulation_steps,
                      processes=self.topology.world, effective_batch=self._samples_per_step(),
                      learning_rate=self.learning_rate,
                      lr_scaled_by_processes=self.cfg.distributed.scale_lr,
                      trainable_params=sum(p.numel() for p in self.params),
                      # what an epoch draws over all ranks: repeats in, dropped buckets and
                      # each bucket's partial batch out
                      samples_per_epoch=self.sampler.num_batches_per_epoch()
                      * c.train.batch_size * self.topology.world,
                      dropped_buckets=[f"{w}x{h}: {n}" for (w, h), n in self.sampler.dropped_buckets()])
        progress = Progress("train", self.total_steps - self.state.step)
        window_start, window_samples = time.perf_counter(), 0
        try:
            while self.state.step < self.total_steps:
                if self._stop_agreed or (not self.topology.distributed and self.should_stop()):
                    raise Preempted("stopped by signal", "the next run resumes from the checkpoint")
                started = time.perf_counter()
                result = self.train_step()
                self.train_time_s += time.perf_counter() - started
                window_samples += self._samples_per_step()
                self.samples_trained += self._samples_per_step()
                if not result.applied:
                    continue
                step = self.state.step
                if step % c.train.log_every == 0 or step == self.total_steps:
                    rate = window_samples / max(time.perf_counter() - window_start, 1e-9)
                    self._log_step(result, rate)
                    window_start, window_samples = time.perf_counter(), 0
                progress.update(1, loss=f"{result.loss:.4f}")
                if c.checkpoint.step_interval and step % c.checkpoint.step_interval == 0 \
                        and step < self.total_steps:
                    self.save_checkpoint()
                if c.validation.step_interval and step % c.validation.step_interval == 0 \
                        and step < self.total_steps:
                    self.on_validate(step)
        finally:
            self.batches.close()
        progress.close()

    def _samples_per_step(self) -> int:
        """Samples of one optimizer step over all processes (the effective batch)."""
        return (self.cfg.train.batch_size * self.cfg.train.gradient_accumulation_steps
                * self.topology.world)

    def train_step(self) -> StepResult:
        """One optimizer step over `gradient_accumulation_steps` micro-batches."""
        accumulation = self.cfg.train.gradient_accumulation_steps
        losses = []
        begin_step()
        for _ in range(accumulation):
            batch = self._next_batch()
            loss = self.objective(batch, self.rng.noise).mean() / accumulation
            self._backward(loss)
            losses.append(loss.detach())
        if not self.sharded:
            distributed.average_gradients(self.params)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.train.max_grad_norm or math.inf
        grad_norm = distributed.clip_gradients(self.params, max_norm)
        loss_mean, stops = distributed.agree(torch.stack(losses).sum(), self.should_stop())
        loss_value, stops, grad_norm = _read_on_host(loss_mean, stops, grad_norm)
        self._stop_agreed = stops > 0
        self.state.samples_seen += self._samples_per_step()
        finite = math.isfinite(loss_value) and (self.scaler is not None or math.isfinite(grad_norm))
        if not finite:
            self._skip_nonfinite(loss_value, grad_norm)
            return StepResult(loss_value, grad_norm, applied=False)
        self._apply_update()
        self.state.step += 1
        self.state.last_loss = loss_value
        if self.state.best_loss is None or loss_value < self.state.best_loss:
            self.state.best_loss = loss_value
        return StepResult(loss_value, grad_norm, applied=True)

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _apply_update(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if hasattr(self.objective, "after_step"):
            self.objective.after_step()
        if self.ema is not None:
            self.ema.update(self.named_trainable(), self.state.step + 1)

    def _skip_nonfinite(self, loss: float, grad_norm: float) -> None:
        """Drop the update; past the allowed count, stop with exit 4."""
        self.optimizer.zero_grad(set_to_none=True)
        self.state.nonfinite_steps += 1
        self.metrics.write("nonfinite_step", step=self.state.step, loss=_json_float(loss),
                           grad_norm=_json_float(grad_norm), count=self.state.nonfinite_steps)
        self.log.warning("nonfinite_step_skipped", step=self.state.step, loss=loss,
                         grad_norm=grad_norm, count=self.state.nonfinite_steps,
                         allowed=self.cfg.train.max_nonfinite_steps)
        if self.state.nonfinite_steps > self.cfg.train.max_nonfinite_steps:
            last = self.checkpoints.latest()
            raise DivergedError(
                f"training diverged: {self.state.nonfinite_steps} steps with a NaN/inf loss or "
                f"gradient (train.max_nonfinite_steps = {self.cfg.train.max_nonfinite_steps})",
                f"{divergence_fix(self.cfg, self.device)}; the last good checkpoint is "
                f"{last.path if last else 'none (no checkpoint was written)'}")

    def _next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch in the data order, moving to the next epoch when one ends; the
        batch after it is read from the caches while the device runs this one (only the
        reading: the position and the dropout draws move here, as without the read-ahead)."""
        epoch, index = self._next_position()
        self.state.epoch, self.state.batch_in_epoch = epoch, index + 1
        samples = self._rank_samples(epoch, index)
        p = self.cfg.train.caption_dropout_probability
        drops = (distributed.rand(len(samples), self.rng.dropout) < p).tolist()
        batch = self.batches.load(samples, drops)
        self.batches.prefetch(self._rank_samples(*self._next_position()))
        return batch

    def _next_position(self) -> tuple[int, int]:
        """(epoch, batch index) of the batch `_next_batch` takes next."""
        if self.state.batch_in_epoch >= self.sampler.num_batches_per_epoch():
            return self.state.epoch + 1, 0
        return self.state.epoch, self.state.batch_in_epoch

    def _rank_samples(self, epoch: int, index: int) -> list[Sample]:
        """This rank's slice of the global batch at (epoch, index)."""
        indices = self._batches_of_epoch(epoch)[index]
        per_rank, rank = self.cfg.train.batch_size, self.topology.rank
        return [self.data.train[i] for i in indices[rank * per_rank:(rank + 1) * per_rank]]

    def _batches_of_epoch(self, epoch: int) -> list[list[int]]:
        if self._epoch_batches is None or self._epoch_batches[0] != epoch:
            self._epoch_batches = (epoch, self.sampler.batches_for_epoch(epoch))
        return self._epoch_batches[1]

    def _log_step(self, result: StepResult, samples_per_s: float) -> None:
        row = {"step": self.state.step, "epoch": self.state.epoch, "loss": result.loss,
               "lr": self.lr_scheduler.get_last_lr()[0], "grad_norm": _json_float(result.grad_norm),
               "samples_seen": self.state.samples_seen, "samples_per_s": round(samples_per_s, 4)}
        if self.device.type == "cuda":  # since training began (setup_peak_gib: before)
            row["peak_gpu_memory_gib"] = gpu_peak_gib(self.device)
        self.metrics.write("train", **row)
        self.log.info("step", **row)

    def ema_weights(self):
        """Context with the EMA weights swapped in (a no-op without EMA)."""
        if self.ema is None:
            return nullcontext()
        return self.ema.swapped_in(self.named_trainable())


def _read_on_host(*values: torch.Tensor) -> list[float]:
    """Scalars as floats in one copy to the host: each read waits for the device to finish
    its queued work, so a step reads once. Values already on the CPU (the stop flag of one
    process; clip_grad_norm_'s zero when no parameter has a gradient) join the first value's
    device through pinned memory, without a sync of their own. The promoted dtype holds
    each value exactly."""
    dtype = functools.reduce(torch.promote_types, [v.dtype for v in values])
    device = values[0].device
    return torch.stack([(v if v.device == device else distributed.to_device(v, device))
                        .to(dtype) for v in values]).tolist()


def divergence_fix(cfg, device: torch.device) -> str:
    """What to change when training diverges; with fp32 attention through fp16 inputs
    (fp32_attention = "fp16_flash" on a GPU), that setting too."""
    from job.speedups.attention import fp16_flash_applies

    fix = "lower the learning rate, set max_grad_norm, or use bf16"
    if cfg.speedups.fp32_attention == "fp16_flash" and fp16_flash_applies(cfg) \
            and device.type == "cuda":
        fix += (' (or speedups.fp32_attention = "sdpa": this job\'s fp32 attention takes fp16 '
                "inputs, and a query or key beyond 65504 overflows)")
    return fix


def gpu_peak_gib(device: torch.device | None = None) -> float:
    """The CUDA device's allocation peak since its last reset, GiB, to the MiB."""
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def _json_float(value: float) -> float | str:
    """JSON has no NaN/inf: write them as strings."""
    return value if math.isfinite(value) else str(value)
