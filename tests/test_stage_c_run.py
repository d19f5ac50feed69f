"""End to end: jobs/stage_c.toml's settings (int8-torchao prior, adamw_bf16 on an fp32
prior, EMA, decoder validation) on the tiny Stage C, then resume; the adaptive loss
weight's state in checkpoints; the missing-effnet refusal."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableCascadePriorPipeline
from safetensors.torch import load_file

from job.cli import main
from job.jobfile import load_job
from job.metrics import validate_summary
from job.run import run_job
from stage_c_helpers import prior_folder

ROOT = Path(__file__).resolve().parent.parent


def stage_c_job(tmp_path: Path, *overrides: str):
    """jobs/stage_c.toml on the tiny model, on the CPU, at 64 px and a few steps."""
    return load_job(ROOT / "jobs" / "stage_c.toml", job_overrides(tmp_path, *overrides))


def job_overrides(tmp_path: Path, *overrides: str) -> list[str]:
    """The --set items of stage_c_job."""
    base = [f"job.output_dir={json.dumps(str(tmp_path / 'out'))}",
            f"model.hub_cache_dir={json.dumps(str(tmp_path / 'models'))}",
            f"cache.dir={json.dumps(str(tmp_path / 'cache'))}",
            f"datasets.0.instance_data_dir={json.dumps(str(tmp_path / 'data'))}",
            'model.flavour="tiny"', 'job.device="cpu"', "datasets.0.synthetic_images=4",
            "datasets.0.resolution=64", "datasets.0.aspect_bucket_alignment=32",
            'datasets.0.bucket_resolutions=["64x64", "64x96", "96x64"]',
            "train.batch_size=2", "train.gradient_accumulation_steps=1",
            "train.max_train_steps=4", "train.log_every=1", "train.gradient_checkpointing=false",
            "optimizer.learning_rate=1e-3", "optimizer.lr_warmup_steps=0",
            "checkpoint.step_interval=2", "validation.step_interval=4",
            'validation.resolution="64x64"', "validation.num_inference_steps=2",
            "stable_cascade.validation_prior_num_inference_steps=2",
            'stable_cascade.decoder_subfolder="decoder_lite"', "validation.eval_split=0.25"]
    return base + list(overrides)


def rows(out: Path, event: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def test_stage_c_job_trains_validates_resumes_and_exports(tmp_path: Path) -> None:
    pytest.importorskip("torchao", reason="jobs/stage_c.toml quantises with torchao")
    cfg, warnings = stage_c_job(tmp_path)
    assert cfg.train.mixed_precision == "no" and cfg.optimizer.name == "adamw_bf16"
    assert any("quantises the Stage C prior" in w for w in warnings)
    assert run_job(cfg) == 0
    out = Path(cfg.output_path())
    summary = json.loads((out / "summary.json").read_text())
    validate_summary(summary)
    assert summary["status"] == "succeeded" and summary["family"] == "stable_cascade"
    assert summary["steps_done"] == 4 and summary["eval_loss"] is not None
    losses = [r["loss"] for r in rows(out, "train")]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert any(Path(p).name == "grid.png" for p in summary["images"])
    checkpoint = out / "checkpoints" / "step-000004"
    assert (checkpoint / "ema.pt").is_file()
    adapter = load_file(str(checkpoint / "trainable.safetensors"))
    assert adapter and all(v.dtype == torch.bfloat16 for v in adapter.values())

    cfg, _ = stage_c_job(tmp_path, "train.max_train_steps=6")
    assert run_job(cfg) == 0
    resumed = rows(out, "resumed")
    assert resumed and resumed[-1]["step"] == 4
    assert json.loads((out / "summary.json").read_text())["steps_done"] == 6
    snippet = runpy.run_path(str(out / "final" / "load_lora.py"))
    pipeline = snippet["load_prior_pipeline"](base=str(prior_folder(tmp_path / "models")))
    assert any("lora_A" in k for k in pipeline.prior.state_dict())

    # `tunejob export --merge`: a prior pipeline folder with the LoRA merged in.
    overrides = [a for item in job_overrides(tmp_path, "train.max_train_steps=6")
                 for a in ("--set", item)]
    assert main(["export", str(ROOT / "jobs" / "stage_c.toml"), *overrides, "--merge"]) == 0
    merged = StableCascadePriorPipeline.from_pretrained(str(out / "final-merged"))
    assert not any("lora_" in k for k in merged.prior.state_dict())
    assert main(["export", str(ROOT / "jobs" / "stage_c.toml"), *overrides, "--merge",
                 "--adapter", str(tmp_path / "nowhere")]) == 2


def test_adaptive_loss_weight_state_is_checkpointed_and_resumed(tmp_path: Path) -> None:
    cfg, _ = stage_c_job(tmp_path, 'stable_cascade.loss_weighting="adaptive"',
                         'speedups.base_model_precision="no_change"', "validation.enabled=false",
                         'optimizer.name="adamw"')
    assert run_job(cfg) == 0
    out = Path(cfg.output_path())
    state = load_file(str(out / "checkpoints" / "step-000004" / "objective.safetensors"))
    buckets = state["adaptive_loss_weight.bucket_losses"]
    assert (buckets != 1).sum() >= 1  # 8 samples were folded into their buckets

    from job.models.stable_cascade import StableCascadeFamily

    family = StableCascadeFamily(cfg, torch.device("cpu"), torch.float32)
    family.training_loss.load_state_dict(state)
    torch.testing.assert_close(family.adaptive_weight.bucket_losses, buckets)


def test_missing_effnet_weights_stop_the_job_with_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "effnet_encoder.safetensors"
    cfg, _ = stage_c_job(tmp_path, f"stable_cascade.effnet_encoder_path={json.dumps(str(missing))}",
                         'speedups.base_model_precision="no_change"', "validation.enabled=false")
    assert run_job(cfg) == 2
    summary = json.loads((Path(cfg.output_path()) / "summary.json").read_text())
    assert "effnet_encoder.safetensors" in summary["error"]["message"]
    assert str(missing) in summary["error"]["message"]


def test_too_little_space_for_the_text_cache_is_exit_2(tmp_path: Path, monkeypatch) -> None:
    import shutil
    from collections import namedtuple

    cfg, _ = stage_c_job(tmp_path, 'speedups.base_model_precision="no_change"',
                         "validation.enabled=false")
    real = shutil.disk_usage
    usage = namedtuple("usage", "total used free")

    def small_cache_volume(path):
        if str(path).startswith(str(tmp_path / "cache")):
            return usage(10**9, 10**9 - 4096, 4096)  # 4 KiB free: less than one entry
        return real(path)

    monkeypatch.setattr(shutil, "disk_usage", small_cache_volume)
    assert run_job(cfg) == 2
    summary = json.loads((Path(cfg.output_path()) / "summary.json").read_text())
    assert "missing text entries need about" in summary["error"]["message"]
    assert "KiB each" in summary["error"]["hint"] + summary["error"]["message"]


def test_full_fine_tune_exports_a_prior_pipeline_that_differs_from_the_base(
        tmp_path: Path) -> None:
    cfg, _ = stage_c_job(tmp_path, 'model.model_type="full"', 'optimizer.name="adamw"',
                         'speedups.base_model_precision="no_change"', "train.use_ema=false",
                         "validation.enabled=false", "train.max_train_steps=3")
    assert run_job(cfg) == 0
    final = Path(cfg.output_path()) / "final"
    trained = StableCascadePriorPipeline.from_pretrained(str(final)).prior.state_dict()
    base = StableCascadePriorPipeline.from_pretrained(
        str(prior_folder(tmp_path / "models"))).prior.state_dict()
    assert trained.keys() == base.keys()
    assert any(not torch.equal(trained[k], base[k]) for k in base)
