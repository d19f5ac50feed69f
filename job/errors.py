"""Errors that end a job, each with the exit code a scheduler acts on (DESIGN.md)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

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
