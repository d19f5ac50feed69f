"""`tunejob import simpletuner`: every example of the source documents converts or is
reported key by key, every mapped key takes effect, and the job loader says the same."""

from __future__ import annotations

import json
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic_core import PydanticUndefined

from job.cli import main
from job.config import JobConfig
from job.errors import ConfigError
from job.importers.keymap import (CONFIG, DATASET, DOC_PATH, KEYMAP, MAPPED, NESTED,
                                  TEXT_EMBEDS, UNKNOWN_REASON, migrating_doc_text,
                                  schema_tables)
from job.importers.simpletuner import convert, job_text
from job.jobfile import load_job

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "simpletuner"
BASE = "base_sdxl.json"  # ours, not from the documents: a family tunejob has, for fragments
K5_BASE = "base_kandinsky5.json"  # ours: the family the Kandinsky 5 fragments are for

CASCADE_LEFT = {"hub_model_id", "report_to"}
# [distillation] and [tread] are reported while the schema lacks them and mapped once it has them.
DISTILL_LEFT = set() if "distillation" in JobConfig.model_fields else {
    "distillation_method", "distillation_config"}
# tread_config's routes become [[tread.routes]] tables.
TREAD_LEFT: set[str] = set()
SD3, K5, LCM = "002_sd3_ja", "003_kandinsky5_ja", "004_sdxl_lcm_ja"

# id, config files laid over each other, multidatabackend (None: data_backend_config),
# the exact keys left out, and what `validate` names when the written job is refused.
CASES = [
    ("000-config", ["000_stable_cascade_ja/config/config.json"], None, CASCADE_LEFT, None),
    ("001-config", ["001_stable_cascade_hi/config/config.json"], None, CASCADE_LEFT, None),
    ("000-backends", [BASE], "000_stable_cascade_ja/config/stable_cascade/multidatabackend.json",
     set(), None),
    ("001-backends", [BASE], "001_stable_cascade_hi/config/stable_cascade/multidatabackend.json",
     set(), None),
    # SimpleTuner's document sets no step count; tunejob needs one.
    ("002-config", [f"{SD3}/config.json"], f"{SD3}/multidatabackend.json", set(),
     "max_train_steps"),
    ("002-backends", [BASE], f"{SD3}/multidatabackend.json", set(), None),
    # Mapped; BASE is an sdxl job, whose family loads unquantised.
    ("002-quantization", [BASE, f"{SD3}/quantization.json"], f"{SD3}/multidatabackend.json",
     set(), "base_model_precision"),
    ("002-skip-layer-guidance", [BASE, f"{SD3}/skip_layer_guidance.json"],
     f"{SD3}/multidatabackend.json", set(), None),
    ("002-validation-preview", [BASE, f"{SD3}/validation_preview.json"],
     f"{SD3}/multidatabackend.json", {"validation_preview", "validation_preview_steps"}, None),
    ("003-backends", [BASE], f"{K5}/multidatabackend.json", set(), None),
    # Mapped; BASE is an sdxl job, whose family keeps its denoiser on the GPU.
    ("003-group-offload", [BASE, f"{K5}/group_offload.json"], f"{K5}/multidatabackend.json",
     set(), "enable_group_offload"),
    ("003-prompt-library", [BASE, f"{K5}/prompt_library_setting.json"],
     f"{K5}/multidatabackend.json", set(), None),
    ("003-quantization", [BASE, f"{K5}/quantization.json"], f"{K5}/multidatabackend.json",
     set(), "base_model_precision"),
    ("003-tread", [BASE, f"{K5}/tread.json"], f"{K5}/multidatabackend.json", TREAD_LEFT,
     "no token routing"),
    ("003-tread-k5", [K5_BASE, f"{K5}/tread.json"], f"{K5}/multidatabackend.json", TREAD_LEFT,
     None),
    ("003-group-offload-k5", [K5_BASE, f"{K5}/group_offload.json"],
     f"{K5}/multidatabackend.json", set(), None),
    # The document's aspect_bucket_rounding = 64 is outside 1-9 in SimpleTuner as well.
    ("004-config", [f"{LCM}/config.json"], f"{LCM}/multidatabackend.json",
     {"push_to_hub", "hub_model_id", "report_to", "tracker_project_name"} | DISTILL_LEFT,
     "aspect_bucket_rounding"),
    ("004-backends", [BASE], f"{LCM}/multidatabackend.json", set(), None),
    ("004-quantization", [BASE, f"{LCM}/quantization.json"], f"{LCM}/multidatabackend.json",
     set(), "base_model_precision"),
    ("004-validation-resolution", [BASE, f"{LCM}/validation_resolution.json"],
     f"{LCM}/multidatabackend.json", set(), None),
]


