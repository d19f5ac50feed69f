"""structlog setup and progress reporting: readable on a TTY, JSON lines otherwise."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, TextIO

import structlog


_RANK: int | None = None


def set_log_rank(rank: int) -> None:
    """Tag every line with this process's rank; ranks other than 0 log warnings and errors
    only (rank 0 tells the run's story once)."""
    global _RANK
    _RANK = rank
    if rank != 0:
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def _add_rank(logger: Any, method: str, event: dict) -> dict:
    if _RANK is not None:
        event["rank"] = _RANK
    return event


def setup_logging(stream: TextIO | None = None, json_lines: bool | None = None) -> Any:
    """Configure structlog and return the job's logger. Without `stream`, each line goes to
    whatever sys.stderr is when it is written (so a replaced stderr never holds a closed one)."""
    if json_lines is None:
        json_lines = not (stream or sys.stderr).isatty()
    renderer = (structlog.processors.JSONRenderer() if json_lines
                else structlog.dev.ConsoleRenderer(colors=False))
    # Read by people: floats at 4 significant digits (JSON lines keep every digit).
    shorten = [] if json_lines else [_short_floats]
    structlog.configure(
        processors=[structlog.processors.add_log_level, _add_rank,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    *shorten, renderer],
        logger_factory=lambda *args: _LineWriter(stream, clear_line=not json_lines),
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        cache_logger_on_first_use=False,
    )
    return structlog.get_logger("tunejob")


def _short_floats(logger: Any, method: str, event: dict) -> dict:
    """structlog processor: every float value (top level) at 4 significant digits."""
    return {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in event.items()}


class _LineWriter:
    """structlog's logger: one rendered line per event, flushed."""

    def __init__(self, stream: TextIO | None, clear_line: bool = False) -> None:
        self._stream, self._clear_line = stream, clear_line

    def msg(self, message: str) -> None:
        stream = self._stream or sys.stderr
        if self._clear_line and stream.isatty():
            # Return to the start of the line and clear it: a progress bar drawn there
            # (Progress on a readable log) gives way to the log line and is redrawn below.
            message = "\r\x1b[K" + message
        print(message, file=stream, flush=True)

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


def quiet_libraries() -> None:
    """Keep third-party progress bars and warnings out of the job's log stream.

    transformers and diffusers draw tqdm bars on stderr (noise in a JSON-lines log), and
    Python warnings print as free text; warnings become `python_warning` log events.
    """
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("transformers", "diffusers"):
        try:
            module = __import__(f"{name}.utils.logging", fromlist=["logging"])
        except ImportError:
            continue
        module.disable_progress_bar()
        module.set_verbosity_error()
    # torchao (the int8-torchao extra, imported by diffusers when installed) registers Enum
    # pytree constants, and torch logs a deprecation line for each in free text.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

    # The job passes from_pretrained's torch_dtype, which the whole supported diffusers range
    # (pyproject.toml) takes; 0.42 says it is deprecated in favour of dtype: not the user's news.
    warnings.filterwarnings("ignore", message="`torch_dtype` is deprecated",
                            category=FutureWarning)
    job_source = str(Path(__file__).resolve().parent)

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        # A SyntaxWarning is said while a module's source is compiled (a package installed
        # without bytecode, such as torchao's `'\\.'` escapes): about a library's source,
        # nothing the job's user can act on. The job's own are kept (and tests/test_log.py
        # compiles job/ with SyntaxWarnings as errors).
        if issubclass(category, SyntaxWarning) and not str(filename).startswith(job_source):
            return
        get_logger().warning("python_warning", category=category.__name__,
                             message=str(message), where=f"{filename}:{lineno}")

    warnings.showwarning = show


def _readable_log() -> bool:
    """Whether setup_logging chose the readable renderer (not JSON lines)."""
    return isinstance(structlog.get_config()["processors"][-1], structlog.dev.ConsoleRenderer)


def get_logger() -> Any:
    """The job's logger (configured by setup_logging)."""
    return structlog.get_logger("tunejob")


# The rate behind the ETA covers about the last minute of work, not the whole phase: its
# first units can be far slower than the rest (a first training step that compiles the
# blocks takes minutes at full size), and an average since the start would keep the ETA
# inflated long after.
RATE_WINDOW_S = 60.0


class Progress:
    """A bar with ETA on a TTY with a readable log; a `progress` event every `every_s`
    seconds otherwise. Its rate is over the last RATE_WINDOW_S seconds or more."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None,
                 every_s: float = 10.0) -> None:
        self.label, self.total, self.done = label, max(total, 0), 0
        self.stream = stream or sys.stderr
        # A bar only where the log is for reading (a TTY, not --json-logs): JSON lines stay
        # whole, so a JSON log gets progress events even on a terminal.
        self.tty = self.stream.isatty() and _readable_log()
        self.every_s = every_s
        self.start = self.last = time.monotonic()
        # (time, done) a second or more apart; the first is the newest one that is at least
        # RATE_WINDOW_S old (or the start), where the rate is measured from.
        self._marks: deque[tuple[float, int]] = deque([(self.start, 0)])

    def update(self, n: int = 1, **fields: Any) -> None:
        """Count `n` more units of work done."""
        self.done += n
        now = time.monotonic()
        if now - self._marks[-1][0] >= 1.0:
            self._marks.append((now, self.done))
        while len(self._marks) > 1 and now - self._marks[1][0] >= RATE_WINDOW_S:
            self._marks.popleft()
        if self.tty:
            self._draw(now, fields)
        elif now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            get_logger().info("progress", phase=self.label, done=self.done, total=self.total,
                              rate_per_s=round(self._rate(now), 3),
                              eta_s=round(self._eta(now), 1), **fields)

    def close(self) -> None:
        """End the bar's line on a TTY."""
        if self.tty and self.total:
            self.stream.write("\n")
            self.stream.flush()

    def _rate(self, now: float) -> float:
        since, done_then = self._marks[0]
        return (self.done - done_then) / max(now - since, 1e-9)

    def _eta(self, now: float) -> float:
        rate = self._rate(now)
        return (self.total - self.done) / rate if rate > 0 else 0.0

    def _draw(self, now: float, fields: dict[str, Any]) -> None:
        width = 30
        filled = int(width * self.done / self.total) if self.total else width
        eta = time.strftime("%H:%M:%S", time.gmtime(self._eta(now)))
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        self.stream.write(f"\r{self.label:>8} [{'#' * filled}{'.' * (width - filled)}] "
                          f"{self.done}/{self.total} {self._rate(now):.2f}/s ETA {eta} {extra}")
        self.stream.flush()
