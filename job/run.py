"""The lifecycle of a run (DESIGN.md), as a short sequence of calls."""

from __future__ import annotations

import os
import shutil
import sys
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import torch

from job.config import JobConfig
from job.distill import build_objective, with_method_defaults
from job.errors import EXIT_PREEMPTED, ConfigError, JobError, PeerLost, Preempted, ensure_writable
from job.log import get_logger, quiet_libraries, set_log_rank
from job.atomic import build_folder, write_text_atomic
from job.metrics import MetricsWriter, Summary, retire_summary, versions
from job.model_card import write_model_card
from job.outcome import (finish_summary, record_crash, record_failure, record_forced_stop,
                         volume_full)
from job.models.registry import family_class, spec_for
from job.signals import ForcedStop, StopSignal
from job.train.distributed import (Topology, broadcast_flag, close_process_group, launched_rank,
                                   set_topology)
from job.toml_out import dumps


class Phases:
    """Wall time per lifecycle phase."""

    def __init__(self) -> None:
        self.seconds = {"load": 0.0, "cache": 0.0, "train": 0.0, "validation": 0.0}
        self.start = time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a block into `name`."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started

    def totals(self) -> dict[str, float]:
        """Rounded seconds, total included."""
        out = {k: round(v, 3) for k, v in self.seconds.items()}
        out["total"] = round(time.perf_counter() - self.start, 3)
        return out


def run_job(cfg: JobConfig, warnings: list[str] = ()) -> int:
    """Run a validated job to its end; return the exit code. summary.json is always written."""
    log = get_logger()
    quiet_libraries()
    cfg, method_notes = with_method_defaults(cfg)
    warnings = [*warnings, *method_notes]
    out = ensure_writable(Path(cfg.output_path()), "job.output_dir")
    # Rank 0 writes the shared outputs; the launcher (accelerate, torchrun) sets RANK.
    main = launched_rank() == 0
    if main:  # the last attempt's summary would read as this run's until this one ends
        retire_summary(out)
    metrics = MetricsWriter(out / "metrics.jsonl", enabled=main)
    spec = spec_for(cfg.model.family)
    summary = Summary(cfg.job.name, spec.name, cfg.model.flavour or spec.default_flavour,
                      notes=list(warnings), versions=versions())
    for note in warnings:
        log.warning("setting_note", note=note)
    phases, stop = Phases(), StopSignal(cfg.job.preemption_grace_s).install()
    live, failure, finished = LiveRun(), None, False
    try:
        # The inner handlers may themselves be cut short by a second Ctrl-C (ForcedStop),
        # e.g. while writing the preemption checkpoint; the outer one catches that too.
        try:
            if main:  # inside the try: a full volume here still ends with a summary and code
                write_text_atomic(out / "job.resolved.toml", dumps(cfg.model_dump(mode="json")))
            metrics.write("start", job=cfg.job.name, family=spec.name, versions=summary.versions)
            _run(cfg, out, metrics, phases, stop, summary, live)
            summary.status, summary.exit_code = "succeeded", 0
            finished = True
        except Preempted as err:
            _on_preempted(live.trainer, stop, summary, err)
        except JobError as err:
            failure = record_failure(summary, err)
        except Exception as err:  # noqa: BLE001 - anything else is exit 1, retried
            if stop.forced:  # a library turned the ForcedStop into its own error
                raise ForcedStop(str(err)) from err
            failure = record_crash(summary, err, [out, Path(cfg.cache.dir)])
    except ForcedStop:
        stop.can_force = False
        record_forced_stop(summary, live.trainer)
    finally:
        # Before the summary (job_finished stays the log's last line, its time covers every
        # rank's end) and with the signal handlers on (a stop ends the wait).
        try:
            close_process_group(finished, cfg.distributed.timeout_s, stop.should_stop)
        except ForcedStop:
            pass  # the outcome stands; this rank stops waiting for the others
        stop.can_force = False
    try:
        # Our handlers stay on while the summary is written: a Ctrl-C now only notes itself
        # (Python's own would raise KeyboardInterrupt and leave no summary.json).
        finish_summary(summary, live.trainer, phases.totals(), out, metrics, main)
    finally:
        stop.uninstall()
    if failure is not None:
        # The run ends with the same paragraph as a refused job file (cli.py): what, where,
        # and the fix, readable after the JSON log lines.
        print(f"tunejob: {failure}", file=sys.stderr, flush=True)
    return summary.exit_code


