"""The sd3 family's settings: jobs/sd3.toml, established names, and the rules `tunejob
validate` applies before anything is loaded (torch-free)."""

from __future__ import annotations

from pathlib import Path

import pytest

from job.errors import ConfigError
from job.jobfile import load_job
from job.models.sd3_rules import slg_steps
from job.schema_docs import DOC_PATH

ROOT = Path(__file__).resolve().parent.parent

MINIMAL = """
[job]
name = "t"

[model]
family = "sd3"
flavour = "tiny"

[train]
max_train_steps = 3

[validation]
prompt = "a red circle"

[[datasets]]
id = "d"
instance_data_dir = "/tmp/none"
"""


def load(text: str = MINIMAL, *overrides: str):
    return load_job("job.toml", list(overrides), text=text)


def error(*overrides: str, text: str = MINIMAL) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(text, *overrides)
    assert caught.value.exit_code == 2
    return caught.value


def test_sd3_job_file_has_the_known_stable_settings() -> None:
    cfg, warnings = load_job(ROOT / "jobs" / "sd3.toml")
    assert warnings == []
    assert (cfg.model.family, cfg.model.flavour) == ("sd3", "large")
    assert cfg.optimizer.name == "adamw_bf16" and cfg.optimizer.learning_rate == 1e-4
    assert cfg.train.max_grad_norm == 0.1 and cfg.train.batch_size == 4
    assert cfg.sd3.flow_schedule_shift == 1.0 and cfg.sd3.flow_use_uniform_schedule
    assert not cfg.sd3.flow_schedule_auto_shift
    assert cfg.speedups.base_model_precision == "int8-torchao"
    assert cfg.validation.guidance_skip_layers == [7, 8, 9]
    assert cfg.validation.guidance > 1 and slg_steps(cfg.validation.num_inference_steps, 0.01,
                                                     0.2)


def test_defaults_and_flavours() -> None:
    cfg, _ = load(MINIMAL.replace('flavour = "tiny"\n', ""))
    s = cfg.sd3
    assert (s.flow_schedule_shift, s.flow_schedule_auto_shift, s.flow_use_uniform_schedule) == \
        (3.0, False, False)
    assert (s.tokenizer_max_length, s.t5_padding, s.loss_weighting) == (154, "unmodified", "none")
    assert (s.clip_uncond_behaviour, s.t5_uncond_behaviour) == ("empty_string", "empty_string")
    assert cfg.validation.guidance_skip_layers is None
    assert (cfg.validation.guidance_skip_layers_start, cfg.validation.guidance_skip_layers_stop,
            cfg.validation.guidance_skip_scale) == (0.01, 0.2, 2.8)
    assert cfg.speedups.base_model_precision == "no_change"
    for flavour in ("large", "medium", "3.0-medium"):
        load(MINIMAL.replace('"tiny"', f'"{flavour}"'))
    assert "3.0-medium" in str(error('model.flavour="3.5-turbo"'))


def test_established_names_are_documented() -> None:
    doc = DOC_PATH.read_text(encoding="utf-8")
    for name in ("flow_schedule_shift", "flow_schedule_auto_shift", "flow_use_uniform_schedule",
                 "sd3_clip_uncond_behaviour", "sd3_t5_uncond_behaviour", "t5_padding",
                 "tokenizer_max_length", "validation_guidance_skip_layers",
                 "validation_guidance_skip_layers_start", "validation_guidance_skip_layers_stop",
                 "validation_guidance_skip_scale", "base_model_precision",
                 "text_encoder_3_precision", "base_model_default_dtype", "attention_mechanism"):
        assert f"`{name}`" in doc, name
    # An established name inside its table points at our key.
    assert "'clip_uncond_behaviour'" in str(error(text=MINIMAL + "[sd3]\nsd3_clip_uncond_"
                                                               "behaviour = \"zero\"\n"))


@pytest.mark.parametrize("value", [77, 154, 256])
def test_t5_lengths_up_to_256_are_allowed(value: int) -> None:
    """77 and 256 are the lengths SD3.5 was trained with (its model card), 256 also the
    stock pipeline's max_sequence_length; 154 is the default (SimpleTuner's)."""
    cfg, warnings = load(MINIMAL, f"sd3.tokenizer_max_length={value}")
    assert cfg.sd3.tokenizer_max_length == value and warnings == []