def config_file(tmp_path: Path, names: list[str]) -> Path:
    """One fixture as it is, or several laid over each other as a user would merge them."""
    if len(names) == 1:
        return FIX / names[0]
    merged: dict[str, Any] = {}
    for name in names:
        merged.update(json.loads((FIX / name).read_text()))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(merged))
    return path


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """`tunejob` in-process; returns (exit code, stderr)."""
    code = main(args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_example_converts_or_lists_exactly_what_is_left_out(
        case: tuple, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, names, backends, left_out, refused_for = case
    config = config_file(tmp_path, names)
    args = ["import", "simpletuner", str(config)] + ([str(FIX / backends)] if backends else [])
    out = tmp_path / "job.toml"
    assert {item.key for item in convert(config, FIX / backends if backends else None)
            .unmapped} == left_out
    code, err = run_cli(args + ["-o", str(out)], capsys)
    assert code == (2 if left_out else 0), err
    assert out.exists() == (not left_out)
    for key in left_out:
        assert f": {key} = " in err
    code, err = run_cli(args + ["-o", str(out), "--drop-unsupported"], capsys)
    assert code == 0, err
    header = out.read_text().split("\n[", 1)[0]
    assert all(f"#   config.json: {key} = " in header for key in left_out)
    if refused_for is None:
        cfg, _ = load_job(out)
        assert cfg.job.name and cfg.datasets
    else:
        with pytest.raises(ConfigError, match=refused_for):
            load_job(out)
        assert refused_for in err


def test_every_fixture_file_is_one_of_the_cases() -> None:
    used = {name for case in CASES for name in [*case[1], case[2] or ""]}
    used |= {"000_stable_cascade_ja/config/stable_cascade/multidatabackend.json",
             "001_stable_cascade_hi/config/stable_cascade/multidatabackend.json"}
    files = {str(p.relative_to(FIX)) for p in FIX.rglob("*.json")}
    assert files - used == set()


def test_every_key_of_the_documents_is_in_the_keymap() -> None:
    for path in FIX.rglob("*.json"):
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            for key in data:
                assert (CONFIG, key.lstrip("-")) in KEYMAP, (path, key)
            continue
        for entry in data:
            section = TEXT_EMBEDS if entry.get("dataset_type") == "text_embeds" else DATASET
            for key in entry:
                assert (section, key) in KEYMAP, (path, key)
    # Named in the documents' prose and tables, not in their JSON examples.
    for key in ("flow_schedule_shift", "t5_padding", "sd3_clip_uncond_behaviour",
                "sd3_t5_uncond_behaviour", "attention_mechanism", "enable_model_cpu_offload",
                "offload_during_startup", "i_know_what_i_am_doing", "validation_prompt_library",
                "config_file", "max_grad_norm", "validation_num_inference_steps"):
        assert (CONFIG, key) in KEYMAP, key


def test_every_mapped_target_is_a_schema_key() -> None:
    tables = dict(schema_tables())
    for rule in KEYMAP.values():
        if rule.status == MAPPED:
            table, _, leaf = rule.target.rpartition(".")
            assert leaf in tables[table].model_fields, rule


# Values where "a different value of the right type" is not enough.
EXAMPLES: dict[str, Any] = {
    "model.family": "sdxl", "model.flavour": "tiny", "validation.resolution": "512x512",
    "validation.eval_dataset": "more", "checkpoint.resume_from": "none",
    "datasets.resolution": 512, "datasets.resolution_type": "pixel_area",
    "datasets.minimum_image_size": 256, "datasets.maximum_image_size": 2048,
    "datasets.target_downsample_size": 1536, "datasets.bucket_resolutions": ["512x512"],
    "datasets.crop_aspect": "preserve", "lora.target_modules": ["to_q"],
    "validation.guidance_skip_layers": [1, 2],
    "datasets.aspect_bucket_alignment": 32,  # a multiple of the family's 8
}
# Quantisation is refused for families that load unquantised (sdxl); sd3 has it.
SD3_FAMILY = {"model_family": "sd3"}
K5_FAMILY = {"model_family": "kandinsky5-image", "model_flavour": "tiny",
             "gradient_checkpointing": True}
NEEDS = {"datasets.prepend_instance_prompt": {"instance_prompt": "sks"},
         "speedups.enable_group_offload": K5_FAMILY,
         **{f"speedups.{key}": SD3_FAMILY for key in (
             "base_model_precision", "text_encoder_1_precision", "text_encoder_2_precision",
             "text_encoder_3_precision")}}


def field_info(target: str) -> Any:
    table, _, leaf = target.rpartition(".")
    return dict(schema_tables())[table].model_fields[leaf]


def example_value(target: str) -> Any:
    """A valid value other than the default, so a key that is ignored shows."""
    if target in EXAMPLES:
        return EXAMPLES[target]
    info = field_info(target)
    default = None if info.default is PydanticUndefined else info.default
    plain = typing.get_origin(info.annotation) in (None, typing.Literal)
    kinds = (info.annotation,) if plain else typing.get_args(info.annotation)
    for kind in kinds:
        if typing.get_origin(kind) is typing.Literal:
            choices = typing.get_args(kind)
            return next((c for c in choices if c != default), choices[0])
    if bool in kinds:
        return not default
    if int in kinds and float not in kinds:
        return (default or 0) + 3
    if float in kinds:
        return default / 2 if default else 0.5
    if str in kinds:
        return "example-value"
    raise AssertionError(f"add an example value for {target} to EXAMPLES")


def read_back(cfg: JobConfig, target: str, index: int = 0) -> Any:
    node: Any = cfg
    for part in target.split("."):
        node = getattr(node, part)
        if part == "datasets":
            node = node[index]
    return node


MAPPED_RULES = sorted((r for r in KEYMAP.values() if r.status == MAPPED),
                      key=lambda r: (r.section, r.key))


@pytest.mark.parametrize("rule", MAPPED_RULES, ids=[f"{r.section}:{r.key}" for r in MAPPED_RULES])
def test_every_mapped_key_takes_effect(rule: Any, tmp_path: Path) -> None:
    config: dict[str, Any] = {"model_family": "sdxl", "model_flavour": "tiny",
                              "max_train_steps": 10, "output_dir": "/tmp/out"}
    images = [{"id": "photos", "type": "local", "instance_data_dir": "/data/photos"},
              {"id": "more", "instance_data_dir": "/data/more", "disabled": False}]
    text = {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True}
    value, needs = example_value(rule.target), NEEDS.get(rule.target, {})
    if rule.section == CONFIG:
        config.update({rule.key: value, **needs})
        images[0].pop(rule.key, None)
    elif rule.section == DATASET:
        images[0].update({rule.key: value, **needs})
    elif rule.section == TEXT_EMBEDS:
        text[rule.key] = value
    else:
        inner, _, leaf = rule.key.rpartition(".")
        config[rule.section] = {inner: {leaf: value}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "backends.json").write_text(json.dumps([*images, text]))
    conv = convert(tmp_path / "config.json", tmp_path / "backends.json")
    assert conv.unmapped == []
    written = job_text(conv)
    cfg, _ = load_job("job.toml", text=written)
    assert read_back(cfg, rule.target) == value, written
    leaf = rule.target.rpartition(".")[2]
    if rule.key != leaf:
        assert f"  # {rule.section + '.' if rule.section in NESTED else ''}{rule.key}" in written


def write_pair(tmp_path: Path, config: dict, entries: list) -> tuple[Path, Path]:
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "mdb.json").write_text(json.dumps(entries))
    return tmp_path / "config.json", tmp_path / "mdb.json"


BASIC = {"model_family": "sdxl", "max_train_steps": 10}
IMAGES = [{"id": "a", "instance_data_dir": "/data/a"}, {"id": "b", "instance_data_dir": "/data/b",
                                                        "resolution": 1024}]


def test_leading_dashes_are_accepted_and_a_key_given_twice_is_refused(tmp_path: Path) -> None:
    config, mdb = write_pair(tmp_path, {**BASIC, "--lora_rank": 8, "--validation_guidance": 4.0},
                             IMAGES)
    cfg, _ = load_job("job.toml", text=job_text(convert(config, mdb)))
    assert cfg.lora.rank == 8 and cfg.validation.guidance == 4.0
    config, mdb = write_pair(tmp_path, {**BASIC, "--lora_rank": 8, "lora_rank": 16}, IMAGES)
    with pytest.raises(ConfigError, match="lora_rank is set twice"):
        convert(config, mdb)


def test_data_backend_config_is_followed_from_the_folders_above(tmp_path: Path) -> None:
    (tmp_path / "config" / "sub").mkdir(parents=True)
    (tmp_path / "config" / "sub" / "mdb.json").write_text(json.dumps(IMAGES))
    config = tmp_path / "config" / "config.json"
    config.write_text(json.dumps({**BASIC, "data_backend_config": "config/sub/mdb.json"}))
    conv = convert(config)
    assert [d.lines["id"].value for d in conv.datasets] == ["a", "b"]
    config.write_text(json.dumps({**BASIC, "data_backend_config": "sub/mdb.json"}))
    assert len(convert(config).datasets) == 2


def test_missing_backend_file_is_exit_2_saying_where_it_looked(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**BASIC, "data_backend_config": "nope/mdb.json"}))
    code, err = run_cli(["import", "simpletuner", str(config)], capsys)
    assert code == 2 and "nope/mdb.json" in err and "no such file" in err
    config.write_text(json.dumps(BASIC))
    code, err = run_cli(["import", "simpletuner", str(config)], capsys)
    assert code == 2 and "no data_backend_config" in err