class LiveRun:
    """What exists of the run so far, for the summary and the preemption handler."""

    trainer = None


def _run(cfg: JobConfig, out: Path, metrics: MetricsWriter, phases: Phases, stop: StopSignal,
         summary: Summary, live: LiveRun) -> None:
    """Load, cache, resume, train, validate, export."""
    with phases.phase("load"):
        device, dtype = preflight(cfg, out)
        from job.speedups.compile import AUTO_SETTINGS

        summary.speedups = {key: getattr(cfg.speedups, key) for key in AUTO_SETTINGS}
        # Imported after preflight, which should answer in seconds: these pull in
        # diffusers and torchvision.
        from job.data.prepare import prepare_data
        from job.speedups import apply_speedups
        from job.train.loop import Trainer
        from job.validate import Validator

        # Torch's global stream initialises the LoRA weights and drives LoRA dropout; it is
        # seeded here and saved in checkpoints, so runs and resumes repeat exactly.
        torch.manual_seed(cfg.train.seed)
        family = family_class(cfg.model.family)(cfg, device, dtype)
        family.load()
        apply_speedups(cfg, family)
    with phases.phase("cache"):
        data = prepare_data(cfg, family, stop.should_stop)
        metrics.write("data_ready", train_samples=len(data.train), eval_samples=len(data.eval),
                      eval_source=data.eval_source, skipped=len(data.skipped),
                      encoded_latents=data.encoded["latents"],
                      encoded_captions=data.encoded["captions"])
        if stop.should_stop():
            raise Preempted("stopped by signal while caching; finished entries are kept",
                            "the next run continues caching where this one stopped")
        family.unload_encoders()
    objective = _prepare_denoiser(cfg, family, device)
    sharded = cfg.distributed.strategy == "fsdp2"
    # Sharded: every rank samples (rank 0's stop answer for all, so all stop together).
    agreed_stop = (lambda: broadcast_flag(stop.should_stop(), device)) if sharded \
        else stop.should_stop
    validator = Validator(cfg, family, data, out, metrics, device, agreed_stop,
                          getattr(objective, "eval_loss", None), writes=launched_rank() == 0)
    trainer = Trainer(cfg, family, data, out, metrics, stop.should_stop,
                      lambda step: _validate(trainer, validator, step), device, objective)
    live.trainer = trainer
    trainer.check_disk_space()
    if trainer.resume() is not None:
        with phases.phase("validation"):
            _redo_interrupted_validation(cfg, trainer, validator, device, sharded)
    before = validator.seconds
    with phases.phase("train"):
        trainer.train()
    # Validation during training is timed inside the train phase: moved to its own.
    phases.seconds["train"] -= validator.seconds - before
    phases.seconds["validation"] += validator.seconds - before
    written = trainer.checkpoints.written()
    if not written or written[-1].step != trainer.state.step:
        trainer.save_checkpoint()
    with phases.phase("validation"):
        _validate(trainer, validator, trainer.state.step)
    if agreed_stop():
        raise Preempted("stopped by signal after training; the final checkpoint is written",
                        "the next run resumes at the last step and validates and exports")
    # final/ is written whole under a temp name and swapped in: a kill mid-export leaves the
    # earlier final/ (or none), never a truncated file or a mix of two exports' shards.
    final = out / "final"
    if not trainer.topology.main:
        _export(trainer, family, final)  # writes nothing here; gathers shards if sharded
        return

    def build(staging: Path) -> list[Path]:
        paths = _export(trainer, family, staging)
        write_model_card(cfg, staging, trainer)
        return [path.relative_to(staging) for path in paths]

    written = build_folder(final, build, lambda err: volume_full(err, [out]))
    summary.final_weights = [str(final / path) for path in written]
    summary.images = validator.images
    summary.eval_loss = validator.last_eval_loss


