"""The job file: strict schema, clear errors, overrides, env, generated docs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from job.config import JobConfig
from job.errors import ConfigError
from job.jobfile import load_job
from job.schema_docs import (DOC_PATH, REFERENCE_PATH, SCHEMA_PATH, config_doc_text,
                             job_schema_text, reference_toml_text)
from job.toml_out import dumps

ROOT = Path(__file__).resolve().parent.parent

MINIMAL = """
[job]
name = "t"

[model]
family = "sdxl"
flavour = "tiny"

[train]
max_train_steps = 3

[[datasets]]
id = "d"
instance_data_dir = "/tmp/none"
"""


def error_of(text: str, overrides: list[str] = ()) -> str:
    with pytest.raises(ConfigError) as caught:
        load_job("job.toml", overrides, text=text)
    return str(caught.value)


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_job_file_validates(path: Path) -> None:
    cfg, _ = load_job(path)
    assert cfg.job.name


def test_minimal_job_gets_documented_defaults() -> None:
    cfg, _ = load_job("job.toml", text=MINIMAL)
    assert cfg.lora.rank == 16 and cfg.lora.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert cfg.checkpoint.resume_from == "latest"
    assert cfg.output_path() == "/data/output/t"


def test_unknown_key_names_line_and_suggests() -> None:
    text = MINIMAL.replace("max_train_steps = 3", "max_train_steps = 3\nmax_train_step = 4")
    message = error_of(text)
    assert "job.toml:11" in message
    assert "train.max_train_step" in message and "did you mean 'max_train_steps'" in message


def test_established_name_points_at_our_key() -> None:
    message = error_of(MINIMAL + "\n[lora]\nlora_rank = 8\n")
    assert "lora.lora_rank" in message and "'rank'" in message


def test_wrong_type_names_key_value_and_expectation() -> None:
    message = error_of(MINIMAL.replace("max_train_steps = 3", 'max_train_steps = "3"'))
    assert "train.max_train_steps = '3'" in message and "valid integer" in message


def test_quoted_number_is_told_to_drop_the_quotes() -> None:
    message = error_of(MINIMAL.replace("max_train_steps = 3", 'max_train_steps = "3"'))
    assert "job.toml:10" in message and "write it without quotes: 3" in message
    # A string that is no integer unquoted gets no such advice ("1e3" would be a float).
    for text in ('"three"', '"1e3"', '"2026-01-01"'):
        assert "without quotes" not in error_of(MINIMAL.replace("max_train_steps = 3",
                                                                f"max_train_steps = {text}"))
    message = error_of(MINIMAL + '\n[speedups]\ncompile_blocks = "true"\n')
    assert "write it without quotes: true" in message
    # A bool-or-"auto" key: one problem at the key's line, both readings joined.
    assert "1 problem(s)" in message and "job.toml:17: speedups.compile_blocks = 'true': " \
        "Input should be a valid boolean; write it without quotes: true; or Input should " \
        "be 'auto'" in message


def test_misspelt_table_names_its_header_line_not_its_contents() -> None:
    message = error_of(MINIMAL + '\n[optimiser]\nname = "adamw"\n')
    assert "job.toml:16: optimiser: unknown key; did you mean 'optimizer'?" in message
    assert "adamw" not in message
    # A key missing from the second [[datasets]] points at that table's header.
    second = error_of(MINIMAL + '\n[[datasets]]\nid = "e"\n')
    assert "job.toml:16: datasets[1].instance_data_dir: required key is missing" in second


def test_a_bad_set_value_is_blamed_on_the_set_not_the_file() -> None:
    message = error_of(MINIMAL, ["train.max_train_steps=abc", "train.max_train_step=4",
                                 "datasets.0.repeats=-1"])
    assert "job.toml with its --set values: 3 problem(s)" in message
    assert "--set train.max_train_steps=abc: train.max_train_steps = 'abc'" in message
    assert "--set train.max_train_step=4: train.max_train_step = 4: unknown key" in message
    assert "--set datasets.0.repeats=-1: datasets[0].repeats = -1" in message
    assert "job.toml:11" not in message  # the file's max_train_steps = 3 is fine
    # A table the file does not have, made by a misspelt --set.
    assert "--set trian.max_train_steps=3: trian: unknown key" in error_of(
        MINIMAL, ["trian.max_train_steps=3"])


def test_invalid_enum_lists_choices() -> None:
    message = error_of(MINIMAL + '\n[optimizer]\nname = "adam"\n')
    assert "optimizer.name = 'adam'" in message and "'adamw_bf16'" in message


def test_dataset_error_names_index_and_line() -> None:
    message = error_of(MINIMAL + "repeats = -1\n")
    assert "datasets[0].repeats = -1" in message and "job.toml:15" in message


def test_missing_required_key() -> None:
    message = error_of(MINIMAL.replace('name = "t"', ""))
    assert "job.name" in message and "required key is missing" in message


def test_unknown_family_and_flavour() -> None:
    assert "known family" in error_of(MINIMAL.replace('family = "sdxl"', 'family = "sdxxl"'))
    message = error_of(MINIMAL.replace('flavour = "tiny"', 'flavour = "huge"'))
    assert "'huge'" in message and "base-1.0" in message


def test_steps_rule_and_bf16_optimizer_rule() -> None:
    assert "max_train_steps" in error_of(MINIMAL.replace("max_train_steps = 3", ""))
    message = error_of(MINIMAL, ["optimizer.name=adamw_bf16", "train.mixed_precision=no"])
    assert "mixed_precision" in message


def test_overrides_and_list_index() -> None:
    cfg, _ = load_job("job.toml", ["train.max_train_steps=7", "datasets.0.repeats=2",
                                   "job.name=other"], text=MINIMAL)
    assert cfg.train.max_train_steps == 7 and cfg.datasets[0].repeats == 2
    assert cfg.job.name == "other"
    assert "index" in error_of(MINIMAL, ["datasets.3.repeats=1"])
    assert "no '='" in error_of(MINIMAL, ["train.seed"])
    # A list item, a list element, and a key under a plain value.
    cfg, _ = load_job("job.toml", ['datasets.0={id="e", instance_data_dir="/tmp/e"}',
                                   'validation.resolution=["64x64", "96x64"]',
                                   'validation.resolution.1="128x64"'], text=MINIMAL)
    assert cfg.datasets[0].id == "e" and cfg.validation.resolution == ["64x64", "128x64"]
    assert "index" in error_of(MINIMAL, ['datasets.1={id="x"}'])
    assert "train.max_train_steps is a value" in error_of(MINIMAL, ["train.max_train_steps.x=5"])


def test_env_interpolation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA_ROOT", "/mnt/vol")
    text = MINIMAL.replace('"/tmp/none"', '"${DATA_ROOT}/imgs"') + '\n[cache]\ndir = "${NOPE:-/c}"\n'
    cfg, _ = load_job("job.toml", text=text)
    assert cfg.datasets[0].instance_data_dir == "/mnt/vol/imgs" and cfg.cache.dir == "/c"
    monkeypatch.delenv("DATA_ROOT")
    assert "DATA_ROOT" in error_of(text)


def test_resolved_toml_round_trips() -> None:
    cfg, _ = load_job(ROOT / "jobs" / "smoke.toml")
    again, _ = load_job("resolved.toml", text=dumps(cfg.model_dump(mode="json")))
    assert again == cfg


def test_generated_docs_are_fresh() -> None:
    stale = "run `python -m job.schema_docs` (or `make docs`) and commit the result"
    assert DOC_PATH.read_text(encoding="utf-8") == config_doc_text(), stale
    assert SCHEMA_PATH.read_text(encoding="utf-8") == job_schema_text(), stale
    assert REFERENCE_PATH.read_text(encoding="utf-8") == reference_toml_text(), stale


def test_docs_cover_every_key_with_its_established_name() -> None:
    doc = DOC_PATH.read_text(encoding="utf-8")
    for table in JobConfig.model_fields:
        assert f"[{table}]" in doc
    for needle in ("`lora_rank`", "`train_batch_size`", "`validation_resolution`",
                   "`checkpoint_step_interval`", "`resume_from_checkpoint`", "`optimizer`"):
        assert needle in doc


def test_validate_does_not_import_torch() -> None:
    code = ("import sys; from job.cli import main; rc = main(['validate', 'jobs/smoke.toml']); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_validate_exit_code_2_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(MINIMAL.replace("[train]", "[trian]"))
    done = subprocess.run([sys.executable, "-m", "job", "validate", str(bad)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "trian" in done.stderr


def test_version_flag_prints_the_package_version() -> None:
    from job import __version__

    done = subprocess.run([sys.executable, "-m", "job", "--version"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"tunejob {__version__}"


def test_a_folder_of_job_files_is_refused_with_its_files_listed(tmp_path: Path) -> None:
    (tmp_path / "b.toml").write_text("")
    (tmp_path / "a.toml").write_text("")
    with pytest.raises(ConfigError) as err:
        load_job(tmp_path)
    assert err.value.message == f"job file {tmp_path} is a folder"
    assert err.value.hint == (f"pass one of the job files in it: {tmp_path / 'a.toml'}, "
                              f"{tmp_path / 'b.toml'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="is a folder") as err:
        load_job(empty)
    assert err.value.hint == "pass the path of a .toml job file (see jobs/)"


def test_crop_settings_without_crop_are_said_to_be_ignored(tmp_path: Path) -> None:
    text = (Path(__file__).parent.parent / "jobs" / "smoke.toml").read_text()
    _, notes = load_job(tmp_path / "job.toml", ["datasets.0.crop_aspect=\"closest\"",
                                                "datasets.0.crop=false"], text=text)
    assert any(n.startswith("datasets[0].crop_aspect is ignored: datasets[0].crop is false")
               for n in notes), notes
    _, notes = load_job(tmp_path / "job.toml", ["datasets.0.crop_aspect=\"closest\"",
                                                "datasets.0.crop=true"], text=text)
    assert not any("crop_aspect" in n for n in notes), notes