def test_config_dataset_keys_fill_datasets_that_lack_them(tmp_path: Path) -> None:
    config, mdb = write_pair(tmp_path, {**BASIC, "resolution": 768, "crop": True}, IMAGES)
    written = job_text(convert(config, mdb))
    cfg, _ = load_job("job.toml", text=written)
    assert [d.resolution for d in cfg.datasets] == [768, 1024]
    assert all(d.crop for d in cfg.datasets)
    assert "resolution = 768  # resolution in config.json: applies to every dataset" in written


def test_pixel_area_limits_become_megapixels(tmp_path: Path) -> None:
    entry = {"id": "a", "instance_data_dir": "/d", "resolution_type": "pixel_area",
             "resolution": 1024, "minimum_image_size": 768, "maximum_image_size": 2048}
    config, mdb = write_pair(tmp_path, BASIC, [entry])
    written = job_text(convert(config, mdb))
    ds = load_job("job.toml", text=written)[0].datasets[0]
    assert (ds.resolution, ds.minimum_image_size, ds.maximum_image_size) == (1024, 0.5625, 4.0)
    assert "# 2048 (a pixel edge with pixel_area) in megapixels" in written


def test_prompt_library_names_and_their_conflict(tmp_path: Path) -> None:
    for key in ("user_prompt_library", "validation_prompt_library"):
        config, mdb = write_pair(tmp_path, {**BASIC, key: "lib.json"}, IMAGES)
        cfg, _ = load_job("job.toml", text=job_text(convert(config, mdb)))
        assert cfg.validation.prompt_library == "lib.json"
    config, mdb = write_pair(tmp_path, {**BASIC, "user_prompt_library": "a.json",
                                        "validation_prompt_library": "b.json"}, IMAGES)
    with pytest.raises(ConfigError, match="both set validation.prompt_library"):
        convert(config, mdb)


