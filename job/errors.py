"""Errors that end a job, each with the exit code a scheduler acts on (DESIGN.md)."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from job.signals import ForcedStop

EXIT_SUCCEEDED = 0
EXIT_OTHER = 1
EXIT_BAD_JOB = 2
EXIT_DATA = 3
EXIT_DIVERGED = 4
EXIT_PREEMPTED = 143


class JobError(Exception):
    """A failure the job explains itself: a message, a hint, and an exit code."""

    exit_code = EXIT_OTHER

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  fix: {self.hint}" if self.hint else self.message


class ConfigError(JobError):
    """The job file or its inputs are wrong; retrying cannot help."""

    exit_code = EXIT_BAD_JOB


class DataError(JobError):
    """A data problem found at run time (nothing readable, no bucket)."""

    exit_code = EXIT_DATA


class DivergedError(JobError):
    """Too many non-finite losses or gradients; the last good checkpoint is kept."""

    exit_code = EXIT_DIVERGED


class Preempted(JobError):
    """SIGTERM/SIGINT arrived; the job stopped at a safe point."""

    exit_code = EXIT_PREEMPTED


class PeerLost(Preempted):
    """A collective failed or timed out: another process of the job is gone. The step in
    flight is abandoned, so no checkpoint is written; the retry resumes from the last
    periodic one."""


class DiskFullError(JobError):
    """The output volume filled up while writing; earlier checkpoints are intact."""

    exit_code = EXIT_OTHER


def ensure_writable(folder: Path, key: str) -> Path:
    """Create `folder` (with its parents) and prove a file can be written in it. A refusal by
    the OS (permissions, a read-only mount, a file in the way) is exit 2 naming the folder,
    the setting that put it there and the fix, before anything is loaded."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # A unique name: ranks on other hosts (own PID namespaces) may probe the same folder.
        handle, probe = tempfile.mkstemp(prefix=".tunejob-write-probe-", dir=folder)
        os.close(handle)
        Path(probe).unlink(missing_ok=True)
    except OSError as err:
        raise ConfigError(f"{key}: cannot write to {str(folder)!r} "
                          f"({type(err).__name__}: {err.strerror or err})",
                          f"mount a writable volume there (docker run -v HOST_DIR:/data; with "
                          f"--user, the host folder must belong to that user) or point {key} "
                          f"at a writable folder") from None
    return folder


# Below this much free space a failed write is taken as a full disk even when the error
# does not say so: torch.save raises RuntimeError("... file write failed" / "unexpected
# pos"), torch.distributed.checkpoint a CheckpointException, neither an OSError(ENOSPC).
NEARLY_FULL_BYTES = 64 * 2**20
# What an error of a failed write says (other errors, say CUDA out of memory, never count).
_WRITE_WORDS = ("write", "serializ", "file", "ioerror", "unexpected pos", "storage")


def disk_was_full(err: BaseException, *folders: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC (or its text) anywhere in the error's
    chain or inside a sharded checkpoint's per-rank failures; or an error of a write with
    less than NEARLY_FULL_BYTES free in one of `folders` (call this before removing partial
    files). A signal's or a lost peer's exception is never a full disk."""
    seen: set[int] = set()
    todo, texts = [err], []
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        texts.append(str(e))
        if "No space left on device" in texts[-1] or "os error 28" in texts[-1]:
            return True
        failures = getattr(e, "failures", None)  # DCP's CheckpointException: rank -> (err, tb)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [e.__cause__, e.__context__]
    if isinstance(err, (JobError, KeyboardInterrupt, SystemExit, ForcedStop)):
        return False
    said = " ".join(texts).lower()
    if "out of memory" in said or not (isinstance(err, OSError)
                                       or any(word in said for word in _WRITE_WORDS)):
        return False
    for folder in folders:
        try:
            while not folder.exists():
                folder = folder.parent
            if shutil.disk_usage(folder).free < NEARLY_FULL_BYTES:
                return True
        except OSError:
            continue
    return False
