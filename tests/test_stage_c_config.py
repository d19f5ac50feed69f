"""The stable_cascade family's settings: jobs/stage_c.toml, the mixed-precision refusal and
its override, guidance precedence, and the diffusers classes it depends on (torch-free
except the last)."""

from __future__ import annotations

from pathlib import Path

import pytest

from job.errors import ConfigError
from job.jobfile import load_job
from job.schema_docs import DOC_PATH

ROOT = Path(__file__).resolve().parent.parent

MINIMAL = """
[job]
name = "t"

[model]
family = "stable_cascade"

[train]
max_train_steps = 3
mixed_precision = "no"

[validation]
prompt = "a red circle"

[[datasets]]
id = "d"
instance_data_dir = "/tmp/none"
"""


def load(*overrides: str, text: str = MINIMAL):
    return load_job("job.toml", list(overrides), text=text)


def test_stage_c_job_file_has_the_issues_settings() -> None:
    cfg, _ = load_job(ROOT / "jobs" / "stage_c.toml")
    assert (cfg.model.family, cfg.model.flavour, cfg.model.model_type) == ("stable_cascade",
                                                                          "stage-c", "lora")
    assert (cfg.lora.rank, cfg.optimizer.learning_rate, cfg.optimizer.lr_scheduler) == (16, 1e-4,
                                                                                       "cosine")
    assert (cfg.optimizer.name, cfg.train.use_ema, cfg.speedups.base_model_precision) == (
        "adamw_bf16", True, "int8-torchao")
    assert (cfg.train.batch_size, cfg.train.gradient_accumulation_steps) == (4, 2)
    assert cfg.datasets[0].bucket_resolutions == ["1024x1024", "896x1152", "1152x896"]
    s = cfg.stable_cascade
    assert (s.decoder_subfolder, s.validation_prior_guidance_scale,
            s.validation_decoder_guidance_scale) == ("decoder_lite", 3.5, 0.0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_is_refused_with_the_documented_message(precision: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(f'train.mixed_precision="{precision}"')
    assert err.value.exit_code == 2
    assert 'Stable Cascade Stage C requires mixed_precision = "no"' in str(err.value)
    assert "i_know_what_i_am_doing" in str(err.value)


def test_i_know_what_i_am_doing_turns_the_refusal_into_a_warning() -> None:
    cfg, notes = load('train.mixed_precision="bf16"', "job.i_know_what_i_am_doing=true")
    assert cfg.train.mixed_precision == "bf16"
    assert any("requires mixed_precision" in n and "watch for NaN" in n for n in notes)


def test_default_mixed_precision_is_refused_too() -> None:
    with pytest.raises(ConfigError, match="requires mixed_precision"):
        load(text=MINIMAL.replace('mixed_precision = "no"\n', ""))


def test_adamw_bf16_is_allowed_with_fp32_compute_for_stage_c_only() -> None:
    cfg, _ = load('optimizer.name="adamw_bf16"')
    assert cfg.optimizer.name == "adamw_bf16"
    with pytest.raises(ConfigError, match="adamw_bf16"):
        load('optimizer.name="adamw_bf16"', 'model.family="sdxl"', 'model.flavour="tiny"')


def test_prior_guidance_wins_and_the_ignored_guidance_is_said() -> None:
    _, notes = load("validation.guidance=7.0", "stable_cascade.validation_prior_guidance_scale=3.5")
    assert any("validation.guidance = 7.0 is ignored" in n for n in notes)
    _, notes = load("validation.guidance=7.0")
    assert not any("is ignored" in n for n in notes)


def test_quantised_prior_warns_and_unknown_flavour_is_refused() -> None:
    _, notes = load('speedups.base_model_precision="int8-torchao"')
    assert any("may cost quality" in n for n in notes)
    with pytest.raises(ConfigError, match="stage-c-lite"):
        load('model.flavour="stage-b"')


def test_docs_name_the_established_keys() -> None:
    text = DOC_PATH.read_text(encoding="utf-8")
    for name in ("stable_cascade_use_decoder_for_validation",
                 "stable_cascade_validation_prior_guidance_scale",
                 "stable_cascade_decoder_subfolder", "effnet_encoder_path"):
        assert name in text


def test_diffusers_still_ships_stable_cascade() -> None:
    """diffusers marks Stable Cascade deprecated; pyproject pins a range that ships it."""
    try:
        from diffusers import (DDPMWuerstchenScheduler, StableCascadeDecoderPipeline,  # noqa: F401
                               StableCascadePriorPipeline, StableCascadeUNet)
        from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import (  # noqa: F401
            PaellaVQModel)
    except ImportError as err:
        pytest.fail(f"this diffusers no longer ships Stable Cascade ({err}); keep the pin "
                    "diffusers>=0.36,<0.43 in pyproject.toml or port the family")
