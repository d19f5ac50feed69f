"""Golden loss curve of the tiny SDXL LoRA: an accidental change of the math fails here.

The stored values come from this test with TUNEJOB_UPDATE_GOLDEN=1 on torch 2.14.1 (CPU).
Tolerance: 1e-3 relative per step. Float reductions on another CPU or torch build move the
numbers by about 1e-6; a changed noise schedule, target, loss weighting, optimizer or data
order moves them by far more than 1e-3 (see test_golden_curve_catches_a_changed_target).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from job.jobfile import load_job
from job.run import run_job

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden" / "sdxl_tiny_lora.json"
REL_TOL = 1e-3


def losses_of_tiny_run(tmp_path: Path, *extra: str) -> list[float]:
    overrides = [f"job.output_dir={json.dumps(str(tmp_path / 'out'))}",
                 f"model.hub_cache_dir={json.dumps(str(tmp_path / 'models'))}",
                 f"cache.dir={json.dumps(str(tmp_path / 'cache'))}",
                 f"datasets.0.instance_data_dir={json.dumps(str(tmp_path / 'data'))}",
                 "train.max_train_steps=8", "train.log_every=1", "validation.enabled=false",
                 "job.device=\"cpu\"",
                 "checkpoint.step_interval=100", "train.caption_dropout_probability=0.25",
                 *extra]
    cfg, _ = load_job(ROOT / "jobs" / "smoke.toml", overrides)
    assert run_job(cfg) == 0
    lines = (Path(cfg.output_path()) / "metrics.jsonl").read_text().splitlines()
    return [row["loss"] for row in map(json.loads, lines) if row["event"] == "train"]


def test_golden_loss_curve(tmp_path: Path) -> None:
    losses = losses_of_tiny_run(tmp_path)
    if os.environ.get("TUNEJOB_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"losses": losses}, indent=2) + "\n")
        pytest.skip("golden values rewritten")
    expected = json.loads(GOLDEN.read_text())["losses"]
    assert losses == pytest.approx(expected, rel=REL_TOL)


def test_golden_curve_catches_a_changed_target(tmp_path: Path) -> None:
    losses = losses_of_tiny_run(tmp_path, 'model.prediction_type="v_prediction"')
    expected = json.loads(GOLDEN.read_text())["losses"]
    assert losses != pytest.approx(expected, rel=REL_TOL)
