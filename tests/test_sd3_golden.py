"""Golden loss curve of the tiny SD3 LoRA: an accidental change of the flow-matching math
(sigma sampling, shift, noisy input, target, weighting) or of the text conditioning fails
here. Stored from this test with TUNEJOB_UPDATE_GOLDEN=1 on torch 2.14.1 (CPU), fp32, no
quantisation; 1e-3 relative tolerance per step, as for the SDXL curve."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from job.jobfile import load_job
from job.run import run_job

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden" / "sd3_tiny_lora.json"
REL_TOL = 1e-3


def losses_of_tiny_run(tmp_path: Path, *extra: str) -> list[float]:
    overrides = [f"job.output_dir={json.dumps(str(tmp_path / 'out'))}",
                 f"model.hub_cache_dir={json.dumps(str(tmp_path / 'models'))}",
                 f"cache.dir={json.dumps(str(tmp_path / 'cache'))}",
                 f"datasets.0.instance_data_dir={json.dumps(str(tmp_path / 'data'))}",
                 'model.flavour="tiny"', 'job.device="cpu"', "datasets.0.synthetic_images=4",
                 "datasets.0.resolution=64", "datasets.0.aspect_bucket_alignment=32",
                 "train.batch_size=2", "train.max_train_steps=8", "train.log_every=1",
                 'train.mixed_precision="no"', 'optimizer.name="adamw"',
                 "optimizer.learning_rate=1e-3", "optimizer.lr_warmup_steps=0",
                 "train.gradient_checkpointing=false", "train.caption_dropout_probability=0.25",
                 'speedups.base_model_precision="no_change"', "validation.enabled=false",
                 "checkpoint.step_interval=100", "validation.guidance_skip_layers=[1]",
                 *extra]
    cfg, _ = load_job(ROOT / "jobs" / "sd3.toml", overrides)
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


@pytest.mark.parametrize("change", ["sd3.flow_schedule_shift=3.0",
                                    'sd3.t5_uncond_behaviour="zero"'])
def test_golden_curve_catches_a_changed_setting(tmp_path: Path, change: str) -> None:
    losses = losses_of_tiny_run(tmp_path, change)
    expected = json.loads(GOLDEN.read_text())["losses"]
    assert losses != pytest.approx(expected, rel=REL_TOL)