def test_t5_length_above_256_needs_i_know_what_i_am_doing() -> None:
    err = error("sd3.tokenizer_max_length=512")
    assert "512" in err.message and "256" in err.message and "i_know_what_i_am_doing" in err.hint
    cfg, warnings = load(MINIMAL, "sd3.tokenizer_max_length=512",
                         "job.i_know_what_i_am_doing=true")
    assert cfg.sd3.tokenizer_max_length == 512 and any("512" in w for w in warnings)


def test_both_shift_options_warn_and_nothing_changes() -> None:
    cfg, warnings = load(MINIMAL, "sd3.flow_schedule_auto_shift=true",
                         "sd3.flow_schedule_shift=2.0")
    assert cfg.sd3.flow_schedule_shift == 2.0 and cfg.sd3.flow_schedule_auto_shift
    assert any("flow_schedule_shift = 2.0 is ignored" in w for w in warnings)
    _, warnings = load(MINIMAL, "sd3.flow_schedule_auto_shift=true")
    assert warnings == []


def test_skip_layer_index_past_the_flavours_depth_is_exit_2() -> None:
    err = error("validation.guidance_skip_layers=[7, 8, 9]")  # the tiny model has 4 layers
    assert "[7, 8, 9]" in err.message and "4 layers" in err.message
    load(MINIMAL.replace('"tiny"', '"medium"'), "validation.guidance_skip_layers=[7, 8, 9]")
    assert "38 layers" in str(error('model.flavour="large"', "validation.guidance_skip_layers=[38]"))
    assert "[-1]" in str(error("validation.guidance_skip_layers=[-1]"))
    # An explicit path: the depth is checked once the transformer is loaded.
    load(MINIMAL, 'model.pretrained_model_name_or_path="/models/sd3"',
         "validation.guidance_skip_layers=[30]")


def test_skip_layer_guidance_that_cannot_act_warns() -> None:
    slg = "validation.guidance_skip_layers=[1, 2]"
    _, warnings = load(MINIMAL, slg, "validation.guidance=1.0")
    assert any("guidance = 1.0 <= 1" in w for w in warnings)
    _, warnings = load(MINIMAL, slg, "validation.num_inference_steps=4")  # 0.04 < i < 0.8
    assert any("no step of 4" in w for w in warnings)
    _, warnings = load(MINIMAL, slg, "validation.guidance_skip_layers_start=0.5",
                       "validation.guidance_skip_layers_stop=0.4")
    assert any("no step of 30" in w for w in warnings)
    _, warnings = load(MINIMAL, slg, "validation.guidance=4.0", "validation.num_inference_steps=20")
    assert warnings == []
    assert slg_steps(20, 0.01, 0.2) == [1, 2, 3]


def test_settings_another_family_ignores_are_said() -> None:
    sdxl = MINIMAL.replace('family = "sd3"', 'family = "sdxl"')
    _, warnings = load(sdxl + "\n[sd3]\nflow_schedule_shift = 1.0\n",
                       "validation.guidance_skip_layers=[1]",
                       'speedups.attention_mechanism="sageattention"')
    assert any("[sd3] is ignored" in w for w in warnings)
    assert any("guidance_skip_layers is ignored" in w for w in warnings)
    assert any("sageattention" in w for w in warnings)
    err = error('speedups.base_model_precision="int8-torchao"', text=sdxl)
    assert "'sdxl'" in err.message and "sd3" in err.hint


def test_presets_are_checked_by_name() -> None:
    assert "'int8-torchao'" in str(error('speedups.base_model_precision="int8"'))
    for preset in ("int8-torchao", "fp8-torchao", "int8-quanto", "int4-quanto", "int2-quanto",
                   "fp8-quanto"):
        load(MINIMAL, f'speedups.base_model_precision="{preset}"',
             f'speedups.text_encoder_3_precision="{preset}"')


def test_sdxl_only_loss_settings_are_refused_or_said() -> None:
    err = error('model.prediction_type="v_prediction"')
    assert "flow velocity" in err.message
    _, warnings = load(MINIMAL, "train.snr_gamma=5.0")
    assert any("snr_gamma = 5.0 is ignored" in w for w in warnings)


def test_validate_sd3_job_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = ("import sys; from job.cli import main; rc = main(['validate', 'jobs/sd3.toml']); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