def _prepare_denoiser(cfg: JobConfig, family, device: torch.device):
    """The trained denoiser's set-up after caching, in its order: LoRA, float8 base, group
    offload, the objective (a distillation may replace the denoiser), the fp32 attention
    kernel, regional compile, FSDP2 sharding. Returns the objective."""
    if cfg.model.model_type == "lora":
        family.add_lora()
    if cfg.speedups.fp8_base_matmuls:
        # After the LoRA exists: its base layers are the ones replaced.
        from job.speedups.float8 import apply_float8_base

        apply_float8_base(family.denoiser(), cfg.model.family)
    if cfg.speedups.enable_group_offload:
        # After the LoRA exists: the groups are narrowed to the frozen weights.
        from job.speedups.offload import apply_group_offload

        apply_group_offload(family.denoiser(), cfg.speedups, device)
    objective = build_objective(cfg, family, device)
    if cfg.speedups.fp32_attention == "fp16_flash":
        from job.speedups.attention import apply_fp16_flash_attention, fp16_flash_applies

        if fp16_flash_applies(cfg):  # elsewhere check_rules' note said why it is ignored
            # The trained denoiser, and the other copies a full LCM student runs in fp32 (its
            # EMA target, the frozen teacher), so all of them attend alike.
            models = (family.denoiser(), getattr(objective, "target", None),
                      getattr(family, "teacher_unet", None))
            if not apply_fp16_flash_attention(*(m for m in models if m is not None)):
                # It warned why; the divergence hint must not name a kernel that never ran.
                cfg.speedups.fp32_attention = "sdpa"
    if cfg.speedups.compile_blocks:
        # After the LoRA and any distillation student exist: the graphs include them.
        from job.speedups.compile import apply_regional_compile, cuda_graphs_off_because

        off = cuda_graphs_off_because(cfg, device)
        if off and cfg.speedups.cuda_graphs:
            get_logger().info("speedup_skipped", speedup="cuda_graphs", reason=off)
        train = cfg.train
        apply_regional_compile(family.denoiser(), cuda_graphs=off is None,
                               recompute_inside=train.gradient_checkpointing_ratio
                               if train.gradient_checkpointing else 0.0,
                               memory_budget=train.activation_memory_budget)
    if cfg.distributed.strategy == "fsdp2":
        # Last: the compiled blocks are the units sharded, and the optimizer (built next,
        # by the Trainer) holds the sharded parameters.
        from job.train.fsdp import apply_fsdp2

        apply_fsdp2(family.denoiser(), device)
    return objective


def _export(trainer, family, folder: Path) -> list[Path]:
    """The final weights (the EMA weights with EMA), written by rank 0; [] on the others. A
    sharded denoiser is first gathered into rank 0's CPU memory by every rank, and exported
    from an unsharded copy."""
    main = trainer.topology.main
    if not trainer.sharded:
        if not main:
            return []  # every rank holds the same weights
        with trainer.ema_weights():
            return family.save_final(folder)
    from job.train import fsdp

    with trainer.ema_weights():
        weights = fsdp.gather_full_weights(family.denoiser())
    if not main:
        return []
    with family.swapped_denoiser(fsdp.unsharded_copy(family.denoiser(), weights)):
        return family.save_final(folder)


def _redo_interrupted_validation(cfg: JobConfig, trainer, validator, device: torch.device,
                                 sharded: bool) -> None:
    """A checkpoint is written before its step's validation: a run killed while validating
    resumes after it, so the images of that step are made now (rank 0's reading of the
    folder decides for every rank when all of them sample)."""
    step, every = trainer.state.step, cfg.validation.step_interval
    if not every or step % every or step >= trainer.total_steps:
        return  # not a validation step, or the final validation follows anyway
    missing = validator.images_missing(step)
    if sharded:
        missing = broadcast_flag(missing, device)
    if missing:
        get_logger().info("validation_redone", step=step,
                          reason="the last run stopped before this step's images were written")
        _validate(trainer, validator, step)


def _validate(trainer, validator, step: int) -> None:
    """Validation with the EMA weights when asked for. Rank 0 alone when every rank holds
    the whole model (the others go on to the next step's all-reduce and wait there, within
    distributed.timeout_s); every rank when sharded (rank 0 writes)."""
    if not (trainer.topology.main or trainer.sharded):
        return
    use_ema = trainer.cfg.train.use_ema and trainer.cfg.validation.use_ema
    with trainer.ema_weights() if use_ema else _no_swap():
        validator.run(step)


@contextmanager
def _no_swap() -> Iterator[None]:
    yield