def test_other_entries_and_unknown_keys_are_reported(tmp_path: Path) -> None:
    entries = [*IMAGES, {"id": "t1", "dataset_type": "text_embeds", "cache_dir": "/c1"},
               {"id": "t2", "dataset_type": "text_embeds", "default": True, "cache_dir": "/c2"},
               {"id": "masks", "dataset_type": "conditioning", "instance_data_dir": "/m"}]
    config, mdb = write_pair(tmp_path, {**BASIC, "lycoris_config": "x.json", "lora_alpha": None,
                                        "report_to": "none"}, entries)
    conv = convert(config, mdb)
    assert {(u.where, u.key) for u in conv.unmapped} == {
        ("config.json", "lycoris_config"), ('mdb.json entry "t1"', "dataset_type"),
        ('mdb.json entry "masks"', "dataset_type")}
    assert conv.unmapped[0].reason == UNKNOWN_REASON
    assert conv.tables["cache"].lines["dir"].value == "/c2"
    written = job_text(conv)
    assert 'report_to = "none": tunejob\'s behaviour already' in written
    assert "lora_alpha = null: unset" in written


@pytest.mark.skipif("distillation" not in JobConfig.model_fields, reason="no [distillation] yet")
def test_unknown_key_inside_distillation_config_is_reported(tmp_path: Path) -> None:
    config, mdb = write_pair(tmp_path, {**BASIC, "distillation_config": {
        "lcm": {"w_min": 2.0, "bogus": 1}}}, IMAGES)
    conv = convert(config, mdb)
    assert [u.key for u in conv.unmapped] == ["distillation_config.lcm.bogus"]
    assert conv.tables["distillation.lcm"].lines["w_min"].value == 2.0


