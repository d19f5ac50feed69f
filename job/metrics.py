"""metrics.jsonl rows, summary.json, and the atomic JSON writes both rely on."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SUMMARY_SCHEMA = Path(__file__).resolve().parent / "schemas" / "summary.schema.json"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file, fsync, rename: readers never see a half file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class MetricsWriter:
    """Appends one JSON object per logged step or event to metrics.jsonl."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled

    def write(self, event: str, **fields: Any) -> None:
        """Append a row (flushed at once, so a kill loses at most this row)."""
        if not self.enabled:
            return
        row = {"event": event, "time": round(time.time(), 3), **fields}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")


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
