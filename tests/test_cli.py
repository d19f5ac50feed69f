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


def test_validate_warns_of_a_dataset_folder_missing_here_without_importing_torch(
        tmp_path: Path) -> None:
    """validate checks the file (exit 0): a dataset folder missing on this machine is a
    warning naming the folder and the fix, since run and cache would stop there."""
    poisoned = tmp_path / "no-torch" / "torch"
    poisoned.mkdir(parents=True)
    (poisoned / "__init__.py").write_text("raise ImportError('validate imported torch')")
    env = {**os.environ, "TUNEJOB_DATA": str(tmp_path / "data"),
           "PYTHONPATH": str(tmp_path / "no-torch")}
    done = subprocess.run([sys.executable, "-m", "job", "validate", "jobs/sd3.toml"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    said = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    [missing] = [e for e in said if e["event"] == "dataset_not_found_here"]
    assert str(tmp_path / "data" / "datasets" / "photos") in missing["problem"]
    assert "mount the volume" in missing["fix"] and said[-1]["event"] == "job_valid"
