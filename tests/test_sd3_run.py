"""End to end: jobs/sd3.toml's settings (int8-torchao base, adamw_bf16, uniform schedule,
shift 1, skip-layer guidance) on the tiny SD3, then resume, then the stock pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from job.jobfile import load_job
from job.metrics import validate_summary
from job.models.registry import family_class
from job.run import run_job
from sd3_helpers import stock_pipeline, tiny_folder

ROOT = Path(__file__).resolve().parent.parent


def sd3_job(tmp_path: Path, *overrides: str):
    """jobs/sd3.toml on the tiny model, on the CPU, at 64 px and a few steps."""
    base = [f"job.output_dir={json.dumps(str(tmp_path / 'out'))}",
            f"model.hub_cache_dir={json.dumps(str(tmp_path / 'models'))}",
            f"cache.dir={json.dumps(str(tmp_path / 'cache'))}",
            f"datasets.0.instance_data_dir={json.dumps(str(tmp_path / 'data'))}",
            'model.flavour="tiny"', 'job.device="cpu"', "datasets.0.synthetic_images=4",
            "datasets.0.resolution=64", "datasets.0.aspect_bucket_alignment=32",
            "train.batch_size=2", "train.max_train_steps=4", "train.log_every=1",
            "train.gradient_checkpointing=false", "optimizer.learning_rate=1e-3",
            "optimizer.lr_warmup_steps=0", "checkpoint.step_interval=2",
            "validation.step_interval=4", 'validation.resolution=["64x64"]',
            "validation.num_inference_steps=6", "validation.guidance_skip_layers=[1, 2]",
            "validation.guidance_skip_layers_stop=0.5", "validation.eval_split=0.25"]
    cfg, warnings = load_job(ROOT / "jobs" / "sd3.toml", base + list(overrides))
    assert warnings == []
    return cfg


def rows(out: Path, event: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def test_sd3_job_trains_resumes_and_exports_a_stock_lora(tmp_path: Path) -> None:
    pytest.importorskip("torchao", reason="jobs/sd3.toml quantises with torchao (extra: torchao)")
    cfg = sd3_job(tmp_path)
    assert cfg.speedups.base_model_precision == "int8-torchao"
    assert run_job(cfg) == 0
    out = Path(cfg.output_path())
    summary = json.loads((out / "summary.json").read_text())
    validate_summary(summary)
    assert summary["status"] == "succeeded" and summary["family"] == "sd3"
    assert summary["steps_done"] == 4 and summary["eval_loss"] is not None
    losses = [r["loss"] for r in rows(out, "train")]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert any(Path(p).name == "grid.png" for p in summary["images"])

    # A restarted job with more steps resumes from the last checkpoint.
    longer = sd3_job(tmp_path, "train.max_train_steps=6")
    assert run_job(longer) == 0
    assert rows(out, "resumed")[0]["step"] == 4
    assert [r["step"] for r in rows(out, "train")][-2:] == [5, 6]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_done"] == 6

    # Plain tensors in diffusers' format, loadable by the stock (unquantised) pipeline.
    [final] = summary["final_weights"]
    tensors = load_file(final)
    assert tensors and all(t.dtype in (torch.float32, torch.bfloat16) for t in tensors.values())
    assert any(".add_q_proj." in k for k in tensors)
    pipeline = stock_pipeline(tiny_folder(tmp_path / "models"))

    def image() -> np.ndarray:
        return np.asarray(pipeline("a red circle", width=64, height=64, guidance_scale=4.0,
                                   num_inference_steps=2,
                                   generator=torch.Generator().manual_seed(0)).images[0])

    plain = image()
    pipeline.load_lora_weights(str(Path(final).parent))
    with_lora = image().astype(int)
    assert np.abs(with_lora - plain).max() > 0

    # `tunejob export --merge`: the LoRA fused into the stock pipeline's folder.
    family = family_class(longer.model.family)(longer, torch.device("cpu"), torch.float32)
    family.export_merged(Path(final).parent, tmp_path / "merged")
    pipeline = stock_pipeline(tmp_path / "merged")
    assert not any("lora" in k for k in pipeline.transformer.state_dict())
    assert np.abs(image().astype(int) - with_lora).max() <= 1


def test_full_fine_tune_exports_a_stock_pipeline_folder(tmp_path: Path) -> None:
    from job.models.sd3_output import PIPELINE_PARTS
    from sd3_helpers import load_family

    family = load_family(tmp_path, tmp_path / "models", torch.bfloat16,
                         model={"model_type": "full"}, train={"mixed_precision": "bf16"})
    params = list(family.transformer.parameters())
    assert all(p.requires_grad and p.dtype == torch.float32 for p in params)
    with torch.no_grad():
        family.transformer.proj_out.bias.add_(0.5)  # stands in for training
    family.save_final(tmp_path / "final")
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == sorted(
        ("model_index.json", *PIPELINE_PARTS))
    loaded = stock_pipeline(tmp_path / "final")
    original = stock_pipeline(tiny_folder(tmp_path / "models"))
    torch.testing.assert_close(loaded.transformer.proj_out.bias, family.transformer.proj_out.bias)
    # The frozen text encoders are exported as stored, not as the bf16 copies cached with.
    for ours, theirs in zip(loaded.text_encoder_3.parameters(),
                            original.text_encoder_3.parameters()):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
