"""How a run ended: the failure recorded in the summary and the log, summary.json written
whatever the end, and the closing `job_finished` event."""

from __future__ import annotations

import shutil
import traceback
from pathlib import Path

import torch

from job.atomic import write_json_atomic
from job.errors import EXIT_PREEMPTED, DiskFullError, JobError, disk_was_full
from job.log import get_logger
from job.metrics import MetricsWriter, Summary


def record_failure(summary: Summary, err: JobError) -> JobError:
    """A failure the job explains: its code, message and fix in the summary and the log."""
    summary.exit_code = err.exit_code
    summary.error = {"type": type(err).__name__, "message": err.message, "hint": err.hint}
    get_logger().error("job_failed", error=err.message, hint=err.hint, exit_code=err.exit_code)
    return err


def record_forced_stop(summary: Summary, trainer) -> None:
    """A second Ctrl-C cut the run short where it was (job/signals.py): preempted, exit 143,
    and no checkpoint, since a step cut midway is no state to save; the last complete one
    stays for the next run."""
    summary.status, summary.exit_code = "preempted", EXIT_PREEMPTED
    written = trainer.checkpoints.written() if trainer is not None else []
    step = trainer.state.step if trainer is not None else 0
    note = (f"stopped at once by a second SIGINT after step {step}: no checkpoint written; "
            f"the last one is {written[-1].path if written else 'none'}")
    summary.notes.append(note)
    get_logger().warning("preempted", step=step, checkpoint="skipped", reason=note)


def record_crash(summary: Summary, err: Exception, volumes: list[Path]) -> JobError | None:
    """Anything else: a full volume (whatever the writer raised) is a DiskFullError with the
    fix; the rest is exit 1 with its traceback, which a scheduler retries a bounded number
    of times. Returns the explained failure, if it is one."""
    if disk_was_full(err, *volumes):
        get_logger().info("disk_full_traceback", traceback=traceback.format_exc())
        return record_failure(summary, volume_full(err, volumes))
    summary.exit_code = 1
    summary.error = {"type": type(err).__name__, "message": str(err),
                     "hint": "see the traceback in the log; a retry may succeed if this "
                             "was out of memory or a driver fault"}
    get_logger().error("job_crashed", error=str(err), traceback=traceback.format_exc())
    return None


def volume_full(err: BaseException, volumes: list[Path]) -> DiskFullError:
    """A write that failed on a full volume (outside a checkpoint, which says more): the
    fullest of the job's volumes (output, caches), its free space and the fix."""
    free = {}
    for folder in volumes:
        try:
            free[folder] = shutil.disk_usage(folder).free
        except OSError:
            continue
    folder = min(free, key=free.get) if free else volumes[0]
    left = f"{free[folder] / 2**20:.1f} MiB free under {folder}" if free else str(folder)
    return DiskFullError(
        f"a volume of the job is full ({left}): {type(err).__name__}: {err}",
        "free space there (delete old runs' checkpoints, superseded-*/ folders under "
        "checkpoints/, or lower checkpoint.total_limit), or point job.output_dir or cache.dir "
        "at a larger volume, and run the job again: it resumes from the last complete "
        "checkpoint")


def finish_summary(summary: Summary, trainer, wall_time_s: dict[str, float], out: Path,
                   metrics: MetricsWriter, main: bool = True) -> None:
    """Fill the counters and write summary.json (atomically). A summary that cannot be
    written (a full volume) turns a success into exit 1: the run's record is incomplete,
    and the retry resumes at the last step and writes it."""
    summary.wall_time_s = wall_time_s
    if trainer is not None:
        s = trainer.state
        summary.steps_done, summary.samples_seen = s.step, s.samples_seen
        summary.final_loss, summary.best_loss = s.last_loss, s.best_loss
        summary.nonfinite_steps = s.nonfinite_steps
        summary.checkpoints = [str(c.path) for c in trainer.checkpoints.written()]
        if trainer.train_time_s > 0:
            summary.samples_per_second = round(
                trainer.samples_trained / trainer.train_time_s, 4)
    if torch.cuda.is_available():  # the whole job's: the setup's or training's, the higher
        from job.train.loop import gpu_peak_gib

        setup = trainer.setup_peak_gib if trainer is not None else None
        summary.peak_gpu_memory_gib = max(gpu_peak_gib(), setup or 0.0)
    log = get_logger()
    try:
        metrics.write("end", status=summary.status, exit_code=summary.exit_code)
    except OSError as err:  # the summary below is still worth a try
        log.error("metrics_not_written", error=f"{type(err).__name__}: {err}")
    if not main:
        return
    try:
        write_json_atomic(out / "summary.json", summary.to_dict())
    except OSError as err:
        if summary.exit_code == 0:
            summary.exit_code = 1
        log.error("summary_not_written", path=str(out / "summary.json"),
                  error=f"{type(err).__name__}: {err}", exit_code=summary.exit_code,
                  hint="free space on the output volume; a retry resumes at the last step "
                       "and writes it")
        return
    # The log's last word on the run, so `kubectl logs --tail 1` or a template's console
    # says how it ended and where to look without opening the volume.
    log.info("job_finished", status=summary.status, exit_code=summary.exit_code,
             steps_done=summary.steps_done, samples_per_second=summary.samples_per_second,
             wall_time_s=summary.wall_time_s["total"], summary=str(out / "summary.json"),
             final_weights=summary.final_weights)
