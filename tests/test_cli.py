"""The real CLI on the shipped smoke job, as a container or `make smoke` runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from job.metrics import validate_summary

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_smoke_job_through_the_cli(tmp_path: Path) -> None:
    env = {**os.environ, "TUNEJOB_DATA": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "job", "run", "jobs/smoke.toml"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "output" / "smoke"
    summary = json.loads((out / "summary.json").read_text())
    validate_summary(summary)
    assert summary["status"] == "succeeded" and summary["steps_done"] == 30
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "validation" / "step-000030" / "grid.png").is_file()
    # Not a terminal: every log line is one JSON object, progress included.
    events = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    names = {e["event"] for e in events}
    assert {"preflight", "data_ready", "progress", "step", "checkpoint_saved"} <= names

    again = subprocess.run([sys.executable, "-m", "job", "run", "jobs/smoke.toml",
                            "--set", "job.name=smoke2"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    ready = [json.loads(line) for line in again.stderr.splitlines() if '"data_ready"' in line]
    assert ready[0]["encoded_latents"] == 0 and ready[0]["encoded_captions"] == 0
