"""metrics.jsonl rows and summary.json."""

from __future__ import annotations

import errno
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from job.log import get_logger

SUMMARY_SCHEMA = Path(__file__).resolve().parent / "schemas" / "summary.schema.json"


def retire_summary(out: Path) -> None:
    """Rename the previous attempt's summary.json to summary.previous.json when a run starts:
    until this run ends, summary.json must not say how an earlier one ended."""
    try:
        os.replace(out / "summary.json", out / "summary.previous.json")
    except FileNotFoundError:
        pass


class MetricsWriter:
    """Appends one JSON object per logged step or event to metrics.jsonl."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled
        if enabled:
            _drop_torn_row(path)

    def write(self, event: str, **fields: Any) -> None:
        """Append a row in one write (a kill loses at most this row); a failed write (a full
        volume) is cut back off, so the file never holds half a row."""
        if not self.enabled:
            return
        row = {"event": event, "time": round(time.time(), 3), **fields}
        data = (json.dumps(row, sort_keys=True) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, "No space left on device (a short write)")
            except OSError:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)


def _drop_torn_row(path: Path) -> None:
    """Cut a row left half-written by a kill (no closing newline) off the end of the file, so
    that the next row starts a line of its own."""
    try:
        with open(path, "rb+") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size == 0:
                return
            fh.seek(max(0, size - 1))
            if fh.read(1) == b"\n":
                return
            start = max(0, size - (1 << 20))
            fh.seek(start)
            tail = fh.read()
            cut = start + tail.rfind(b"\n") + 1 if b"\n" in tail else start  # rows are small
            fh.truncate(cut)
    except FileNotFoundError:
        return
    get_logger().warning("metrics_row_dropped", path=str(path), bytes=size - cut,
                         reason="the last row was cut short (the process was killed while "
                                "writing it)")


@dataclass
class Summary:
    """What summary.json says about a run, whatever its end."""

    job_name: str
    family: str
    flavour: str
    status: str = "failed"
    exit_code: int = 1
    error: dict[str, str] | None = None
    steps_done: int = 0
    samples_seen: int = 0
    wall_time_s: dict[str, float] = field(default_factory=lambda: {
        "load": 0.0, "cache": 0.0, "train": 0.0, "validation": 0.0, "total": 0.0})
    samples_per_second: float | None = None
    peak_gpu_memory_gib: float | None = None
    final_loss: float | None = None
    best_loss: float | None = None
    eval_loss: float | None = None
    nonfinite_steps: int = 0
    checkpoints: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    final_weights: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # The "auto" speedups as decided on this machine (job/speedups/compile.py resolve_auto).
    speedups: dict[str, bool | str] = field(default_factory=dict)
    versions: dict[str, str | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def versions() -> dict[str, str | None]:
    """Versions of what ran: tunejob, torch, diffusers, CUDA and the GPU."""
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    from job import __version__

    out = {"tunejob": __version__, "torch": of("torch"), "diffusers": of("diffusers"),
           "transformers": of("transformers"), "peft": of("peft"), "cuda": None, "gpu": None}
    try:
        import torch

        out["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return out


def validate_summary(data: dict[str, Any]) -> None:
    """Check a summary against the shipped JSON Schema (needs the `jsonschema` package)."""
    import jsonschema

    schema = json.loads(SUMMARY_SCHEMA.read_text(encoding="utf-8"))
    jsonschema.validate(data, schema)