MINIMAL = """
[job]
name = "t"
[model]
family = "sdxl"
[train]
max_train_steps = 3
[[datasets]]
id = "d"
instance_data_dir = "/tmp/none"
"""


@pytest.mark.parametrize("text, rule_key", [
    ('report_to = "wandb"\n' + MINIMAL, "report_to"),
    (MINIMAL + "[validation]\npreview_steps = 5\n", "validation_preview_steps"),
    (MINIMAL.replace("max_train_steps = 3", 'max_train_steps = 3\nbase_model_precision = "nf4"'),
     "base_model_precision")], ids=["top-level", "validation-short-name", "train"])
def test_job_loader_gives_the_importers_reason(text: str, rule_key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_job("job.toml", text=text)
    reason = KEYMAP[(CONFIG, rule_key)].explain()
    assert f"{rule_key!r} is SimpleTuner's; {reason}" in str(caught.value)


def test_job_loader_points_a_simpletuner_name_at_its_table() -> None:
    with pytest.raises(ConfigError, match=r"'lora_rank' is SimpleTuner's; in a job file it is "
                                          r"\[lora\] rank"):
        load_job("job.toml", text=MINIMAL.replace("max_train_steps = 3",
                                                  "max_train_steps = 3\nlora_rank = 4"))


def test_migrating_doc_is_fresh() -> None:
    assert DOC_PATH.read_text(encoding="utf-8") == migrating_doc_text(), (
        "run `python -m job.importers.keymap` and commit docs/migrating.md")


def test_real_cli_writes_a_valid_job_without_importing_torch(tmp_path: Path) -> None:
    out = tmp_path / "job.toml"
    args = ["import", "simpletuner", str(FIX / BASE), str(FIX / LCM / "multidatabackend.json"),
            "-o", str(out)]
    code = (f"import sys; from job.cli import main; rc = main({args!r}); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "accepts this job" in done.stderr
    done = subprocess.run([sys.executable, "-m", "job", "validate", str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