def preflight(cfg: JobConfig, out: Path) -> tuple[torch.device, torch.dtype]:
    """Dataset, device and disk checks before anything heavy; returns (device, frozen weight
    dtype)."""
    from accelerate import PartialState

    from job.data.discovery import check_present

    for ds in cfg.enabled_datasets():
        if not ds.synthetic_images:  # else a missing or empty folder is filled later
            check_present(ds)

    wants = cfg.job.device
    if wants == "cuda" and not torch.cuda.is_available():
        raise ConfigError('job.device = "cuda" but no CUDA GPU is visible',
                          'run with --gpus all (docker) or set job.device = "auto"')
    # accelerate owns the process topology (it reads what `accelerate launch` set up) and
    # picks this process's device.
    # A timed-out NCCL collective then raises in this thread (PeerLost: exit 143) instead of
    # NCCL's watchdog aborting the process (not verified on GPUs yet; gloo raises anyway).
    os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
    state = PartialState(cpu=wants == "cpu" or not torch.cuda.is_available(),
                         timeout=timedelta(seconds=cfg.distributed.timeout_s))
    if cfg.distributed.strategy == "fsdp2" and state.num_processes < 2:
        raise ConfigError('distributed.strategy = "fsdp2" shards the model over processes, and '
                          "this run has one", "launch several processes (the image does on a "
                          "machine with several GPUs: accelerate launch --num_processes N), or "
                          'use strategy = "ddp" on one GPU; a sharded checkpoint resumes under '
                          "either")
    if state.num_processes > 1:
        set_topology(Topology(state.process_index, state.num_processes))
        set_log_rank(state.process_index)
    device = state.device
    free = shutil.disk_usage(out).free
    if free < 256 * 2**20:
        raise ConfigError(f"only {free / 2**20:.0f} MiB free under {out}",
                          "free space on the output volume or point job.output_dir elsewhere")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[
        cfg.train.mixed_precision]
    # What the speedups need of the machine, before caching spends time.
    if cfg.speedups.fp8_base_matmuls:
        from job.speedups.float8 import check_device

        check_device(device)
    from job.speedups.compile import resolve_auto, use_compile_cache

    resolve_auto(cfg, device)
    use_compile_cache(cfg)
    get_logger().info("preflight", device=str(device), weight_dtype=str(dtype),
                      processes=state.num_processes, rank=state.process_index,
                      free_disk_gib=round(free / 2**30, 2),
                      gpu=torch.cuda.get_device_name(0) if device.type == "cuda" else None)
    return device, dtype


def _on_preempted(trainer, stop: StopSignal, summary: Summary, err: Preempted) -> None:
    """Checkpoint if its measured write time fits the grace left; else keep the last one."""
    log = get_logger()
    summary.status, summary.exit_code = "preempted", EXIT_PREEMPTED
    if trainer is None:
        log.warning("preempted", during="startup or caching", detail=err.message)
        return
    if isinstance(err, PeerLost):
        summary.notes.append(err.message)
        log.warning("preempted", step=trainer.state.step, checkpoint="skipped",
                    reason=err.message)
        return
    written = trainer.checkpoints.written()
    last = written[-1] if written else None
    if last is not None and last.step == trainer.state.step:
        log.warning("preempted", step=trainer.state.step, checkpoint="already written")
        return
    left = stop.seconds_left()
    budget = checkpoint_time_budget(trainer)
    fits = budget + EXIT_RESERVE_S < left
    if trainer.sharded:
        # Every rank writes a part of a sharded checkpoint, so all follow rank 0's answer.
        fits = broadcast_flag(fits, trainer.device)
    if fits:
        trainer.save_checkpoint()
        log.warning("preempted", step=trainer.state.step, checkpoint="written",
                    grace_left_s=round(stop.seconds_left(), 2))
    else:
        note = (f"no checkpoint written at preemption: it takes about {budget:.1f}s and "
                f"{left:.1f}s of grace were left; the last periodic one is "
                f"{last.path if last else 'none'}")
        summary.notes.append(note)
        log.warning("preempted", step=trainer.state.step, checkpoint="skipped", reason=note)


# Grace kept for what follows the checkpoint: summary.json, log flush, process exit.
EXIT_RESERVE_S = 0.3


def checkpoint_time_budget(trainer) -> float:
    """Seconds a checkpoint write may take: the last measured write with a 50% margin, or,
    before any was measured, its size at a pessimistic 100 MB/s."""
    if trainer.last_checkpoint_s is not None:
        return trainer.last_checkpoint_s * 1.5 + 0.25
    return trainer.estimated_checkpoint_bytes() / 100e6 + 0.25
